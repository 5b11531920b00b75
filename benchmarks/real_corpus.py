"""Build a corpus of real recordings (gunshots and non-gun sounds) from Debian packages of game data.

    python benchmarks/real_corpus.py OUT [--manifest M] [--packages-dir D]

The manifest (benchmarks/real_corpus_manifest.csv, committed) lists one clip per row: the Debian package,
the version it was chosen from, the path inside the package, the label, the licence (from the package's
debian/copyright), and for gunshots the number of rounds and their onset times where they were established.
A path of the form `archive.pk3!member.ogg` names a member of a zip archive the package ships (Nexuiz's
data.pk3, Warzone 2100's base.wz), of an OpenClonk group file (`Sound.ocg!Objects.ocg/.../GunShoot1.ogg`,
read by the small C4Group reader below), of an Advanced Strategic Command container (`main.ascdat!gateling.ogg`)
or of a Triplane Classic DKS data file (`fokker.dks!Guns1.wav`: DKS names its members without an extension, so
a member that is a RIFF WAVE file is listed with `.wav` added); the member is copied as shipped (an ASC member
that ASC stored bzip2-packed is unpacked).

The script downloads each package with `apt-get download` into a cache folder (reused when the .deb is
there), unpacks it with `dpkg-deb -x`, and writes

    OUT/Gun_Classifier/<label>/<package>__<flattened path>   the audio as shipped (OGG, WAV, MP3)
    OUT/train.pq                                             Hydrogen Torch layout: image, class, package, ...
    OUT/corpus.csv                                           file, package, licence, label, rounds, onsets

The audio is never committed: OUT (and the .deb cache) must lie outside the project's git checkout. The corpus
is for evaluation: each clip keeps its own licence (corpus.csv). Train with folds grouped by package
(`--set dataset.group_fold_column=package`).

Some packages are kept for an independent evaluation (EXCLUDED_PACKAGES, every openarena* package). Before
anything is downloaded, `apt-cache show` gives the source package of every manifest package and of every excluded
one, and a manifest package built from an excluded package's source (freedm from freedoom) is refused. This needs
the apt lists (`apt-get update`); a package apt does not know stops the build.
"""

from __future__ import annotations

import argparse
import bz2
import functools
import gzip
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
DEFAULT_MANIFEST = HERE / "real_corpus_manifest.csv"
DEFAULT_PACKAGES_DIR = Path("/work/corpus_cache")
DATA_FOLDER = "Gun_Classifier"

# Kept for an independent evaluation: never downloaded, never used (nor packages that repackage them).
EXCLUDED_PACKAGES = frozenset({
    "ufoai-sound", "ufoai-data", "cube2-data", "hedgewars-data", "warmux-data", "teeworlds-data", "freedoom",
    "blobwars-data", "btanks-data", "barrage", "alienblaster-data",
})
EXCLUDED_PREFIXES = ("openarena",)  # every openarena-* package (and every openarena* source package)
# A plain Debian package name (Debian Policy 5.6.7): what the manifest must hold, with no `:arch`, `=version`
# or `/release` that apt-get would accept and that would slip past a name comparison.
PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")
LABELS = ("pistol", "revolver", "shotgun", "rifle", "sniper_rifle", "smg", "machine_gun", "background")
BACKGROUND = "background"
REQUIRED_COLUMNS = ("package", "version", "path", "label", "licence", "rounds", "onsets", "note")
ARCHIVE_SEPARATOR = "!"


class CorpusError(RuntimeError):
    """A manifest or package problem that stops the build; the message says what to fix."""


def normalise_package(package: str) -> str:
    """The bare package name of an apt argument: `hedgewars-data:all`, `teeworlds-data=0.7.5-2` and
    `freedoom/bookworm` all fetch the named package, so the exclusion check must see the name alone."""
    return re.split(r"[:=/]", package.strip().lower(), maxsplit=1)[0].strip()


def is_excluded(package: str) -> bool:
    """Whether the package itself is kept for the independent evaluation (by name; see check_sources for the
    packages built from the same source)."""
    name = normalise_package(package)
    return name in EXCLUDED_PACKAGES or name.startswith(EXCLUDED_PREFIXES)


def read_manifest(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _parse_rounds(value: str) -> int | None:
    """Rounds as an int; None when empty; raises ValueError when not a positive integer."""
    text = str(value).strip()
    if not text:
        return None
    number = int(text)
    if number < 1 or str(number) != text:
        raise ValueError(text)
    return number


def parse_onsets(value: str) -> list[float]:
    text = str(value).strip()
    return [float(t) for t in text.split(";") if t.strip()] if text else []


def validate_manifest(df: pd.DataFrame) -> list[str]:
    """Every problem of a manifest, one line each (empty when it is well-formed); downloads nothing."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        return [f"missing column(s) {missing}; columns are {list(df.columns)}"]
    problems: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    for i, row in enumerate(df.to_dict("records")):
        where = f"row {i} ({row['package']}: {row['path']})"
        package, path = str(row["package"]).strip(), str(row["path"]).strip()
        if not package or not path:
            problems.append(f"{where}: empty package or path")
        if is_excluded(package):
            problems.append(f"{where}: package {package!r} is excluded (kept for an independent evaluation)")
        elif package and not PACKAGE_NAME.fullmatch(package):
            problems.append(f"{where}: package {package!r} must be a plain Debian package name "
                            "(lower case, no :arch, =version or /release)")
        if not str(row["version"]).strip():
            problems.append(f"{where}: empty version")
        if row["label"] not in LABELS:
            problems.append(f"{where}: unknown label {row['label']!r} (known: {', '.join(LABELS)})")
        if not str(row["licence"]).strip():
            problems.append(f"{where}: no licence")
        if path.startswith("/") or ".." in path.replace(ARCHIVE_SEPARATOR, "/").split("/"):
            problems.append(f"{where}: path must be relative inside the package")
        key = (package, path)
        if key in seen:
            problems.append(f"{where}: duplicate of row {seen[key]}")
        seen.setdefault(key, i)
        try:
            rounds = _parse_rounds(row["rounds"])
        except ValueError:
            problems.append(f"{where}: rounds {row['rounds']!r} is not a positive integer")
            rounds = None
        try:
            onsets = parse_onsets(row["onsets"])
        except ValueError:
            problems.append(f"{where}: onsets {row['onsets']!r} are not ';'-separated seconds")
            onsets = []
        if onsets and (sorted(onsets) != onsets or onsets[0] < 0):
            problems.append(f"{where}: onsets must be non-negative and sorted")
        if onsets and rounds is not None and len(onsets) != rounds:
            problems.append(f"{where}: {len(onsets)} onset(s) for {rounds} round(s)")
        if (rounds is not None or onsets) and row["label"] == BACKGROUND:
            problems.append(f"{where}: a background clip has rounds or onsets")
    return problems


def flat_name(package: str, path: str) -> str:
    flat = path.replace(ARCHIVE_SEPARATOR, "/").strip("/").replace("/", "__")
    return f"{package}__{flat}"


# ---------------------------------------------------------------- where the corpus may be written


def project_root() -> Path:
    """The git work tree this script belongs to (its parent folder when git cannot say, e.g. an unpacked
    archive), so that the audio is never written where it could be committed."""
    try:
        result = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=HERE, capture_output=True,
                                text=True, check=False)
    except OSError:
        result = None
    if result is not None and result.returncode == 0 and result.stdout.strip():
        return Path(result.stdout.strip()).resolve()
    return HERE.parent.resolve()


def check_outside_checkout(folder: Path, root: Path, what: str = "output folder") -> None:
    """Refuse a folder inside the checkout: the audio keeps third-party licences and must never be committed
    (.gitignore covers only /data/). Both paths are resolved, so `..` and symbolic links do not get past."""
    resolved, checkout = Path(folder).expanduser().resolve(), Path(root).resolve()
    if resolved == checkout or checkout in resolved.parents:
        raise CorpusError(f"the {what} {folder} ({resolved}) is inside the project's checkout {checkout}; "
                          "build the corpus outside the checkout (e.g. /work/real_corpus)")


# ---------------------------------------------------------------- excluded sources


def parse_apt_sources(text: str) -> frozenset[str]:
    """Source package names in `apt-cache show` (or `dpkg-deb -f DEB Package Source`) output: each stanza's
    `Source:` without the version in parentheses, or its `Package:` when there is no `Source:` (the package is
    its own source). Every stanza counts, so a second architecture or version cannot hide a source. Empty when
    apt printed no stanza (an unknown or purely virtual package)."""
    sources: set[str] = set()
    for stanza in re.split(r"\n\s*\n", text.strip()):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(":")
            if sep and not line[:1].isspace():
                fields.setdefault(key.strip().lower(), value.strip())
        name = fields.get("source") or fields.get("package")
        if name:
            sources.add(name.split("(", 1)[0].strip().lower())
    return frozenset(sources)


def apt_sources(package: str) -> frozenset[str]:
    """The source package(s) of the package apt would download (`apt-cache show --no-all-versions`)."""
    try:
        result = subprocess.run(["apt-cache", "show", "--no-all-versions", package], capture_output=True,
                                text=True, check=False)
    except OSError as exc:
        raise CorpusError(f"cannot run apt-cache ({exc}); the source check needs apt") from exc
    return parse_apt_sources(result.stdout)


def apt_pkgnames(prefix: str) -> list[str]:
    """Packages apt knows whose names start with the prefix (`apt-cache pkgnames`): the openarena* packages."""
    try:
        result = subprocess.run(["apt-cache", "pkgnames", prefix], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise CorpusError(f"cannot run apt-cache ({exc}); the source check needs apt") from exc
    return sorted({line.strip() for line in result.stdout.splitlines() if line.strip()})


def _is_excluded_source(source: str, excluded: Mapping[str, str]) -> str | None:
    """The excluded package(s) behind a source name, or None."""
    if source in excluded:
        return excluded[source]
    if source.startswith(EXCLUDED_PREFIXES):
        return f"the {'/'.join(EXCLUDED_PREFIXES)}* packages"
    return None


def check_sources(manifest_sources: Mapping[str, frozenset[str]],
                  excluded_sources: Mapping[str, frozenset[str]]) -> None:
    """Refuse manifest packages built from the source of an excluded package (freedm from freedoom: the same
    sounds under another name). Both mappings give each package's source names as apt reported them (empty when
    apt does not know it); every excluded package's own name counts as a source, known to apt or not.
    A manifest package apt does not know, or apt knowing none of the excluded ones, stops the build: without
    the apt lists the check would pass by default."""
    owners: dict[str, set[str]] = {name: {name} for name in EXCLUDED_PACKAGES}
    for package, sources in excluded_sources.items():
        for source in {normalise_package(package), *sources}:
            owners.setdefault(source, set()).add(normalise_package(package))
    excluded = {source: ", ".join(sorted(names)) for source, names in owners.items()}
    problems: list[str] = []
    for package, sources in sorted(manifest_sources.items()):
        if not sources:
            problems.append(f"apt-cache does not know package {package!r}, so its source cannot be checked "
                            "(run `apt-get update`, or fix the name)")
        for source in sorted(sources):
            owner = _is_excluded_source(source, excluded)
            if owner is not None:
                problems.append(f"package {package!r} is built from source {source!r}, the source of the "
                                f"excluded {owner} (kept for an independent evaluation); remove it")
    if excluded_sources and not any(excluded_sources.values()):
        problems.append("apt-cache knows none of the excluded packages "
                        f"({', '.join(sorted(excluded_sources))}), so their sources cannot be checked "
                        "(run `apt-get update`)")
    if problems:
        raise CorpusError("the source check refuses the manifest:\n  " + "\n  ".join(problems))


def check_manifest_sources(packages: Iterable[str], lookup: Callable[[str], frozenset[str]] = apt_sources,
                           list_prefixed: Callable[[str], list[str]] = apt_pkgnames) -> None:
    """Ask apt for the sources of the manifest packages and of every excluded package, then check_sources;
    run before anything is downloaded."""
    excluded_names = set(EXCLUDED_PACKAGES)
    for prefix in EXCLUDED_PREFIXES:
        excluded_names.update(name for name in list_prefixed(prefix) if name.startswith(prefix))
    excluded = {name: lookup(name) for name in sorted(excluded_names)}
    unknown = sorted(name for name, sources in excluded.items() if not sources)
    if unknown and len(unknown) < len(excluded):
        print(f"warning: apt-cache does not know the excluded package(s) {', '.join(unknown)}; only their own "
              "names are refused as sources", file=sys.stderr)
    manifest = {normalise_package(p): lookup(normalise_package(p)) for p in sorted(set(packages))}
    check_sources(manifest, excluded)


# ---------------------------------------------------------------- packages


def _deb_version(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                          text=True).stdout.strip()


def fetch_deb(package: str, cache: Path) -> Path:
    """The package's .deb in the cache, downloaded with `apt-get download` when absent."""
    if is_excluded(package):
        raise CorpusError(f"package {package!r} is excluded (kept for an independent evaluation); "
                          "remove it from the manifest")
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        print(f"apt-get download {package}", flush=True)
        result = subprocess.run(["apt-get", "download", package], cwd=cache, capture_output=True, text=True)
        if result.returncode != 0:
            raise CorpusError(f"apt-get download {package} failed (run `apt-get update` first?):\n"
                              f"{result.stderr.strip()}")
        found = sorted(cache.glob(f"{package}_*.deb"))
        if not found:
            raise CorpusError(f"apt-get download {package} left no {package}_*.deb in {cache}")
    return found[-1]


C4GROUP_SUFFIXES = (".ocg", ".ocd", ".ocf", ".ocs")
_C4_HEADER, _C4_ENTRY = 204, 316


def _c4_unscramble(header: bytes) -> bytes:
    data = bytearray(b ^ 237 for b in header)
    for i in range(0, len(data) - 2, 3):
        data[i], data[i + 2] = data[i + 2], data[i]
    return bytes(data)


def _c4_entries(data: bytes, prefix: str = "") -> dict[str, bytes]:
    header = _c4_unscramble(data[:_C4_HEADER])
    if not header.startswith(b"RedWolf Design"):
        raise CorpusError(f"not a C4Group ({header[:24]!r})")
    count = struct.unpack_from("<i", header, 36)[0]
    base = _C4_HEADER + _C4_ENTRY * count
    out: dict[str, bytes] = {}
    for k in range(count):
        entry = data[_C4_HEADER + _C4_ENTRY * k:_C4_HEADER + _C4_ENTRY * (k + 1)]
        name = entry[:260].split(b"\0")[0].decode("latin-1")
        _packed, child, size, _reserved, offset = struct.unpack_from("<5i", entry, 260)
        blob = data[base + offset:base + offset + size]
        if child:
            out.update(_c4_entries(blob, f"{prefix}{name}/"))
        else:
            out[prefix + name] = blob
    return out


@functools.lru_cache(maxsize=2)
def read_c4group(path: Path) -> dict[str, bytes]:
    """Members of an OpenClonk group file (gzip with a changed magic, a scrambled header, entry table)."""
    raw = bytearray(path.read_bytes())
    if raw[:2] != b"\x1e\x8c":
        raise CorpusError(f"{path}: not a packed C4Group")
    raw[:2] = b"\x1f\x8b"
    return _c4_entries(gzip.decompress(bytes(raw)))


_ASC_MAGIC, _ASC_PACKED = b"NCBM", b"MBZLB2X!"
_UNMASK_M = bytes(b ^ ord("M") for b in range(256))  # a translate table: every byte XOR 'M'


@functools.lru_cache(maxsize=2)
def read_ascdat(path: Path) -> dict[str, bytes]:
    """Members of an Advanced Strategic Command container: "NCBM", the index's offset; at the index a count,
    then per member a flag, its first and last byte (int32 each) and its NUL-ended name. A member may be
    bzip2-packed the ASC way (signature, then the bzip2 stream with every byte XOR 'M'); it is unpacked."""
    data = path.read_bytes()
    if data[:4] != _ASC_MAGIC:
        raise CorpusError(f"{path}: not an ASC container ({data[:4]!r})")
    pos = struct.unpack_from("<i", data, 4)[0]
    count = struct.unpack_from("<i", data, pos)[0]
    pos += 4
    out: dict[str, bytes] = {}
    for _ in range(count):
        _flag, first, last = struct.unpack_from("<3i", data, pos)
        end = data.index(b"\0", pos + 12)
        name = data[pos + 12:end].decode("latin-1")
        pos = end + 1
        blob = data[first:last + 1]
        if blob.startswith(_ASC_PACKED):
            unmasked = blob[len(_ASC_PACKED):].translate(_UNMASK_M)
            blob = bz2.decompress(unmasked[unmasked.index(b"BZh"):])
        out[name] = blob
    return out


_DKS_HEADER, _DKS_ENTRIES, _DKS_ENTRY = 20, 8192, 23


@functools.lru_cache(maxsize=2)
def read_dks(path: Path) -> dict[str, bytes]:
    """Members of a Triplane Classic DKS data file: a 20-byte header, then 8192 directory entries of a
    7-byte NUL-padded name and a 64-bit offset and size. A member that is a RIFF WAVE file gets `.wav`."""
    data = path.read_bytes()
    if not data.startswith(b"DKS Datafile"):
        raise CorpusError(f"{path}: not a DKS data file ({data[:12]!r})")
    out: dict[str, bytes] = {}
    for k in range(_DKS_ENTRIES):
        at = _DKS_HEADER + _DKS_ENTRY * k
        name = data[at:at + 7].split(b"\0")[0].decode("latin-1")
        if not name:
            continue
        offset, size = struct.unpack_from("<QQ", data, at + 7)
        blob = data[offset:offset + size]
        is_wave = blob[:4] == b"RIFF" and blob[8:12] == b"WAVE"
        out[f"{name}.wav" if is_wave else name] = blob
    return out


# The games' own containers by suffix (read whole, cached per build); any other archive is a zip.
CONTAINER_READERS = {**dict.fromkeys(C4GROUP_SUFFIXES, read_c4group), ".ascdat": read_ascdat, ".dks": read_dks}


def _archive_members(archive: Path) -> dict[str, bytes] | zipfile.ZipFile:
    reader = CONTAINER_READERS.get(archive.suffix)
    return reader(archive) if reader else zipfile.ZipFile(archive)


def _copy_member(root: Path, path: str, dest: Path) -> None:
    if ARCHIVE_SEPARATOR not in path:
        shutil.copyfile(root / path, dest)
        return
    archive, member = path.split(ARCHIVE_SEPARATOR, 1)
    members = _archive_members(root / archive)
    if isinstance(members, dict):
        dest.write_bytes(members[member])
        return
    with members as z, z.open(member) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out)


def _exists(root: Path, path: str) -> bool:
    if ARCHIVE_SEPARATOR not in path:
        return (root / path).is_file()
    archive, member = path.split(ARCHIVE_SEPARATOR, 1)
    if not (root / archive).is_file():
        return False
    members = _archive_members(root / archive)
    if isinstance(members, dict):
        return member in members
    with members as z:
        return member in z.namelist()


# ---------------------------------------------------------------- build


def build(out: Path, manifest: pd.DataFrame, cache: Path, *, root: Path | None = None,
          lookup: Callable[[str], frozenset[str]] = apt_sources,
          list_prefixed: Callable[[str], list[str]] = apt_pkgnames) -> pd.DataFrame:
    """Check the manifest, where the files go and the packages' sources; only then download and write.
    `lookup` and `list_prefixed` stand in for apt-cache in tests."""
    problems = validate_manifest(manifest)
    if problems:
        raise CorpusError("the manifest has problems:\n  " + "\n  ".join(problems))
    checkout = project_root() if root is None else root
    check_outside_checkout(out, checkout, "output folder")
    check_outside_checkout(cache, checkout, "package cache (--packages-dir)")
    check_manifest_sources(manifest["package"], lookup, list_prefixed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for package, group in manifest.groupby("package", sort=True):
        deb = fetch_deb(package, cache)
        served = _deb_version(deb)
        wanted = set(group["version"])
        if served not in wanted:
            print(f"warning: {package}: the manifest lists version {', '.join(sorted(wanted))}, "
                  f"{deb.name} is {served}; the files may differ", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix=f"corpus-{package}-") as tmp:
            root = Path(tmp)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
            missing = [p for p in group["path"] if not _exists(root, p)]
            if missing:
                raise CorpusError(f"{package} {served}: {len(missing)} listed file(s) not in the package:\n  "
                                  + "\n  ".join(missing))
            for row in group.to_dict("records"):
                rel = f"{row['label']}/{flat_name(package, row['path'])}"
                dest = out / DATA_FOLDER / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                _copy_member(root, row["path"], dest)
                rounds = _parse_rounds(row["rounds"])
                rows.append({
                    "image": rel,
                    "class": row["label"],
                    "package": package,
                    "version": served,
                    "source_path": row["path"],
                    "licence": row["licence"],
                    "rounds": rounds,
                    "onsets": row["onsets"],
                })
        for reader in set(CONTAINER_READERS.values()):
            reader.cache_clear()
    frame = pd.DataFrame(rows)
    frame["rounds"] = frame["rounds"].astype("Int64")
    frame.to_parquet(out / "train.pq", index=False)
    corpus = frame.rename(columns={"image": "file", "class": "label"})
    corpus["file"] = DATA_FOLDER + "/" + corpus["file"]
    corpus[["file", "package", "licence", "label", "rounds", "onsets"]].to_csv(out / "corpus.csv", index=False)
    return frame


def summary(frame: pd.DataFrame) -> str:
    lines = [f"{len(frame)} clips from {frame['package'].nunique()} packages"]
    lines.append("per label:   " + ", ".join(f"{k} {v}" for k, v in sorted(Counter(frame["class"]).items())))
    lines.append("per package: " + ", ".join(f"{k} {v}" for k, v in sorted(Counter(frame["package"]).items())))
    known = frame["rounds"].notna()
    lines.append(f"round counts established for {int(known.sum())} gun clip(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (train.pq, corpus.csv, Gun_Classifier/)")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--packages-dir", type=Path, default=DEFAULT_PACKAGES_DIR,
                        help="where the .deb files are downloaded and reused (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        frame = build(args.out, read_manifest(args.manifest), args.packages_dir)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(frame))
    print(f"wrote {args.out / 'train.pq'} and {args.out / 'corpus.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
