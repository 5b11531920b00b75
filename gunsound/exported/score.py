"""Score audio files with an exported gunsound pipeline, without Ray or the gunsound repository.

Needs torch, numpy, pandas, scipy and soundfile (torchaudio for files at another sample rate).
Usage: python score.py AUDIO [AUDIO ...] [--out DIR]
With --out, writes DIR/windows.csv (per-window probabilities), DIR/files.csv (per file: top class, shots)
and DIR/events.csv (per shot: time, class, burst, rounds per minute), as the gunsound scoring job does.

windows.py, events.py and decode.py beside this file are the scoring job's own modules (chunk plan, onset
detector and per-file summary, audio reader), copied when the pipeline was exported; pipeline.json holds the
classes, the sample rate and the scoring settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the job's modules, shipped beside this file

from decode import AudioError, info, read  # noqa: E402
from events import chunk_onsets, summarize_file  # noqa: E402
from windows import cut_windows, plan_chunks  # noqa: E402

EVENT_COLUMNS = ["file", "time", "class", "probability", "burst", "shots_in_burst", "rounds_per_minute"]


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
            with torch.inference_mode():
                probs = np.concatenate([model(torch.from_numpy(pieces[i:i + s["batch_size"]])).numpy()
                                        for i in range(0, len(pieces), s["batch_size"])])
            rows += [{"file": path, "start": float(st), "end": float(min(st + s["window_seconds"], duration)),
                      "probs": p} for st, p in zip(starts, probs, strict=True)]
            if s["onset_detection"]:
                onsets.append(chunk_onsets(wave, sr, read_start=read_start, starts=starts, hop=chunk["hop"],
                                           duration=duration, threshold_db=s["onset_threshold_db"]))
    except (AudioError, OSError) as exc:
        row, _ = summarize_file(path, 0.0, pd.DataFrame(), np.zeros(0), classes, **summary, error=str(exc))
        return pd.DataFrame(columns=["file", "start", "end", "probs"]), row, []
    windows = pd.DataFrame(rows)
    row, events = summarize_file(path, duration, windows, np.concatenate(onsets), classes, **summary)
    return windows, row, events


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Whole or not at all: a temporary name, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audio", nargs="+")
    parser.add_argument("--out", help="folder for windows.csv, files.csv and events.csv")
    args = parser.parse_args()
    spec = json.loads((HERE / "pipeline.json").read_text())
    with warnings.catch_warnings():  # torch.export.load maps its weights read-only; they are never written
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        model = torch.export.load(str(HERE / spec["model"])).module()
    classes = spec["classes"]
    window_tables, file_rows, events = [], [], []
    for path in args.audio:
        windows, row, shots = score_file(model, spec, path)
        if row["status"] == "error":
            print(f"{path}: error: {row['error']}", file=sys.stderr)
        else:
            print(f"{path}: {row['duration']:.1f} s, {row['windows']} windows, top {row['top_class']} "
                  f"({row['top_probability']:.3f}), {row['shots']} shots")
        probs = np.stack(windows["probs"].to_numpy()) if len(windows) else np.zeros((0, len(classes)))
        window_tables.append(windows.drop(columns="probs").assign(
            **{f"prob_{c}": probs[:, i] for i, c in enumerate(classes)}))
        file_rows.append(row)
        events += shots
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(pd.concat(window_tables, ignore_index=True), out / "windows.csv")
        write_csv(pd.DataFrame(file_rows), out / "files.csv")
        write_csv(pd.DataFrame(events, columns=EVENT_COLUMNS), out / "events.csv")
    return 1 if any(r["status"] == "error" for r in file_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
