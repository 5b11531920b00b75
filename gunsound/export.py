"""A self-contained scoring pipeline (Hydrogen Torch's build_scoring_pipelines).

`gunsound export RUN OUT` writes:
    OUT/model.ts        TorchScript: waveform windows (batch, samples) -> per-class probabilities; the log-mel
                        front end and every fold model inside, averaged
    OUT/pipeline.json   sample rate, window and hop, labels, threshold, how it was made
    OUT/score.py        a scorer that needs torch, numpy and soundfile (torchaudio only to resample), not Ray
                        and not this repository:  python score.py AUDIO [AUDIO ...] [--out results.csv]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from gunsound import storage
from gunsound.scoring import ScoringSettings, load_scoring_model, scoring_config

SCORER = '''"""Score audio files with an exported gunsound pipeline. Needs torch, numpy and soundfile only
(torchaudio for files at another sample rate). Usage: python score.py AUDIO [AUDIO ...] [--out results.csv]"""

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

HERE = Path(__file__).resolve().parent


def window_starts(duration, window, hop):
    if duration <= 0:
        return np.zeros(0)
    count = max(1, int(math.ceil(max(duration - window, 0) / hop - 1e-9)) + 1)
    return np.arange(count) * hop


def read(path, start, seconds, target_sr):
    with sf.SoundFile(path) as f:
        sr = f.samplerate
        f.seek(min(int(round(start * sr)), f.frames))
        frames = f.read(frames=int(round(seconds * sr)), dtype="float32", always_2d=True)
    wave = frames.mean(axis=1) if frames.shape[1] > 1 else frames[:, 0]
    if sr != target_sr:
        import torchaudio.functional as AF

        wave = AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), sr, target_sr).numpy()
    return wave


def score_file(model, spec, path, batch_size=64):
    """Per-window probabilities of one file, read a chunk at a time."""
    sr, window, hop = spec["sample_rate"], spec["window_seconds"], spec["hop_seconds"]
    duration = sf.info(path).duration
    starts = window_starts(duration, window, hop)
    size = int(round(window * sr))
    rows = []
    for first in range(0, len(starts), batch_size):
        batch = starts[first:first + batch_size]
        wave = read(path, batch[0], batch[-1] + window - batch[0], sr)
        pieces = []
        for s in batch:
            piece = wave[int(round((s - batch[0]) * sr)):][:size]
            pieces.append(np.pad(piece, (0, size - len(piece))))
        with torch.inference_mode():
            probs = model(torch.from_numpy(np.stack(pieces).astype(np.float32))).numpy()
        rows += [(float(s), float(min(s + window, duration)), p) for s, p in zip(batch, probs)]
    return duration, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audio", nargs="+")
    parser.add_argument("--out", help="CSV of per-window probabilities")
    args = parser.parse_args()
    spec = json.loads((HERE / "pipeline.json").read_text())
    model = torch.jit.load(str(HERE / "model.ts")).eval()
    classes, threshold = spec["classes"], spec["probability_threshold"]
    writer = None
    if args.out:
        handle = open(args.out, "w", newline="")
        writer = csv.writer(handle)
        writer.writerow(["file", "start", "end", *[f"prob_{c}" for c in classes]])
    for path in args.audio:
        duration, rows = score_file(model, spec, path)
        probs = np.stack([p for _, _, p in rows])
        peak = probs.max(axis=0)
        top = int(peak.argmax())
        label = classes[top] if peak[top] >= threshold else "no gunshot"
        print(f"{path}: {duration:.1f} s, {len(rows)} windows, top {label} ({peak[top]:.3f})")
        if writer:
            for start, end, p in rows:
                writer.writerow([path, start, end, *[f"{v:.7f}" for v in p]])
    if writer:
        handle.close()


if __name__ == "__main__":
    main()
'''


def export_pipeline(run: str, out: str, overrides: list[str] | None = None) -> dict:
    """Write the self-contained pipeline for a run (or fold, or model.pt) to OUT (local or s3://)."""
    cfg = scoring_config(run, list(overrides or []))
    model = load_scoring_model(run)
    settings = ScoringSettings.from_config(cfg, model)
    ensemble = model.build()
    example = torch.zeros(2, int(round(settings.window_seconds * model.features.sample_rate)))
    with torch.inference_mode():
        traced = torch.jit.trace(ensemble, example, check_trace=False)
    local = Path(tempfile.mkdtemp(prefix="gunsound-export-")) if storage.is_s3(out) else Path(out)
    local.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(local / "model.ts"))
    spec = {
        "format": "gunsound scoring pipeline v1",
        "classes": model.classes,
        "sample_rate": model.features.sample_rate,
        "window_seconds": settings.window_seconds,
        "hop_seconds": settings.hop_seconds,
        "method": settings.method,
        "probability_threshold": settings.threshold,
        "features": {k: v for k, v in vars(model.features).items()},
        "models": model.sources,
    }
    (local / "pipeline.json").write_text(json.dumps(spec, indent=1))
    (local / "score.py").write_text(SCORER)
    if storage.is_s3(out):
        storage.upload_dir(local, out)
    return spec
