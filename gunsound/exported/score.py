"""Score audio files with an exported gunsound pipeline, without Ray or the gunsound repository.

Needs torch, numpy, pandas, scipy and soundfile (torchaudio for files at another sample rate).
Usage: python score.py AUDIO [AUDIO ...] [--out DIR]
With --out, writes DIR/windows.csv (per-window probabilities), DIR/files.csv (per file: top class, shots)
and DIR/events.csv (per shot: time, class, burst, rounds per minute), as the gunsound scoring job does, file
by file: after a crash, the same command finishes the files not yet in files.csv. Text cells that a
spreadsheet would run as a formula (starting with = + - @) are written with a leading quote, and a byte of a
file name that is not UTF-8 as \\xNN, so that the tables are always UTF-8.

windows.py, onsets.py, events.py and decode.py beside this file are the scoring job's own modules (chunk
plan, shot detector, per-file summary, audio reader), copied when the pipeline was exported; pipeline.json
holds the classes, the sample rate and the scoring settings.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import BinaryIO, NoReturn

import numpy as np
import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the job's modules, shipped beside this file

from decode import AudioError, info, read  # noqa: E402
from events import summarize_file  # noqa: E402
from onsets import chunk_onsets  # noqa: E402
from windows import cut_windows, plan_chunks  # noqa: E402

EVENT_COLUMNS = ["file", "time", "class", "probability", "burst", "shots_in_burst", "rounds_per_minute"]
STATUSES = ("ok", "error")  # the statuses a files.csv row can have (events.summarize_file)
TABLES = ("windows", "events", "files")  # in the order a file's rows are written: files.csv last, its commit
WINDOW_COLUMNS = ["file", "start", "end", "probs"]


def shown(path: str) -> str:
    """A file name as the tables and messages write it: a byte of the name that is not UTF-8 (Python holds it
    as a lone surrogate, which no UTF-8 writer takes) as \\xNN; any other name as it is."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def described(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def opened(path: str, what: str) -> BinaryIO:
    """The file opened by Python, which takes any name the system does (soundfile encodes a name as strict
    UTF-8 and refuses one that is not); why it cannot be opened (no such file) is an AudioError."""
    try:
        return open(path, "rb")
    except OSError as exc:
        raise AudioError(path, f"{what}: [Errno {exc.errno}] {exc.strerror}" if exc.strerror else
                         f"{what}: {exc}") from exc


def header(path: str) -> tuple[float, str]:
    """(duration, "") or (duration or NaN, why the file cannot be scored), as the job reads a header."""
    try:
        with opened(path, "unreadable audio") as f:
            found = info(path, f)
    except Exception as exc:  # whatever one file raises is that file's error row
        return float("nan"), exc.reason if isinstance(exc, AudioError) else f"unreadable audio: {described(exc)}"
    if found.frames <= 0:
        return 0.0, "empty: no samples"
    return found.duration, ""


def score_file(model: torch.nn.Module, spec: dict, path: str) -> tuple[pd.DataFrame, dict, list[dict]]:
    """The file's windows (probabilities), its per-file row and its shots, chunk by chunk as the job reads it;
    the row as the job writes it: an error row has the header's duration (NaN where it could not be read) and
    no windows, the first failed read's reason, and a file shorter than a window the job's note."""
    sr, classes, s = spec["sample_rate"], spec["classes"], spec["scoring"]
    name = shown(path)
    size = int(round(s["window_seconds"] * sr))
    summary = {"method": s["method"], "threshold": s["threshold"], "window_seconds": s["window_seconds"]}
    duration, error = header(path)
    rows, onsets = [], [np.zeros(0)]
    chunks = [] if error else plan_chunks(path, duration, window_seconds=s["window_seconds"],
                                          hop_seconds=s["hop_seconds"], read_seconds=s["read_seconds"])
    for chunk in chunks:
        read_start = chunk["read_start"]
        try:
            with opened(path, "cannot decode audio") as f:
                wave, _ = read(path, sr, start=read_start, duration=chunk["read_end"] - read_start, source=f)
        except Exception as exc:  # whatever one file raises is that file's error row
            why = exc.reason if isinstance(exc, AudioError) else f"cannot decode audio: {described(exc)}"
            error = f"decode failed: {name}: {why}"
            break
        starts = np.asarray(chunk["starts"], dtype=float)
        pieces = cut_windows(wave, sr, read_start, starts, size)
        calls = spec["model_windows"]
        with torch.inference_mode():
            probs = np.concatenate([model(torch.from_numpy(pieces[i:i + calls])).numpy()
                                    for i in range(0, len(pieces), calls)])
        rows += [{"file": name, "start": float(st), "end": float(min(st + s["window_seconds"], duration)),
                  "probs": p} for st, p in zip(starts, probs, strict=True)]
        if s["onset_detection"]:
            onsets.append(chunk_onsets(wave, sr, read_start=read_start, owned_start=float(starts[0]),
                                       owned_end=chunk["owned_end"], threshold_db=s["onset_threshold_db"]))
    if error:
        none = pd.DataFrame(columns=WINDOW_COLUMNS)
        row, _ = summarize_file(name, duration, none, np.zeros(0), classes, **summary, error=error)
        return none, row, []
    windows = pd.DataFrame(rows)
    row, events = summarize_file(name, duration, windows, np.concatenate(onsets), classes, **summary)
    if row["status"] == "error":  # non-finite probabilities: the job keeps no windows of such a file either
        return windows.iloc[0:0], row, []
    return windows, row, events


# A spreadsheet runs a cell that starts with one of these as a formula; such values (and those starting with the
# quote itself, so that reading back is exact) are written with a leading quote.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    text = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    return frame.assign(**{c: [f"'{v}" if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v
                               for v in frame[c]] for c in text})


def read_back(value: str) -> str:
    return value[1:] if value.startswith("'") else value


def whole_rows(data: bytes) -> int:
    """How many bytes of a CSV table hold whole rows: every row ends with a line end, so what follows the last
    line end outside a quoted cell is a row a kill cut short."""
    end = data.rfind(b"\n")
    while end >= 0 and data.count(b'"', 0, end) % 2:  # odd: the line end is inside a quoted cell (a file name)
        end = data.rfind(b"\n", 0, end)
    return end + 1


class Unwritten(Exception):
    """A file's rows could not all be written (a full disk); the tables are as they were before them."""


class Tables:
    """windows.csv, files.csv and events.csv in OUT, appended file by file: a file's windows and shots first,
    its files.csv row last, as its commit. A crash loses at most the file being scored; run again with the
    same OUT, the files already committed are skipped and the rows of the one cut short are dropped. A
    files.csv row commits its file only when it is whole (every column, a known status): a kill can leave a
    table empty or end it inside a row. OUT keeps the identity of the pipeline that wrote it, so two pipelines
    never mix in one table. `done` holds the committed files (as `shown` names them), `failed` those of them
    whose row is an error: --strict counts them on a rerun too."""

    def __init__(self, out: Path, pipeline_id: str):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        marker = out / "pipeline.id"
        if marker.exists() and marker.read_text().strip() != pipeline_id:
            raise SystemExit(f"{out}: holds tables of another pipeline ({marker}); choose another --out")
        marker.write_text(pipeline_id + "\n")
        self.done: set[str] = set()
        self.failed: set[str] = set()
        text = self.whole("files")
        if text:
            try:
                header, *rows = list(csv.reader(io.StringIO(text, newline="")))
            except csv.Error as exc:
                self.unreadable("files", exc)
            if "file" not in header or "status" not in header:
                self.unreadable("files", f"its header {header} has no file and status columns")
            name, status = header.index("file"), header.index("status")
            complete = [r for r in rows if len(r) == len(header) and r[status] in STATUSES and r[name]]
            if len(complete) < len(rows):  # not commits: their files are scored again
                self.replace("files", pd.DataFrame(complete, columns=header, dtype=str))
            self.done = {read_back(r[name]) for r in complete}
            self.failed = {read_back(r[name]) for r in complete if r[status] == "error"}
        for table in ("windows", "events"):
            text = self.whole(table)
            if not text:
                continue
            try:
                rows = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
            except ValueError as exc:  # pandas.errors.ParserError among them
                self.unreadable(table, exc)
            if "file" not in rows.columns:
                self.unreadable(table, f"its header {list(rows.columns)} has no file column")
            kept = rows[rows["file"].map(read_back).isin(self.done)]
            if len(kept) < len(rows):
                self.replace(table, kept)

    def whole(self, table: str) -> str:
        """The table's whole rows as text, header first ('' when it has none: missing, empty or cut inside its
        header). A row a kill cut short is cut off the file too, so that the next row starts a line of its own."""
        path = self.out / f"{table}.csv"
        if not path.exists():
            return ""
        data = path.read_bytes()
        end = whole_rows(data)
        try:
            text = data[:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            self.unreadable(table, exc)
        if end < len(data):
            os.truncate(path, end)
        return text

    def unreadable(self, table: str, why: object) -> NoReturn:
        raise SystemExit(f"{self.out / table}.csv: cannot be read back to resume ({why}); remove windows.csv, "
                         f"files.csv and events.csv from {self.out} to score every file again, or choose another "
                         "--out")

    def replace(self, table: str, frame: pd.DataFrame) -> None:
        path = self.out / f"{table}.csv"
        tmp = path.with_name(f".{path.name}.tmp")
        frame.to_csv(tmp, index=False, lineterminator="\n")
        os.replace(tmp, path)

    def append(self, table: str, frame: pd.DataFrame) -> None:
        path = self.out / f"{table}.csv"
        new = not path.exists() or path.stat().st_size == 0
        if not new:  # the columns in the order the file already has
            frame = frame.reindex(columns=pd.read_csv(path, nrows=0).columns)
        with open(path, "a", newline="", encoding="utf-8", errors="backslashreplace") as f:
            spreadsheet_safe(frame).to_csv(f, header=new, index=False, lineterminator="\n")
            f.flush()
            os.fsync(f.fileno())

    def commit(self, windows: pd.DataFrame, row: dict, events: list[dict]) -> None:
        """Append a file's rows, files.csv last. Where they cannot all be written, each table is cut back to
        where it ended before them and Unwritten says why: no row of the file is left to mix with the next
        file's, and the next run scores it again."""
        paths = [self.out / f"{table}.csv" for table in TABLES]
        ends = [p.stat().st_size if p.exists() else 0 for p in paths]
        try:
            self.append("windows", windows)
            self.append("events", pd.DataFrame(events, columns=EVENT_COLUMNS))
            self.append("files", pd.DataFrame([row]))
        except Exception as exc:
            for path, end in zip(paths, ends, strict=True):
                if path.exists():
                    os.truncate(path, end)
            raise Unwritten(described(exc)) from exc
        self.done.add(row["file"])
        if row["status"] == "error":
            self.failed.add(row["file"])


def pipeline_identity() -> str:
    digest = hashlib.sha256((HERE / "pipeline.json").read_bytes())
    with open(HERE / json.loads((HERE / "pipeline.json").read_text())["model"], "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Exit status: 0 when every file was scored or reported as an error row; 3 with --strict when "
               "some listed file is an error row (of this run or committed before); 1 when the scorer itself "
               "failed, or could not write some file's rows (the other files are scored; run again with the "
               "same --out).")
    parser.add_argument("audio", nargs="+")
    parser.add_argument("--out", help="folder for windows.csv, files.csv and events.csv (a rerun resumes)")
    parser.add_argument("--strict", action="store_true", help="exit 3 when any file could not be scored")
    args = parser.parse_args()
    spec = json.loads((HERE / "pipeline.json").read_text())
    with warnings.catch_warnings():  # torch.export.load maps its weights read-only; they are never written
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        model = torch.export.load(str(HERE / spec["model"])).module()
    classes = spec["classes"]
    tables = Tables(Path(args.out), pipeline_identity()) if args.out else None
    failed: set[str] = set()  # the listed files whose row is an error, this run's or committed before
    unwritten = 0
    for path in args.audio:
        name = shown(path)
        if tables and name in tables.done:
            if name in tables.failed:
                failed.add(name)
            continue
        windows, row, shots = score_file(model, spec, path)
        if row["status"] == "error":
            failed.add(name)
            print(f"error: {name}: {row['error']}", file=sys.stderr)
        else:
            print(f"{name}: {row['duration']:.1f} s, {row['windows']} windows, top {row['top_class']} "
                  f"({row['top_probability']:.3f}), {row['shots']} shots")
        if tables:
            probs = np.stack(windows["probs"].to_numpy()) if len(windows) else np.zeros((0, len(classes)))
            try:
                tables.commit(windows.drop(columns="probs").assign(
                    **{f"prob_{c}": probs[:, i] for i, c in enumerate(classes)}), row, shots)
            except Unwritten as exc:  # this file only: the next one may fit (a disk that filled, then freed)
                unwritten += 1
                print(f"error: {name}: its rows could not be written ({exc}); not committed, a rerun with the "
                      "same --out scores it", file=sys.stderr)
    if unwritten:
        return 1
    return 3 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
