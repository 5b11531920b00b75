"""Feature extraction (read, decode, resample, log-mel) through Ray Data against a plain single-process loop
doing the same work on the same files, in one run. Targets on 2 cores: Ray at least as fast (ratio >= 1.0),
and its peak memory (driver and every Ray process: the distinct pages they map, see memory.py) at most twice
the loop's.

    python benchmarks/features_ray_vs_loop.py [--clips-per-class 95] [--repeats 5] [--workdir DIR] [--dashboard]

The local Ray is started as a featurizing or scoring job starts it (no dashboard); --dashboard starts it as
training does (Ray Train needs the dashboard's State API), to show what that adds.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch
from memory import PeakMemory, describe_roles, mib, private_by_role, scratch_dir

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
    parser.add_argument("--dashboard", action="store_true", help="start Ray as training does, with its dashboard")
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

    loop_runs = [timed(loop_pass, pss=True)]  # before Ray starts: its peak memory is the loop's alone

    import ray

    from gunsound.ray_features import feature_bytes, feature_dataset
    from gunsound.ray_runtime import init_ray, object_store_bytes_for, warm_up_workers

    # The loop's freed buffers go back to the system before Ray starts, so that the Ray rows count what a
    # featurizing job's driver holds (torch imported), not the loop's leftovers in this process.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    driver_rss = psutil.Process().memory_info().rss

    # Start-up, paid once per job and not by the loop either (it has torch imported before its clock starts):
    # Ray itself, then its pooled workers importing torch (init_ray starts that; here we wait for it).
    start = time.perf_counter()
    init_ray(dashboard=args.dashboard,  # the object store sized to what the pass keeps in it
             object_store_bytes=object_store_bytes_for(feature_bytes(len(paths), params, chunk_seconds)))
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_start_s = time.perf_counter() - start
    ray.get(warm_up_workers())
    warm_up_s = time.perf_counter() - start - ray_start_s

    def ray_pass() -> None:
        out = feature_dataset(pd.DataFrame({"path": paths}), params, chunk_seconds).materialize()
        assert out.count() == len(paths)

    ray_runs = [timed(ray_pass, pss=True)]
    roles = private_by_role(PeakMemory.processes(), os.getpid())  # the workers stay, holding what the pass left
    for _ in range(args.repeats - 1):  # interleaved, so drift in the machine's speed hits both paths alike
        loop_runs.append(timed(loop_pass))
        ray_runs.append(timed(ray_pass))

    print(f"{'path':<24}{'clips/s':>9}{'audio s/s':>11}{'wall s':>8}{'peak MiB: pages':>17}{'PSS':>7}{'RSS':>7}")
    # Memory is the first run's of each path: the loop's taken before Ray started (later runs would count Ray's
    # processes), PSS and pages sampled only there so that they cost the timed medians nothing.
    loop_mem, ray_mem = loop_runs[0][1:], ray_runs[0][1:]
    rows = [("plain loop, first", loop_runs[0]), ("plain loop, median", (median_run(loop_runs)[0], *loop_mem)),
            ("Ray Data, first pass", ray_runs[0]), ("Ray Data, median", (median_run(ray_runs)[0], *ray_mem))]
    for name, (wall, rss, pss, pages) in rows:
        print(f"{name:<24}{len(paths) / wall:>9.1f}{audio_seconds / wall:>11.1f}{wall:>8.2f}"
              f"{mib(pages):>17}{mib(pss):>7}{mib(rss):>7}")
    print(f"Ray start-up, once per job (not in the rows above): {ray_start_s:.1f} s, "
          f"then {warm_up_s:.1f} s for its workers to import torch; object store "
          f"{ray.cluster_resources()['object_store_memory'] / 2**20:.0f} MiB, driver RSS at start {driver_rss / 2**20:.0f} MiB")
    print(f"speed ratio Ray/loop ({args.repeats} runs each): first pass {loop_runs[0][0] / ray_runs[0][0]:.2f}, "
          f"median {median_run(loop_runs)[0] / median_run(ray_runs)[0]:.2f} (target >= 1.0)")
    (loop_rss, loop_pss, loop_pages), (ray_rss, ray_pss, ray_pages) = loop_mem, ray_mem
    pages = f"distinct pages {ray_pages / loop_pages:.2f} (target <= 2.0), " if loop_pages and ray_pages else ""
    print(f"peak memory Ray/loop (Ray {'with' if args.dashboard else 'without'} its dashboard): {pages}"
          f"PSS {ray_pss / loop_pss:.2f}, RSS {ray_rss / loop_rss:.2f}")
    print(f"private memory after the first Ray pass (USS): {describe_roles(roles)}")


def timed(work, pss: bool = False) -> tuple[float, int, int, int | None]:
    """Wall seconds, then the peak memory of this process and every process of its Ray during one run: summed
    RSS, and with `pss` summed PSS and distinct pages (None where they cannot be read), in bytes."""
    with PeakMemory(pss=pss) as mem:
        start = time.perf_counter()
        work()
        wall = time.perf_counter() - start
    return wall, mem.peak, mem.peak_pss, mem.peak_unique


def median_run(runs: list) -> tuple:
    return sorted(runs)[len(runs) // 2]


if __name__ == "__main__":
    main()
