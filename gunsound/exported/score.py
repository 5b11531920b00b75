"""Score audio files with an exported gunsound pipeline, without Ray or the gunsound repository.

Needs torch, numpy, pandas, scipy and soundfile (torchaudio for files at another sample rate).
Usage: python score.py AUDIO [AUDIO ...] [--out DIR]
With --out, writes DIR/windows.csv (per-window probabilities), DIR/files.csv (per file: top class, shots)
and DIR/events.csv (per shot: time, class, burst, rounds per minute), as the gunsound scoring job does, file
by file: after a crash, the same command finishes the files not yet in files.csv. Text cells that a
spreadsheet would run as a formula (starting with = + - @) are written with a leading quote.

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
from typing import NoReturn

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


def score_file(model: torch.nn.Module, spec: dict, path: str) -> tuple[pd.DataFrame, dict, list[dict]]:
    """The file's windows (probabilities), its per-file row and its shots, chunk by chunk as the job reads it."""
    sr, classes, s = spec["sample_rate"], spec["classes"], spec["scoring"]
    size = int(round(s["window_seconds"] * sr))
    summary = {"method": s["method"], "threshold": s["threshold"]}
    try:
        duration = info(path).duration
        if duration <= 0:
            raise AudioError(f"{path}: empty audio")
        rows, onsets = [], [np.zeros(0)]
        for chunk in plan_chunks(path, duration, window_seconds=s["window_seconds"], hop_seconds=s["hop_seconds"],
                                 read_seconds=s["read_seconds"]):
            read_start = chunk["read_start"]
            wave, _ = read(path, sr, start=read_start, duration=chunk["read_end"] - read_start)
            starts = np.asarray(chunk["starts"], dtype=float)
            pieces = cut_windows(wave, sr, read_start, starts, size)
            calls = spec["model_windows"]
            with torch.inference_mode():
                probs = np.concatenate([model(torch.from_numpy(pieces[i:i + calls])).numpy()
                                        for i in range(0, len(pieces), calls)])
            rows += [{"file": path, "start": float(st), "end": float(min(st + s["window_seconds"], duration)),
                      "probs": p} for st, p in zip(starts, probs, strict=True)]
            if s["onset_detection"]:
                onsets.append(chunk_onsets(wave, sr, read_start=read_start, owned_start=float(starts[0]),
                                           owned_end=chunk["owned_end"], threshold_db=s["onset_threshold_db"]))
    except (AudioError, OSError) as exc:
        row, _ = summarize_file(path, 0.0, pd.DataFrame(), np.zeros(0), classes, **summary, error=str(exc))
        return pd.DataFrame(columns=["file", "start", "end", "probs"]), row, []
    windows = pd.DataFrame(rows)
    row, events = summarize_file(path, duration, windows, np.concatenate(onsets), classes, **summary)
    if row["status"] == "error":  # non-finite probabilities: the job keeps no windows of such a file either
        windows = windows.iloc[0:0]
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


class Tables:
    """windows.csv, files.csv and events.csv in OUT, appended file by file: a file's windows and shots first,
    its files.csv row last, as its commit. A crash loses at most the file being scored; run again with the
    same OUT, the files already committed are skipped and the rows of the one cut short are dropped. A
    files.csv row commits its file only when it is whole (every column, a known status): a kill can leave a
    table empty or end it inside a row. OUT keeps the identity of the pipeline that wrote it, so two pipelines
    never mix in one table."""

    def __init__(self, out: Path, pipeline_id: str):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        marker = out / "pipeline.id"
        if marker.exists() and marker.read_text().strip() != pipeline_id:
            raise SystemExit(f"{out}: holds tables of another pipeline ({marker}); choose another --out")
        marker.write_text(pipeline_id + "\n")
        self.done: set[str] = set()
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
        with open(path, "a", newline="", encoding="utf-8") as f:
            spreadsheet_safe(frame).to_csv(f, header=new, index=False, lineterminator="\n")
            f.flush()
            os.fsync(f.fileno())

    def commit(self, windows: pd.DataFrame, row: dict, events: list[dict]) -> None:
        self.append("windows", windows)
        self.append("events", pd.DataFrame(events, columns=EVENT_COLUMNS))
        self.append("files", pd.DataFrame([row]))
        self.done.add(row["file"])


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
               "some file is an error row; 1 when the scorer itself failed.")
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
    errors = 0
    for path in args.audio:
        if tables and path in tables.done:
            continue
        windows, row, shots = score_file(model, spec, path)
        if row["status"] == "error":
            errors += 1
            print(f"error: {row['error']}", file=sys.stderr)  # the reason names the file
        else:
            print(f"{path}: {row['duration']:.1f} s, {row['windows']} windows, top {row['top_class']} "
                  f"({row['top_probability']:.3f}), {row['shots']} shots")
        if tables:
            probs = np.stack(windows["probs"].to_numpy()) if len(windows) else np.zeros((0, len(classes)))
            tables.commit(windows.drop(columns="probs").assign(
                **{f"prob_{c}": probs[:, i] for i, c in enumerate(classes)}), row, shots)
    return 3 if errors and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
