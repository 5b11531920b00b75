"""Feature extraction (read, decode, resample, log-mel) through Ray Data against a plain single-process loop
doing the same work on the same files, in one run. Target: Ray at least as fast (ratio >= 1.0) on 2 cores.

    python benchmarks/features_ray_vs_loop.py [--clips-per-class 95] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch
from memory import PeakMemory

from gunsound import audio
from gunsound.config import load_config
from gunsound.features import FeatureParams, LogMelSpectrogram
from gunsound.synthesis import generate_dataset


def plain_loop(paths: list[str], params: FeatureParams, chunk: int, batch: int = 32) -> int:
    frontend = LogMelSpectrogram(params).eval()
    done = 0
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            waves = np.stack([audio.fit_length(audio.read(p, params.sample_rate)[0], chunk) for p in paths[i:i + batch]])
            done += len(frontend(torch.from_numpy(waves)))
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips-per-class", type=int, default=95)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gunsound-bench-"))
    if not (work / "train.pq").exists():
        generate_dataset(work, clips_per_class=args.clips_per_class, seed=0)
    frame = pd.read_parquet(work / "train.pq")
    paths = [str(work / "Gun_Classifier" / p) for p in frame["image"]]
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gun_sound_resnet50.yaml")
    params = FeatureParams.from_config(cfg.audio, 48000)
    chunk_seconds = 2.0
    audio_seconds = float(sum(audio.info(p).duration for p in paths))
    print(f"{len(paths)} clips, {audio_seconds:.0f} s of audio, log-mel {params.n_mels} mels, "
          f"n_fft {params.n_fft}, hop {params.hop_length}, {psutil.cpu_count()} CPUs")

    with PeakMemory() as mem:
        start = time.perf_counter()
        plain_loop(paths, params, int(chunk_seconds * params.sample_rate))
        loop_s = time.perf_counter() - start
    loop_mem = mem.peak

    import ray

    from gunsound.pipeline import feature_dataset, init_ray

    start = time.perf_counter()
    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    startup_s = time.perf_counter() - start
    timings = []
    for _ in range(2):  # first pass: cold workers (torch imported in each); second: warm, as later passes in a job
        with PeakMemory() as mem:
            start = time.perf_counter()
            out = feature_dataset(pd.DataFrame({"path": paths}), params, chunk_seconds).materialize()
            timings.append((time.perf_counter() - start, mem.peak))
        assert out.count() == len(paths)
    (ray_s, ray_mem), (warm_s, warm_mem) = timings

    print(f"{'path':<24}{'clips/s':>10}{'audio s/s':>12}{'wall s':>9}{'peak RSS MiB':>14}")
    print(f"{'plain loop':<24}{len(paths) / loop_s:>10.1f}{audio_seconds / loop_s:>12.1f}{loop_s:>9.2f}"
          f"{loop_mem / 2**20:>14.0f}")
    print(f"{'Ray Data':<24}{len(paths) / ray_s:>10.1f}{audio_seconds / ray_s:>12.1f}{ray_s:>9.2f}"
          f"{ray_mem / 2**20:>14.0f}")
    print(f"{'Ray Data (warm workers)':<24}{len(paths) / warm_s:>10.1f}{audio_seconds / warm_s:>12.1f}{warm_s:>9.2f}"
          f"{warm_mem / 2**20:>14.0f}")
    print(f"Ray start-up (once per job, not in the rows above): {startup_s:.1f} s")
    print(f"speed ratio Ray/loop: cold {loop_s / ray_s:.2f}, warm {loop_s / warm_s:.2f} (target >= 1.0)")


if __name__ == "__main__":
    main()
