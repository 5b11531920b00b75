"""Datasets as manifests: one row per clip (path, label, group, fold), checked before any training.

Three layouts are accepted, local or on S3:
- Hydrogen Torch: a parquet or CSV dataframe whose audio column holds paths relative to a data folder;
- a zip of that layout (read in place through the storage layer, never extracted);
- folder per class: <root>/<class name>/*.wav (the public gunshot audio dataset).
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
from sklearn.model_selection import StratifiedGroupKFold

from gunsound import audio, storage
from gunsound.config import Config, DatasetConfig

log = logging.getLogger(__name__)

DATAFRAME_SUFFIXES = (".pq", ".parquet", ".csv")


class ManifestError(ValueError):
    """A dataset with problems; `problems` lists every bad row with its reason."""

    def __init__(self, source: str, problems: list[Problem]):
        self.problems = problems
        lines = [f"  row {p.row}: {p.path!r}: {p.reason}" for p in problems[:50]]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(
            f"{source}: {len(problems)} problem row(s); fix them or pass --drop-bad-rows to drop them:\n"
            + "\n".join(lines) + more
        )


@dataclass(frozen=True)
class Problem:
    row: int
    path: str
    reason: str


@dataclass
class Manifest:
    """The checked dataset: `frame` has columns row, path (URI), rel_path, label, group, duration, sample_rate."""

    frame: pd.DataFrame
    classes: list[str]
    source: str
    dropped: list[Problem] = field(default_factory=list)

    def targets(self, background_label: str) -> np.ndarray:
        """One-hot targets (rows, classes); background clips are all zeros."""
        index = {c: i for i, c in enumerate(self.classes)}
        out = np.zeros((len(self.frame), len(self.classes)), dtype=np.float32)
        for r, label in enumerate(self.frame["label"]):
            if label != background_label:
                out[r, index[label]] = 1.0
        return out


# ---------------------------------------------------------------- locating the data


def _existing_suffix(root: str, configured: str) -> str | None:
    """The longest trailing part of a configured path that exists under `root`.

    The seed config names paths such as data/anon/Gun_sound_detection/train.pq, relative to Hydrogen
    Torch's own data root; under --data LOCATION the same config finds LOCATION/.../train.pq.
    """
    parts = [p for p in configured.replace("\\", "/").split("/") if p and p != "."]
    for i in range(len(parts)):
        candidate = storage.join(root, *parts[i:])
        if storage.exists(candidate):
            return candidate
    return None


def is_system_entry(name: str) -> bool:
    """A name that an operating system or a tool adds, not the user's data: macOS Finder's `__MACOSX/` folder
    and `._NAME` resource forks in every zip it makes, `.DS_Store`, and other hidden (dot) names."""
    return name == "__MACOSX" or name.startswith(".")


def _zip_root(archive: str) -> str:
    """A zip's root folder, read in place (so every node of a cluster reads the same archive); a zip that
    holds one folder and nothing else (as zipping a folder makes) is entered."""
    root = storage.zip_location(archive)
    fs, path = storage.resolve(root)
    entries = [e for e in fs.get_file_info(pafs.FileSelector(path, recursive=False)) if not is_system_entry(e.base_name)]
    if len(entries) == 1 and entries[0].type == pafs.FileType.Directory:
        root = storage.join(root, entries[0].base_name)
    log.info("reading %s in place as %s", archive, root)
    return root


@dataclass
class DatasetLocation:
    layout: str  # "hydrogen_torch" or "folder_per_class"
    dataframe: str | None
    data_folder: str


def locate(cfg: DatasetConfig, data: str | None) -> DatasetLocation:
    """Find the dataframe and data folder for a config and an optional --data location."""
    if data and data.lower().endswith(".zip"):
        data = _zip_root(data)
    if data and not storage.is_dir(data):
        if data.lower().endswith(DATAFRAME_SUFFIXES) and storage.exists(data):
            folder = _existing_suffix(posixpath.dirname(data), cfg.data_folder) if cfg.data_folder else None
            return DatasetLocation("hydrogen_torch", data, folder or posixpath.dirname(data))
        raise FileNotFoundError(f"data location {data} does not exist (or is not a folder, zip or dataframe)")
    if not data:
        if not cfg.train_dataframe:
            raise FileNotFoundError("no data: set dataset.train_dataframe in the config or pass --data")
        if not storage.exists(cfg.train_dataframe):
            raise FileNotFoundError(f"dataset.train_dataframe {cfg.train_dataframe} not found; pass --data LOCATION")
        folder = cfg.data_folder or posixpath.dirname(cfg.train_dataframe)
        return DatasetLocation("hydrogen_torch", cfg.train_dataframe, folder)
    dataframe = _existing_suffix(data, cfg.train_dataframe) if cfg.train_dataframe else None
    if dataframe is None:
        top = [u for u in storage.list_files(data, recursive=False) if u.lower().endswith(DATAFRAME_SUFFIXES)]
        if len(top) == 1:
            dataframe = top[0]
        elif len(top) > 1:
            names = ", ".join(posixpath.basename(u) for u in top)
            raise ValueError(f"{data}: several dataframes ({names}); name one in dataset.train_dataframe")
    if dataframe is None:
        return DatasetLocation("folder_per_class", None, data)
    folder = _existing_suffix(data, cfg.data_folder) if cfg.data_folder else None
    return DatasetLocation("hydrogen_torch", dataframe, folder or posixpath.dirname(dataframe))


# ---------------------------------------------------------------- reading and checking


def read_dataframe(uri: str) -> pd.DataFrame:
    return storage.read_table(uri, keep_blank_lines=False)


def _folder_per_class_frame(root: str) -> pd.DataFrame:
    files = storage.list_files(root, recursive=True)
    rows, left_out = [], []
    for uri in files:
        rel = storage.relative(uri, root)
        parts = rel.split("/")
        if len(parts) < 2 or any(is_system_entry(part) for part in parts):
            continue
        if not rel.lower().endswith(audio.AUDIO_EXTENSIONS):
            left_out.append(rel)
            continue
        rows.append({"path": rel, "class": parts[0]})
    if left_out:
        log.warning("%s: %d file(s) in the class folders are not audio libsndfile reads and are left out: %s%s",
                    root, len(left_out), ", ".join(left_out[:10]), " ..." if len(left_out) > 10 else "")
    if not rows:
        raise FileNotFoundError(f"{root}: no dataframe and no <class>/<audio file> folders found")
    return pd.DataFrame(rows)


def _label_of(row: pd.Series, label_columns: list[str]) -> str | None:
    """One class name per row: the value of a single label column, or the one column set to 1."""
    if len(label_columns) == 1:
        value = row[label_columns[0]]
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return None
        text = str(value).strip()
        return text or None
    hot = [c for c in label_columns if str(row[c]).strip() in ("1", "1.0", "True", "true")]
    if len(hot) > 1:
        raise ValueError(f"several label columns set: {hot}")
    return hot[0] if hot else None


def load_manifest(cfg: Config, data: str | None = None, drop_bad_rows: bool = False) -> Manifest:
    """Read, check and return the training manifest; every problem is reported at once."""
    dcfg = cfg.dataset
    loc = locate(dcfg, data)
    if loc.layout == "folder_per_class":
        frame = _folder_per_class_frame(loc.data_folder)
        audio_col, label_cols, group_col = "path", ["class"], None
        source = loc.data_folder
    else:
        frame = read_dataframe(loc.dataframe)
        audio_col, label_cols, group_col = dcfg.audio_column, dcfg.label_columns, dcfg.group_fold_column
        source = loc.dataframe
        missing_cols = [c for c in [audio_col, *label_cols, *([group_col] if group_col else [])]
                        if c not in frame.columns]
        if missing_cols:
            raise ManifestError(source, [Problem(-1, "", f"missing column(s) {missing_cols}; "
                                                        f"columns are {list(frame.columns)}")])
    log.info("dataset %s (%s layout, %d rows, data folder %s)", source, loc.layout, len(frame), loc.data_folder)

    problems: list[Problem] = []
    rows = []
    seen: dict[str, int] = {}
    known = set(dcfg.classes) | {dcfg.background_label} if dcfg.classes else None
    for i, row in enumerate(frame.to_dict("records")):
        rel = str(row[audio_col]).strip() if row[audio_col] is not None else ""
        try:
            label = _label_of(pd.Series(row), label_cols)
        except ValueError as exc:
            problems.append(Problem(i, rel, str(exc)))
            continue
        if not rel:
            problems.append(Problem(i, rel, "empty audio path"))
            continue
        if storage.escapes_folder(rel):
            problems.append(Problem(i, rel, "path escapes the data folder"))
            continue
        norm = posixpath.normpath(rel.replace("\\", "/"))
        if norm in seen:
            problems.append(Problem(i, rel, f"duplicate path (also row {seen[norm]})"))
            continue
        seen[norm] = i
        if label is None:
            problems.append(Problem(i, rel, "empty label"))
            continue
        if known is not None and label not in known:
            problems.append(Problem(i, rel, f"unknown label {label!r} (dataset.classes: {sorted(dcfg.classes)})"))
            continue
        group = row[group_col] if group_col else norm
        if group is None or (pd.api.types.is_scalar(group) and pd.isna(group)) or not str(group).strip():
            # str(NaN) would make every clip without a group one group, all on one side of every split
            problems.append(Problem(i, rel, f"empty dataset.group_fold_column ({group_col!r}) value"))
            continue
        group = str(group)
        rows.append({"row": i, "rel_path": norm, "path": storage.join(loc.data_folder, *norm.split("/")),
                     "label": label, "group": group})

    checked = pd.DataFrame(rows, columns=["row", "rel_path", "path", "label", "group"])
    problems.extend(_check_audio(checked))
    bad_rows = {p.row for p in problems}
    if problems and not drop_bad_rows:
        raise ManifestError(source, sorted(problems, key=lambda p: p.row))
    if problems:
        for p in sorted(problems, key=lambda p: p.row):
            log.warning("dropped row %d %r: %s", p.row, p.path, p.reason)
    checked = checked[~checked["row"].isin(bad_rows)].reset_index(drop=True)
    if checked.empty:
        raise ManifestError(source, [Problem(-1, "", "no usable rows")])
    classes = list(dcfg.classes) if dcfg.classes else sorted(set(checked["label"]) - {dcfg.background_label})
    if not classes:
        raise ManifestError(source, [Problem(-1, "", "no class labels besides background")])
    return Manifest(checked, classes, source, dropped=sorted(problems, key=lambda p: p.row))


def _check_audio(frame: pd.DataFrame) -> list[Problem]:
    """Stat every file, then read every header (in threads: S3 round trips dominate)."""
    if frame.empty:
        return []
    problems = []
    infos = storage.file_infos(list(frame["path"]))
    present = []
    for (_, row), info in zip(frame.iterrows(), infos, strict=True):
        if info.type.name == "NotFound":
            problems.append(Problem(int(row["row"]), row["rel_path"], "file not found"))
        elif info.type.name != "File":
            problems.append(Problem(int(row["row"]), row["rel_path"], "not a file"))
        elif info.size == 0:
            problems.append(Problem(int(row["row"]), row["rel_path"], "empty file"))
        else:
            present.append(row)

    def header(row: pd.Series) -> tuple[pd.Series, audio.AudioInfo | str]:
        try:
            return row, audio.info(row["path"])
        except audio.AudioError as exc:  # unreadable, truncated or out of bounds: the reason, as scoring words it
            return row, exc.reason

    durations = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for row, result in pool.map(header, present):
            if isinstance(result, str):
                problems.append(Problem(int(row["row"]), row["rel_path"], result))
            elif result.frames == 0:
                problems.append(Problem(int(row["row"]), row["rel_path"], "audio has no samples"))
            else:
                durations[int(row["row"])] = (result.duration, result.sample_rate, result.channels)
    frame["duration"] = [durations.get(r, (np.nan,) * 3)[0] for r in frame["row"]]
    frame["sample_rate"] = [durations.get(r, (np.nan,) * 3)[1] for r in frame["row"]]
    frame["channels"] = [durations.get(r, (np.nan,) * 3)[2] for r in frame["row"]]
    return problems


# ---------------------------------------------------------------- audio parameters and splits


@dataclass(frozen=True)
class AudioChoice:
    sample_rate: int
    chunk_seconds: float
    reason: str


def choose_audio_parameters(cfg: Config, manifest: Manifest) -> AudioChoice:
    """Audio parameters for training: from the config (Manual) or from the data (Auto).

    Auto takes the most common sample rate and a chunk that holds 90% of the clips whole, rounded up to
    0.5 s and never longer than the configured training_chunk_seconds; a 2 s clip is not padded to 60 s.
    """
    a = cfg.audio
    if a.audio_parameters == "Manual":
        return AudioChoice(a.sample_rate, a.training_chunk_seconds, "configured (audio_parameters: Manual)")
    rates = Counter(int(r) for r in manifest.frame["sample_rate"])
    sample_rate = rates.most_common(1)[0][0]
    p90 = float(np.percentile(manifest.frame["duration"], 90))
    chunk = min(max(0.5, np.ceil(p90 * 2) / 2), a.training_chunk_seconds)
    reason = (f"auto: sample rate {sample_rate} Hz ({rates[sample_rate]}/{len(manifest.frame)} clips), "
              f"chunk {chunk:g} s (90th percentile of durations {p90:.2f} s)")
    log.info("audio parameters %s", reason)
    return AudioChoice(sample_rate, float(chunk), reason)


def num_folds(cfg: DatasetConfig) -> int:
    return max(2, int(round(1 / cfg.validation_size)))


def assign_folds(manifest: Manifest, cfg: DatasetConfig, seed: int) -> np.ndarray:
    """Fold index per row: stratified by class, every clip of one group on the same side."""
    k = num_folds(cfg)
    frame = manifest.frame
    counts = frame["label"].value_counts()
    if counts.max() < k:  # sklearn's own message names neither the dataset nor a way out
        raise ValueError(
            f"{manifest.source}: every class has fewer clips than the {k} folds that dataset.validation_size="
            f"{cfg.validation_size:g} makes (the largest, '{counts.index[0]}', has {counts.max()}): "
            "add clips or raise dataset.validation_size")
    groups = frame["group"].nunique()
    if groups < k:
        raise ValueError(
            f"{manifest.source}: the {k} folds that dataset.validation_size={cfg.validation_size:g} makes need at "
            f"least {k} groups of dataset.group_fold_column={cfg.group_fold_column!r}, and there are {groups}: "
            "raise dataset.validation_size or group by another column")
    if counts.min() < k:
        log.warning("the rarest class '%s' has %d clips, fewer than %d folds; its folds will be uneven",
                    counts.index[-1], counts.min(), k)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed % (2**32))
    folds = np.full(len(frame), -1, dtype=np.int64)
    for fold, (_, valid_idx) in enumerate(splitter.split(frame, frame["label"], frame["group"])):
        folds[valid_idx] = fold
    return folds
