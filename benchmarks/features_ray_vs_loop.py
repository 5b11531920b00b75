"""Feature extraction (read, decode, resample, log-mel) through Ray Data against a plain single-process loop
doing the same work on the same files, in one run. Target: Ray at least as fast (ratio >= 1.0) on 2 cores.

    python benchmarks/features_ray_vs_loop.py [--clips-per-class 95] [--repeats 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch
from memory import PeakMemory, scratch_dir

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
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    work = scratch_dir(args.workdir, "gunsound-bench-")
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

    def loop_pass() -> None:
        plain_loop(paths, params, int(chunk_seconds * params.sample_rate))

    loop_runs = [timed(loop_pass)]  # before Ray starts: its peak memory is the loop's alone

    import ray

    from gunsound.ray_features import feature_dataset
    from gunsound.ray_runtime import init_ray, warm_up_workers

    # Start-up, paid once per job and not by the loop either (it has torch imported before its clock starts):
    # Ray itself, then its pooled workers importing torch (init_ray starts that; here we wait for it).
    start = time.perf_counter()
    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_start_s = time.perf_counter() - start
    ray.get(warm_up_workers())
    warm_up_s = time.perf_counter() - start - ray_start_s

    def ray_pass() -> None:
        out = feature_dataset(pd.DataFrame({"path": paths}), params, chunk_seconds).materialize()
        assert out.count() == len(paths)

    ray_runs = [timed(ray_pass)]
    for _ in range(args.repeats - 1):  # interleaved, so drift in the machine's speed hits both paths alike
        loop_runs.append(timed(loop_pass))
        ray_runs.append(timed(ray_pass))

    print(f"{'path':<26}{'clips/s':>10}{'audio s/s':>12}{'wall s':>9}{'peak RSS MiB':>14}")
    # The loop's memory is its first run's, taken before Ray started (later runs would count Ray's processes).
    rows = [("plain loop, first", loop_runs[0]), ("plain loop, median", (median_run(loop_runs)[0], loop_runs[0][1])),
            ("Ray Data, first pass", ray_runs[0]), ("Ray Data, median", median_run(ray_runs))]
    for name, (wall, peak) in rows:
        print(f"{name:<26}{len(paths) / wall:>10.1f}{audio_seconds / wall:>12.1f}{wall:>9.2f}{peak / 2**20:>14.0f}")
    print(f"Ray start-up, once per job (not in the rows above): {ray_start_s:.1f} s, "
          f"then {warm_up_s:.1f} s for its workers to import torch")
    print(f"speed ratio Ray/loop ({args.repeats} runs each): first pass {loop_runs[0][0] / ray_runs[0][0]:.2f}, "
          f"median {median_run(loop_runs)[0] / median_run(ray_runs)[0]:.2f} (target >= 1.0)")


def timed(work) -> tuple[float, int]:
    """Wall seconds and peak RSS (this process and its children, i.e. Ray's workers) of one run."""
    with PeakMemory() as mem:
        start = time.perf_counter()
        work()
        wall = time.perf_counter() - start
    return wall, mem.peak


def median_run(runs: list[tuple[float, int]]) -> tuple[float, int]:
    return sorted(runs)[len(runs) // 2]


if __name__ == "__main__":
    main()
