"""Datasets as manifests: one row per clip (path, label, group, fold), checked before any training.

Three layouts are accepted, local or on S3:
- Hydrogen Torch: a parquet or CSV dataframe whose audio column holds paths relative to a data folder;
- a zip of that layout (read in place through the storage layer, never extracted);
- folder per class: <root>/<class name>/*.wav (the public gunshot audio dataset).
"""

from __future__ import annotations

import logging
import posixpath
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
from sklearn.model_selection import StratifiedGroupKFold

from gunsound import audio, storage
from gunsound.config import Config, ConfigError, DatasetConfig

log = logging.getLogger(__name__)

DATAFRAME_SUFFIXES = (".pq", ".parquet", ".csv")


class ManifestError(ValueError):
    """A dataset with problems; `problems` lists every bad row with its reason. A problem of the dataset as a
    whole (row -1: a missing column, a layout gunsound cannot read) is said as such: --drop-bad-rows cannot
    fix it."""

    def __init__(self, source: str, problems: list[Problem]):
        self.problems = problems
        if all(p.row < 0 for p in problems):
            super().__init__(f"{source}: " + "\n".join(p.reason for p in problems))
            return
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
    # What a group is: "file", or the dataset.group_fold_column whose values the groups are.
    group_by: str = "file"
    # What was chosen for the user (a dataframe found, a layout read), for the plan to show.
    notes: list[str] = field(default_factory=list)

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
    note: str = ""  # what was chosen without being configured, for the plan to show


DataframeKey = Literal["train_dataframe", "validation_dataframe"]


def _data_folder(cfg: DatasetConfig, bases: list[str], dataframe: str) -> str:
    """Where the dataframe's audio paths start: dataset.data_folder found under one of `bases` (the --data
    location, then the dataframe's folder), or the dataframe's folder when none is configured. A configured one
    that is not there is an error naming it: the dataframe's folder instead would blame every row."""
    if not cfg.data_folder:
        return posixpath.dirname(dataframe)
    for base in dict.fromkeys(bases):
        found = _existing_suffix(base, cfg.data_folder)
        if found is not None:
            return found
    parts = [p for p in cfg.data_folder.replace("\\", "/").split("/") if p and p != "."]
    tails = ", ".join("/".join(parts[i:]) for i in range(len(parts)))
    raise ConfigError(f"dataset.data_folder {cfg.data_folder!r} not found under {' or '.join(dict.fromkeys(bases))} "
                      f"(looked for {tails}); set it to the folder the audio paths of the dataframe start from, or "
                      "leave it empty for the dataframe's own folder")


def locate(cfg: DatasetConfig, data: str | None, key: DataframeKey = "train_dataframe") -> DatasetLocation:
    """Find the dataframe named by `key` (dataset.train_dataframe or dataset.validation_dataframe) and the data
    folder, for a config and an optional --data location.

    A validation dataframe is always the one configured: one not found is an error. A training dataframe not
    set (the default, empty) is the one dataframe at the top of --data, said in a note; one set but not found
    is an error naming the dataframes there, as training on another table without a word is never what was
    meant (a table left beside the data to score, say); where there is none, the location is read as folder
    per class."""
    configured = getattr(cfg, key) or ""
    if data and data.lower().endswith(".zip"):
        data = _zip_root(data)
    if data and not storage.is_dir(data):
        if data.lower().endswith(DATAFRAME_SUFFIXES) and storage.exists(data):
            base = posixpath.dirname(data)
            dataframe = data if key == "train_dataframe" else _existing_suffix(base, configured)
            if dataframe is None:
                raise ConfigError(f"dataset.{key} {configured} not found under {base}")
            return DatasetLocation("hydrogen_torch", dataframe, _data_folder(cfg, [base], dataframe))
        raise FileNotFoundError(f"data location {data} does not exist (or is not a folder, zip or dataframe)")
    if not data:
        if not configured:
            raise FileNotFoundError(f"no data: set dataset.{key} in the config or pass --data")
        if not storage.exists(configured):
            if key == "validation_dataframe":
                raise ConfigError(f"dataset.validation_dataframe {configured} not found; pass --data LOCATION")
            raise FileNotFoundError(f"dataset.train_dataframe {configured} not found; pass --data LOCATION")
        if cfg.data_folder and not storage.exists(cfg.data_folder):
            raise ConfigError(f"dataset.data_folder {cfg.data_folder} not found; pass --data LOCATION")
        return DatasetLocation("hydrogen_torch", configured, cfg.data_folder or posixpath.dirname(configured))
    dataframe = _existing_suffix(data, configured) if configured else None
    note = ""
    if dataframe is None:
        top = [u for u in storage.list_files(data, recursive=False) if u.lower().endswith(DATAFRAME_SUFFIXES)]
        names = ", ".join(posixpath.basename(u) for u in top)
        if key == "validation_dataframe":
            raise ConfigError(f"dataset.validation_dataframe {configured} not found under {data}"
                              + (f" (dataframes there: {names})" if top else ""))
        if configured and top:
            raise ConfigError(f"dataset.train_dataframe {configured} not found under {data}, which holds {names}: "
                              "set dataset.train_dataframe to the one to train on")
        if len(top) > 1:
            raise ConfigError(f"{data}: several dataframes ({names}); name one in dataset.train_dataframe")
        if top:
            dataframe = top[0]
            note = (f"dataset.train_dataframe is not set: training on {dataframe}, the one dataframe at the top of "
                    f"{data}")
        else:
            note = (f"{data} holds no dataframe"
                    + (f" (dataset.train_dataframe {configured} is not there)" if configured else "")
                    + ": read as folder per class (<class>/<audio file>)")
            log.info("%s", note)
            return DatasetLocation("folder_per_class", None, data, note)
        log.info("%s", note)
    folder = _data_folder(cfg, [data, posixpath.dirname(dataframe)], dataframe)
    return DatasetLocation("hydrogen_torch", dataframe, folder, note)


# ---------------------------------------------------------------- reading and checking


def read_dataframe(uri: str) -> pd.DataFrame:
    return storage.read_table(uri, keep_blank_lines=False)


def _folder_per_class_frame(root: str) -> pd.DataFrame:
    """One row per audio file of <root>/<class>/<file>. A class folder that holds subfolders of audio is
    refused, as is a single class folder: both mean `root` is not the folder of class folders (one level too
    high, or a train/ + test/ split), which would otherwise train on wrong labels without a word."""
    files = storage.list_files(root, recursive=True)
    rows, left_out, loose = [], [], []
    nested: dict[str, set[str]] = {}
    for uri in files:
        rel = storage.relative(uri, root)
        parts = rel.split("/")
        if any(is_system_entry(part) for part in parts):
            continue
        if not rel.lower().endswith(audio.AUDIO_EXTENSIONS):
            if len(parts) >= 2:
                left_out.append(rel)
            continue
        if len(parts) < 2:
            loose.append(rel)
        elif len(parts) > 2:
            nested.setdefault(parts[0], set()).add(parts[1])
        else:
            rows.append({"path": rel, "class": parts[0]})
    if nested:
        first = sorted(nested)[0]
        held = "; ".join(f"{name}/ holds {', '.join(sorted(subs)[:5])}{' ...' if len(subs) > 5 else ''}"
                         for name, subs in sorted(nested.items())[:5])
        raise ManifestError(root, [Problem(-1, "", (
            f"read as folder per class (no dataframe), where each clip's class is its folder under {root}, but "
            f"class folder(s) hold subfolders with audio ({held}): pass the folder that holds one folder per class "
            f"(e.g. {storage.join(root, first)}), or put each class's audio directly in its folder"))])
    if left_out:
        log.warning("%s: %d file(s) in the class folders are not audio libsndfile reads and are left out: %s%s",
                    root, len(left_out), ", ".join(left_out[:10]), " ..." if len(left_out) > 10 else "")
    if loose:
        log.warning("%s: %d audio file(s) outside any class folder are left out: %s%s", root, len(loose),
                    ", ".join(loose[:10]), " ..." if len(loose) > 10 else "")
    if not rows:
        raise FileNotFoundError(f"{root}: no dataframe and no <class>/<audio file> folders found")
    classes = sorted({row["class"] for row in rows})
    if len(classes) < 2:
        raise ManifestError(root, [Problem(-1, "", (
            f"read as folder per class (no dataframe), it has {len(classes)} class folder ({', '.join(classes)}); "
            "a classifier needs at least 2: pass the folder that holds one folder per class"))])
    return pd.DataFrame(rows)


# Cell text that means "no value": R's write.csv writes NA, and storage.read_table keeps CSV cells as text.
MISSING_TEXTS = frozenset({"", "na", "n/a", "nan", "null", "none", "<na>"})
# Characters that draw a hyphen: a label typed with one of them is the class spelled with "-".
_DASHES = dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d"), "-")


def normalized_text(text: str) -> str:
    """Unicode NFC, runs of whitespace as one space, no space at the ends: what a label or a group value is
    compared as, so that two spellings a person reads as one are one."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def loose_label_key(text: str) -> str:
    """A label as a person may retype it: case, compatibility forms and dash characters set aside."""
    return unicodedata.normalize("NFKC", text).translate(_DASHES).casefold()


def _cell_text(value: Any) -> str | None:
    """A scalar cell as normalized text, None when empty or missing. A whole-number float is written as an int:
    a column read as float (1.0) names the class an int column names 1."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return None
    if isinstance(value, float | np.floating) and float(value).is_integer():
        value = int(value)
    text = normalized_text(str(value))
    return None if text.casefold() in MISSING_TEXTS else text


def _one_label(value: Any) -> str | None:
    """A single label cell's class name; a list of several is a ValueError (a problem row)."""
    if isinstance(value, list | tuple | set | frozenset | np.ndarray):
        items = list(value)
        if len(items) > 1:
            raise ValueError(f"several labels in one cell ({', '.join(map(str, items))}); gunsound takes one "
                             "class per clip")
        value = items[0] if items else None
    if isinstance(value, dict):
        raise ValueError("a mapping in the label cell, not a class name")
    return _cell_text(value)


def _is_hot(value: Any) -> bool | None:
    """A one-hot cell: True (1), False (0 or empty), None when it is neither."""
    text = _cell_text(value) if not isinstance(value, bool | np.bool_) else str(bool(value))
    if text is None:
        return False
    folded = text.casefold()
    return True if folded in ("1", "1.0", "true") else False if folded in ("0", "0.0", "false") else None


def _label_of(row: dict[str, Any], label_columns: list[str]) -> str | None:
    """One class name per row: the value of a single label column, or the one column set to 1."""
    if len(label_columns) == 1:
        return _one_label(row[label_columns[0]])
    hot = []
    for c in label_columns:
        state = _is_hot(row[c])
        if state is None:
            raise ValueError(f"label column {c!r} holds {row[c]!r}, not 0 or 1 (several dataset.label_columns are "
                             "one-hot columns)")
        if state:
            hot.append(c)
    if len(hot) > 1:
        raise ValueError(f"several label columns set: {hot}")
    return hot[0] if hot else None


def _check_one_hot(frame: pd.DataFrame, label_columns: list[str], source: str) -> None:
    """Several label columns are one-hot (0/1); where no cell of them is set they are not, and every row would
    be an "empty label"."""
    if len(label_columns) < 2 or frame.empty:
        return
    if len(set(label_columns)) < len(label_columns):
        twice = sorted({c for c in label_columns if label_columns.count(c) > 1})
        raise ManifestError(source, [Problem(-1, "", f"dataset.label_columns {label_columns} lists {twice} twice")])
    if any(_is_hot(v) for c in label_columns for v in frame[c]):
        return
    examples = ", ".join(f"{c}={frame[c].iloc[0]!r}" for c in label_columns)
    raise ManifestError(source, [Problem(-1, "", (
        f"dataset.label_columns {label_columns}: no row sets any of them to 1 (row 0: {examples}); several label "
        "columns are read as one-hot columns (0/1, one set per clip), which these are not: for a column of class "
        "names list that one alone"))])


def _spelling_problems(rows: list[dict[str, Any]]) -> list[Problem]:
    """Labels that differ only in case, compatibility form or dash character are one class spelled two ways:
    every row of a spelling other than the most common one is a problem row."""
    spellings: dict[str, Counter] = {}
    for row in rows:
        spellings.setdefault(loose_label_key(row["label"]), Counter())[row["label"]] += 1
    chosen = {}
    for counts in spellings.values():
        if len(counts) > 1:
            keep = sorted(counts, key=lambda label: (-counts[label], label))[0]
            chosen.update({label: (keep, counts[keep]) for label in counts if label != keep})
    return [Problem(row["row"], row["rel_path"],
                    f"label {row['label']!r} is {chosen[row['label']][0]!r} ({chosen[row['label']][1]} row(s)) spelled "
                    "another way (case or dashes): spell each class one way")
            for row in rows if row["label"] in chosen]


def load_manifest(cfg: Config, data: str | None = None, drop_bad_rows: bool = False,
                  key: DataframeKey = "train_dataframe") -> Manifest:
    """Read, check and return the manifest of the dataframe `key` names (training, by default); every problem
    is reported at once."""
    dcfg = cfg.dataset
    loc = locate(dcfg, data, key)
    notes = [loc.note] if loc.note else []
    if loc.layout == "folder_per_class":
        gcol = dcfg.group_fold_column
        if gcol is not None and gcol != dcfg.audio_column:
            # A config made for a dataframe (small_data.yaml groups by package) still trains on folders, by file.
            notes.append(f"dataset.group_fold_column {gcol!r} is not used: {loc.data_folder} is read as folder "
                         "per class (<class>/<audio file>), which has no column to group by, so folds group by "
                         f"file; give the data a dataframe with a {gcol!r} column to group by it")
            log.warning("%s", notes[-1])
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
        if group_col == audio_col:  # the seed config's `image`: a group per file
            group_col = None
        _check_one_hot(frame, label_cols, source)
    log.info("dataset %s (%s layout, %d rows, data folder %s)", source, loc.layout, len(frame), loc.data_folder)

    problems: list[Problem] = []
    rows = []
    seen: dict[str, int] = {}
    background = normalized_text(dcfg.background_label)
    classes = [normalized_text(c) for c in dcfg.classes] if dcfg.classes else None
    known = set(classes) | {background} if classes else None
    group_spelling: dict[str, str] = {}
    merged: dict[str, set[str]] = {}
    for i, row in enumerate(frame.to_dict("records")):
        rel = str(row[audio_col]).strip() if row[audio_col] is not None else ""
        try:
            label = _label_of(row, label_cols)
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
            problems.append(Problem(i, rel, f"unknown label {label!r} (dataset.classes: {sorted(classes)})"))
            continue
        group = _cell_text(row[group_col]) if group_col else norm
        if group is None:
            # str(NaN) would make every clip without a group one group, all on one side of every split
            problems.append(Problem(i, rel, f"empty dataset.group_fold_column ({group_col!r}) value"))
            continue
        if group_col:  # "Session0" and "session0 " are one session: never on both sides of a split
            first = group_spelling.setdefault(group.casefold(), group)
            if first != group:
                merged.setdefault(first, set()).add(group)
            group = first
        rows.append({"row": i, "rel_path": norm, "path": storage.join(loc.data_folder, *norm.split("/")),
                     "label": label, "group": group})
    if merged:
        log.warning("%s: dataset.group_fold_column %r values that differ only in case are one group: %s", source,
                    group_col, "; ".join(f"{first!r} also as {', '.join(map(repr, sorted(others)))}"
                                         for first, others in sorted(merged.items())[:10]))
    if known is None:
        problems.extend(_spelling_problems(rows))

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
    classes = classes or sorted(set(checked["label"]) - {background})
    if not classes:
        raise ManifestError(source, [Problem(-1, "", "no class labels besides background")])
    return Manifest(checked, classes, source, dropped=sorted(problems, key=lambda p: p.row),
                    group_by=group_col or "file", notes=notes)


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
        raise ManifestError(manifest.source, [Problem(-1, "", (
            f"every class has fewer clips than the {k} folds that dataset.validation_size={cfg.validation_size:g} "
            f"makes (the largest, '{counts.index[0]}', has {counts.max()}): add clips or raise "
            "dataset.validation_size"))])
    groups = frame["group"].nunique()
    if groups < k:
        of = "files" if manifest.group_by == "file" else f"groups of dataset.group_fold_column={manifest.group_by!r}"
        raise ManifestError(manifest.source, [Problem(-1, "", (
            f"the {k} folds that dataset.validation_size={cfg.validation_size:g} makes need at least {k} {of}, and "
            f"there are {groups}: raise dataset.validation_size or group by another column"))])
    if counts.min() < k:
        log.warning("the rarest class '%s' has %d clips, fewer than %d folds; its folds will be uneven",
                    counts.index[-1], counts.min(), k)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed % (2**32))
    folds = np.full(len(frame), -1, dtype=np.int64)
    for fold, (_, valid_idx) in enumerate(splitter.split(frame, frame["label"], frame["group"])):
        folds[valid_idx] = fold
    return folds
