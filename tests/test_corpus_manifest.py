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
