"""The committed real-sound corpus manifest is well-formed (offline: nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "benchmarks" / "real_corpus_manifest.csv"


def _load_module():
    spec = importlib.util.spec_from_file_location("real_corpus", ROOT / "benchmarks" / "real_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("real_corpus", module)
    spec.loader.exec_module(module)
    return module


real_corpus = _load_module()


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    return real_corpus.read_manifest(MANIFEST)


def test_committed_manifest_is_well_formed(manifest: pd.DataFrame) -> None:
    assert set(real_corpus.REQUIRED_COLUMNS) <= set(manifest.columns)
    assert real_corpus.validate_manifest(manifest) == []
    assert set(manifest["label"]) <= set(real_corpus.LABELS)
    assert (manifest["licence"].str.strip() != "").all()
    assert not any(real_corpus.is_excluded(p) for p in manifest["package"])
    assert not manifest.duplicated(["package", "path"]).any()
    for rounds, onsets in zip(manifest["rounds"], manifest["onsets"], strict=True):
        if rounds:
            assert rounds.isdigit() and int(rounds) >= 1
        times = [float(t) for t in onsets.split(";")] if onsets else []
        assert times == sorted(times)
        if rounds and times:
            assert len(times) == int(rounds)


def test_committed_manifest_spans_packages(manifest: pd.DataFrame) -> None:
    assert manifest["package"].nunique() >= 5
    guns = manifest[manifest["label"] != real_corpus.BACKGROUND]
    assert guns["label"].nunique() >= 3 and (manifest["label"] == real_corpus.BACKGROUND).any()


GOOD = {"package": "nexuiz-data", "version": "2.5.2-12", "path": "usr/share/a.ogg", "label": "pistol",
        "licence": "GPL-2.0+", "rounds": "1", "onsets": "0.010", "note": ""}


@pytest.mark.parametrize(("change", "expected"), [
    ({}, None),
    ({"package": "openarena-data"}, "excluded"),
    ({"package": "ufoai-sound"}, "excluded"),
    ({"label": "laser"}, "unknown label"),
    ({"licence": ""}, "no licence"),
    ({"rounds": "0"}, "positive integer"),
    ({"rounds": "2"}, "1 onset(s) for 2 round(s)"),
    ({"rounds": "2", "onsets": "0.5;0.1"}, "sorted"),
])
def test_validate_manifest_reports_bad_rows(change: dict[str, str], expected: str | None) -> None:
    problems = real_corpus.validate_manifest(pd.DataFrame([{**GOOD, **change}]))
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0], problems


def test_validate_manifest_reports_missing_columns_and_duplicates() -> None:
    assert "missing column" in real_corpus.validate_manifest(pd.DataFrame([{"package": "x"}]))[0]
    problems = real_corpus.validate_manifest(pd.DataFrame([GOOD, GOOD]))
    assert len(problems) == 1 and "duplicate" in problems[0]


def test_excluded_package_is_refused_before_download(tmp_path: Path) -> None:
    with pytest.raises(real_corpus.CorpusError, match="excluded"):
        real_corpus.fetch_deb("hedgewars-data", tmp_path)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- excluded packages by name and by source

# Literal `apt-cache show --no-all-versions PKG` output (Debian 12), trimmed: no apt lists are read in tests.
APT_FREEDM = """Package: freedm
Source: freedoom
Version: 0.12.1-2
Architecture: all
Filename: pool/main/f/freedoom/freedm_0.12.1-2_all.deb

"""
APT_FREEDOOM = """Package: freedoom
Version: 0.12.1-2
Architecture: all
Filename: pool/main/f/freedoom/freedoom_0.12.1-2_all.deb

"""
APT_VERSIONED_SOURCE = """Package: 2048-qt
Source: 2048-qt (0.1.6-2)
Version: 0.1.6-2+b2
Architecture: amd64

"""
APT_HEDGEWARS_DATA = """Package: hedgewars-data
Source: hedgewars
Version: 1.0.2-6

"""


@pytest.mark.parametrize(("name", "plain"), [
    ("hedgewars-data", "hedgewars-data"),
    ("hedgewars-data:all", "hedgewars-data"),
    ("teeworlds-data=0.7.5-2", "teeworlds-data"),
    ("teeworlds-data:amd64=0.7.5-2", "teeworlds-data"),
    ("freedoom/bookworm", "freedoom"),
    (" Cube2-Data ", "cube2-data"),
])
def test_normalise_package_strips_arch_version_and_release(name: str, plain: str) -> None:
    assert real_corpus.normalise_package(name) == plain
    assert real_corpus.is_excluded(name) == real_corpus.is_excluded(plain)


@pytest.mark.parametrize("name", ["hedgewars-data:all", "teeworlds-data=0.7.5-2", "freedoom/bookworm",
                                  "OpenArena-085-data:all"])
def test_decorated_excluded_names_are_excluded(name: str, tmp_path: Path) -> None:
    assert real_corpus.is_excluded(name)
    problems = real_corpus.validate_manifest(pd.DataFrame([{**GOOD, "package": name}]))
    assert any("excluded" in p for p in problems), problems
    with pytest.raises(real_corpus.CorpusError, match="excluded"):
        real_corpus.fetch_deb(name, tmp_path)
    assert not any(tmp_path.iterdir())


def test_manifest_names_must_be_plain() -> None:
    problems = real_corpus.validate_manifest(pd.DataFrame([{**GOOD, "package": "nexuiz-data:all"}]))
    assert len(problems) == 1 and "plain" in problems[0], problems


@pytest.mark.parametrize(("text", "sources"), [
    (APT_FREEDM, {"freedoom"}),
    (APT_FREEDOOM, {"freedoom"}),  # no Source field: the package is its own source
    (APT_VERSIONED_SOURCE, {"2048-qt"}),  # the version in parentheses is dropped
    (APT_FREEDM + APT_HEDGEWARS_DATA, {"freedoom", "hedgewars"}),
    ("", set()),  # apt-cache knows no such package (or only a virtual one)
])
def test_parse_apt_sources(text: str, sources: set[str]) -> None:
    assert real_corpus.parse_apt_sources(text) == sources


EXCLUDED_KNOWN = {"freedoom": frozenset({"freedoom"}), "hedgewars-data": frozenset({"hedgewars"})}


def test_package_built_from_an_excluded_source_is_refused() -> None:
    manifest = {"freedm": real_corpus.parse_apt_sources(APT_FREEDM), "nexuiz-data": frozenset({"nexuiz-data"})}
    with pytest.raises(real_corpus.CorpusError) as err:
        real_corpus.check_sources(manifest, EXCLUDED_KNOWN)
    message = str(err.value)
    assert "freedm" in message and "freedoom" in message and "nexuiz-data" not in message


@pytest.mark.parametrize(("package", "source"), [
    ("hedgewars", "hedgewars"),  # the engine shares the source of the excluded hedgewars-data
    ("openarena-extras", "openarena-extras"),  # any openarena* source
    ("freedoom-tools", "freedoom"),  # an excluded package's own name counts even when apt does not know it
])
def test_shared_sources_are_refused(package: str, source: str) -> None:
    with pytest.raises(real_corpus.CorpusError, match=package):
        real_corpus.check_sources({package: frozenset({source})}, {"hedgewars-data": frozenset({"hedgewars"})})


def test_check_sources_passes_unrelated_packages() -> None:
    real_corpus.check_sources({"nexuiz-data": frozenset({"nexuiz-data"}), "asc-data": frozenset({"asc"})},
                              EXCLUDED_KNOWN)


def test_unknown_packages_are_reported_not_passed() -> None:
    with pytest.raises(real_corpus.CorpusError, match="apt-get update"):
        real_corpus.check_sources({"nexuiz-data": frozenset()}, EXCLUDED_KNOWN)
    with pytest.raises(real_corpus.CorpusError, match="apt-get update"):
        real_corpus.check_sources({"nexuiz-data": frozenset({"nexuiz-data"})},
                                  {"freedoom": frozenset(), "hedgewars-data": frozenset()})


def test_build_refuses_an_excluded_source_before_downloading(tmp_path: Path) -> None:
    texts = {"freedm": APT_FREEDM, "freedoom": APT_FREEDOOM, "hedgewars-data": APT_HEDGEWARS_DATA}
    row = {**GOOD, "package": "freedm", "label": "background", "rounds": "", "onsets": ""}
    cache = tmp_path / "cache"
    with pytest.raises(real_corpus.CorpusError, match="freedoom"):
        real_corpus.build(tmp_path / "out", pd.DataFrame([row]), cache,
                          lookup=lambda p: real_corpus.parse_apt_sources(texts.get(p, "")),
                          list_prefixed=lambda prefix: [])
    assert not cache.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the corpus is built outside the checkout


@pytest.mark.parametrize("inside", ["data/real_corpus", ".", "benchmarks/../data/x"])
def test_output_inside_the_checkout_is_refused(inside: str) -> None:
    with pytest.raises(real_corpus.CorpusError, match="outside the checkout"):
        real_corpus.check_outside_checkout(ROOT / inside, ROOT)


def test_output_reached_through_a_link_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(ROOT / "data", target_is_directory=True)
    with pytest.raises(real_corpus.CorpusError, match="outside the checkout"):
        real_corpus.check_outside_checkout(link / "corpus", ROOT)
    real_corpus.check_outside_checkout(tmp_path / "corpus", ROOT)


def test_project_root_is_this_checkout() -> None:
    assert real_corpus.project_root() == ROOT


def test_build_refuses_an_output_in_the_checkout_before_writing(tmp_path: Path) -> None:
    out = ROOT / "data" / "real_corpus_test_must_not_exist"
    assert not out.exists()
    with pytest.raises(real_corpus.CorpusError, match="outside the checkout"):
        real_corpus.build(out, pd.DataFrame([GOOD]), tmp_path / "cache",
                          lookup=lambda p: frozenset({p}), list_prefixed=lambda prefix: [])
    assert not out.exists() and not (tmp_path / "cache").exists()
