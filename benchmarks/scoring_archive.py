"""Batch scoring of a generated archive (an hour of background audio with shots at known times) by the Ray
job, against a naive loop that loads each whole file and scores it window by window; in one run, same model.

Prints audio-seconds per wall-second and peak memory of both, the model stage's FLOP rate as a fraction of
this machine's measured matmul rate, the job's peak memory on a 60-minute file against a 1-minute file
(target: within 1.2x), event recall and timing error against the known shot times, and per burst of
shots the count and rate of fire the job reports against the true ones.

    python benchmarks/scoring_archive.py [--minutes 60] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from memory import PeakMemory, scratch_dir
from torch.utils.flop_counter import FlopCounterMode

from gunsound import audio, scoring, training
from gunsound.config import load_config
from gunsound.inference import ScoringModel, load_scoring_model
from gunsound.plan import prepare
from gunsound.synthesis import generate_archive, generate_dataset
from gunsound.windows import window_starts

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["architecture.backbone=resnet18", "training.epochs=2", "dataset.folds=[0]"]
SLIDING = ["prediction.inference_chunk_method=Sliding", "scoring.hop_seconds=1.0"]


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def naive_loop(model: ScoringModel, path: str, s: scoring.ScoringSettings) -> int:
    """Load the whole file, then one window at a time (the EfficientAT-style loop)."""
    net = model.build()
    wave, sr = audio.read(path, model.features.sample_rate)
    window = int(s.window_seconds * sr)
    count = 0
    with torch.inference_mode():
        for start in window_starts(len(wave) / sr, s.window_seconds, s.hop_seconds):
            piece = wave[int(start * sr): int(start * sr) + window]
            piece = np.pad(piece, (0, window - len(piece)))
            net(torch.from_numpy(piece)[None])
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--naive-minutes", type=float, default=10.0,
                        help="audio for the naive loop (it is slow); rates are per audio-second")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = scratch_dir(args.workdir, "gunsound-score-bench-")

    run = work / "run"
    if not (run / "ensemble.json").exists():
        generate_dataset(work / "data", clips_per_class=20, seed=0)
        cfg = load_config(ROOT / "configs" / "laptop.yaml", MODEL)
        training.run(prepare(cfg, str(work / "data"), str(run)))
    long_path, short_path, naive_path = work / "long" / "hour.wav", work / "short" / "minute.wav", work / "naive.wav"
    if not long_path.exists():
        truth = generate_archive(long_path, args.minutes, bursts_per_minute=2, seed=1)
        truth.to_parquet(work / "truth.parquet")
        generate_archive(short_path, 1.0, bursts_per_minute=2, seed=2)
        generate_archive(naive_path, args.naive_minutes, bursts_per_minute=2, seed=3)
    truth = pd.read_parquet(work / "truth.parquet")
    cfg = scoring.scoring_config(str(run), [*SLIDING, "prediction.probability_threshold=0.0"])
    model = load_scoring_model(str(run))
    s = scoring.ScoringSettings.from_config(cfg, model_chunk_seconds=model.chunk_seconds)

    from gunsound.ray_runtime import init_ray

    init_ray(feature_tasks=False)  # as `gunsound score` does
    # The memory pair runs one scorer actor each, so that it compares file lengths, not parallelism (by
    # default a job starts one actor per CPU, up to one per chunk); then the long file with the default.
    long_name = f"{args.minutes:g}-minute file"
    results = {}
    for name, folder, extra in (("1-minute file, 1 actor", short_path.parent, ["scoring.actors=1"]),
                                (f"{long_name}, 1 actor", long_path.parent, ["scoring.actors=1"]),
                                (long_name, long_path.parent, [])):
        out = work / f"scored-{folder.name}-{int(time.time() * 1000)}"
        run_cfg = scoring.scoring_config(str(run), [*SLIDING, "prediction.probability_threshold=0.0", *extra])
        with PeakMemory(pss=False) as mem:
            summary = scoring.score(str(run), str(folder), str(out), run_cfg)
        results[name] = (summary, mem.peak, out)

    with PeakMemory(pss=False) as mem:
        start = time.perf_counter()
        naive_windows = naive_loop(model, str(naive_path), s)
        naive_s = time.perf_counter() - start
    naive_peak = mem.peak

    with FlopCounterMode(display=False) as counter:
        model.build()(torch.zeros(1, int(s.window_seconds * model.features.sample_rate)))
    flops_per_window = counter.get_total_flops()
    peak_rate = matmul_rate()

    print(f"model: {len(model.artifacts)}-fold ensemble of resnet18, {flops_per_window / 1e9:.2f} GFLOP per "
          f"{s.window_seconds:g} s window, hop {s.hop_seconds:g} s; machine matmul rate {peak_rate / 1e9:.0f} GFLOP/s")
    # The model stage's rate: FLOPs over the time its actors spent in the model, as they run side by side.
    print(f"{'path':<34}{'audio s/s':>11}{'peak RSS MiB':>14}{'scorers':>8}{'model GFLOP/s':>15}{'of matmul':>11}")
    for name, (summary, peak, _) in results.items():
        windows = len(pd.read_parquet(summary.output + "/windows"))
        scorers = summary.scorer_actors * summary.calls_per_actor  # scoring calls side by side
        rate = windows * flops_per_window / max(summary.model_seconds / max(scorers, 1), 1e-9)
        print(f"{'job, ' + name:<34}{summary.audio_seconds_per_second:>11.1f}{peak / 2**20:>14.0f}"
              f"{scorers:>8}{rate / 1e9:>15.1f}{rate / peak_rate:>11.0%}")
    naive_audio = args.naive_minutes * 60
    naive_rate = naive_windows * flops_per_window / naive_s
    print(f"{'naive loop, ' + format(args.naive_minutes, 'g') + ' min':<34}{naive_audio / naive_s:>11.1f}"
          f"{naive_peak / 2**20:>14.0f}{'-':>8}{naive_rate / 1e9:>15.1f}{naive_rate / peak_rate:>11.0%}")
    (_, short_peak, _), (_, long_peak, _), (long_summary, _, long_out) = results.values()
    print(f"job peak memory, {long_name} vs 1-minute file (1 actor each): {long_peak / short_peak:.2f}x "
          f"(target <= 1.2)")
    print(f"speed-up of the job over the naive loop: "
          f"{long_summary.audio_seconds_per_second / (naive_audio / naive_s):.1f}x")
    events = pd.read_parquet(long_out / "events")
    errors = np.array([np.abs(events["time"] - t).min() if len(events) else np.inf for t in truth["time"]])
    hit = errors < 0.02
    print(f"events: {len(events)} detected, {len(truth)} true shots; recall at 20 ms {hit.mean():.2f}; "
          f"median timing error {np.median(errors[hit]) * 1000:.1f} ms")
    print(burst_figures(truth, events))


def burst_figures(truth: pd.DataFrame, events: pd.DataFrame, max_gap: float = 0.5) -> str:
    """Per true burst of automatic fire (shots under max_gap apart, as the job groups them): its shot count
    and rate of fire against the job's burst that holds most of its detected shots."""
    times = np.sort(truth["time"].to_numpy())
    starts = np.r_[0, np.where(np.diff(times) >= max_gap)[0] + 1]
    count_errors, rate_errors = [], []
    for true_burst in np.split(times, starts[1:]):
        if len(true_burst) < 2:
            continue
        inside = events[(events["time"] > true_burst[0] - 0.02) & (events["time"] < true_burst[-1] + 0.02)]
        if inside.empty:
            count_errors.append(len(true_burst))
            rate_errors.append(np.inf)
            continue
        found = inside[inside["burst"] == inside["burst"].mode().iloc[0]]
        count_errors.append(abs(len(found) - len(true_burst)))
        true_rate, rate = 60 / np.median(np.diff(true_burst)), found["rounds_per_minute"].iloc[0]
        rate_errors.append(abs(rate - true_rate) / true_rate if np.isfinite(rate) else np.inf)  # one shot: no rate
    return (f"bursts (2+ shots under {max_gap:g} s apart): {len(count_errors)}; shots per burst exact in {np.mean(np.equal(count_errors, 0)):.0%}, "
            f"median error {np.median(count_errors):.0f}; rate of fire median error {np.median(rate_errors):.1%}, "
            f"within 5% in {np.mean(np.less(rate_errors, 0.05)):.0%}")


if __name__ == "__main__":
    main()
