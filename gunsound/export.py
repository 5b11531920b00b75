"""A self-contained scoring pipeline (Hydrogen Torch's build_scoring_pipelines).

`gunsound export RUN OUT` writes:
    OUT/model.pt2       a torch.export program: waveform windows (batch, samples) -> per-class probabilities;
                        the log-mel front end and every fold model inside, averaged; any batch size
    OUT/pipeline.json   sample rate, labels, the scoring settings (window, hop, threshold...), how it was made
    OUT/score.py        a scorer that needs torch, numpy, pandas, scipy and soundfile (torchaudio only to
                        resample), not Ray and not this repository:
                            python score.py AUDIO [AUDIO ...] [--out DIR]
                        It writes the job's three tables as DIR/windows.csv, files.csv and events.csv.

score.py carries the job's own chunk plan, onset detector and per-file summary, copied from
gunsound.scoring's source when the pipeline is exported, so the two give the same windows, files and shots.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from gunsound import scoring, storage
from gunsound.scoring import ScoringSettings, load_scoring_model, scoring_config

# What score.py shares with the Ray job, in the order the script defines them.
SHARED = [scoring.window_starts, scoring.plan_chunks, scoring.detect_onsets, scoring.chunk_onsets,
          scoring.cut_windows, scoring.summarize_file, scoring._bursts]

HEADER = '''"""Score audio files with an exported gunsound pipeline, without Ray or the gunsound repository.

Needs torch, numpy, pandas, scipy and soundfile (torchaudio for files at another sample rate).
Usage: python score.py AUDIO [AUDIO ...] [--out DIR]
With --out, writes DIR/windows.csv (per-window probabilities), DIR/files.csv (per file: top class, shots)
and DIR/events.csv (per shot: time, class, burst, rounds per minute), as the gunsound scoring job does."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from scipy.signal import butter, sosfilt

HERE = Path(__file__).resolve().parent
BLAST_BAND_HZ = {band!r}

# ---- copied from gunsound.scoring when this pipeline was exported: the job's own code
'''

SCRIPT = '''

# ---- this script


def read(path, start, seconds, target_sr):
    """[start, start + seconds) of a file, mono float32 at target_sr (the job's reader, on soundfile)."""
    with sf.SoundFile(path) as f:
        sr = f.samplerate
        first = int(round(start * sr))
        if first:
            f.seek(min(first, f.frames) if f.frames > 0 else first)
        frames = f.read(frames=int(round(seconds * sr)), dtype="float32", always_2d=True)
    wave = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else np.ascontiguousarray(frames[:, 0])
    if not np.all(np.isfinite(wave)):
        raise ValueError(f"{path}: decoded samples contain NaN or infinity")
    if sr != target_sr and wave.size:
        import torchaudio.functional as AF

        wave = AF.resample(torch.from_numpy(wave), sr, target_sr).numpy()
    return wave


def score_file(model, spec, settings, path):
    """The file's windows (probabilities), its per-file row and its shots, chunk by chunk as the job reads it."""
    sr, classes = spec["sample_rate"], spec["classes"]
    size = int(round(settings.window_seconds * sr))
    try:
        duration = sf.info(path).duration
        if duration <= 0:
            raise ValueError(f"{path}: empty audio")
        rows, onsets = [], [np.zeros(0)]
        for chunk in plan_chunks(path, duration, settings):
            wave = read(path, chunk["read_start"], chunk["read_end"] - chunk["read_start"], sr)
            starts = np.asarray(chunk["starts"], dtype=float)
            pieces = cut_windows(wave, sr, chunk["read_start"], starts, size)
            with torch.inference_mode():
                probs = np.concatenate([model(torch.from_numpy(pieces[i:i + settings.batch_size])).numpy()
                                        for i in range(0, len(pieces), settings.batch_size)])
            rows += [{"file": path, "start": float(st), "end": float(min(st + settings.window_seconds, duration)),
                      "probs": p} for st, p in zip(starts, probs)]
            if settings.onset_detection:
                onsets.append(chunk_onsets(wave, sr, chunk["read_start"], starts, chunk["hop"], duration,
                                           settings.onset_threshold_db))
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as exc:
        row, _ = summarize_file(path, 0.0, pd.DataFrame(), np.zeros(0), classes, settings, str(exc))
        return pd.DataFrame(columns=["file", "start", "end", "probs"]), row, []
    windows = pd.DataFrame(rows)
    row, events = summarize_file(path, duration, windows, np.concatenate(onsets), classes, settings)
    return windows, row, events


def write_csv(frame, path):
    """Whole or not at all: a temporary name, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audio", nargs="+")
    parser.add_argument("--out", help="folder for windows.csv, files.csv and events.csv")
    args = parser.parse_args()
    spec = json.loads((HERE / "pipeline.json").read_text())
    settings = SimpleNamespace(**spec["scoring"])
    with warnings.catch_warnings():  # torch.export.load maps its weights read-only; they are never written
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        model = torch.export.load(str(HERE / spec["model"])).module()
    classes = spec["classes"]
    window_tables, file_rows, events = [], [], []
    for path in args.audio:
        windows, row, shots = score_file(model, spec, settings, path)
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
        write_csv(pd.DataFrame(events, columns=["file", "time", "class", "probability", "burst",
                                                "shots_in_burst", "rounds_per_minute"]), out / "events.csv")
    return 1 if any(r["status"] == "error" for r in file_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
'''


def scorer_source() -> str:
    """score.py: its header, the job's shared functions (their source, so there is one implementation), its main."""
    shared = "\n\n".join(inspect.getsource(fn) for fn in SHARED)
    return HEADER.format(band=scoring.BLAST_BAND_HZ) + "\n\n" + shared + SCRIPT


def export_pipeline(run: str, out: str, overrides: list[str] | None = None) -> dict:
    """Write the self-contained pipeline for a run (or fold, or model.pt) to OUT (local or s3://)."""
    cfg = scoring_config(run, list(overrides or []))
    model = load_scoring_model(run)
    settings = ScoringSettings.from_config(cfg, model)
    ensemble = model.build()
    example = torch.zeros(2, int(round(settings.window_seconds * model.features.sample_rate)))
    # torch.export, not TorchScript (deprecated as of torch 2.11); the batch dimension stays free.
    program = torch.export.export(ensemble, (example,),
                                  dynamic_shapes={"waves": {0: torch.export.Dim("batch", min=1)}})
    spec = {
        "format": "gunsound scoring pipeline v2",
        "model": "model.pt2",
        "classes": model.classes,
        "sample_rate": model.features.sample_rate,
        "scoring": asdict(settings),  # method, window_seconds, hop_seconds, threshold, ...
        "features": {k: v for k, v in vars(model.features).items()},
        "models": model.sources,
    }
    with tempfile.TemporaryDirectory(prefix="gunsound-export-") as staging:
        local = Path(out) if storage.is_local(out) else Path(staging)
        local.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(local / "model.pt2"))
        (local / "pipeline.json").write_text(json.dumps(spec, indent=1))
        (local / "score.py").write_text(scorer_source())
        if not storage.is_local(out):
            storage.upload_dir(local, out)
    return spec
