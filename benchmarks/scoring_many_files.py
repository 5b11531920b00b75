"""Scoring many short files (generated clips of 0.5 to 3 s) with the Ray job, against the model-bound rate
(the job's scorer fed batches of 64 windows in this process, both cores) and a plain in-process loop; in one
run, same model.

Prints, per archive size (default 2,000 and 20,000 files): files/s and windows/s of the whole job (a
`python -m ray_jobs.score` process, Ray's start included) and as a fraction of the model-bound windows/s
(target >= 50% at 20,000 files), the time to the first committed shard (target: independent of the archive
size), the driver's peak RSS (target: 20,000 files within 1.2x of 2,000) and the peak RSS of the job's whole
process tree beside the plain loop's. With --baseline-tree (a checkout of another commit) the same jobs run
on that code too, for a before/after in the same run.

    python benchmarks/scoring_many_files.py [--files 2000 20000] [--model RUN] [--workdir DIR]
                                            [--baseline-tree DIR] [--baseline-files 2000] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import soundfile as sf
import torch
from memory import PeakMemory, describe_roles, mib, private_by_role, scratch_dir

from gunsound import scoring, storage, training
from gunsound.config import load_config
from gunsound.inference import WindowScorer, load_scoring_model
from gunsound.plan import prepare
from gunsound.synthesis import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["architecture.backbone=resnet18", "training.epochs=2", "dataset.folds=[0]"]


def make_clips(folder: Path, count: int, sample_rate: int, seed: int = 0) -> list[Path]:
    """`count` mono 16-bit clips of 0.5 to 3 s: background noise with one to three decaying blasts each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i // 1000:03d}" / f"clip{i:06d}.wav"
        paths.append(path)
        if path.exists():
            continue
        path.parent.mkdir(exist_ok=True)
        n = int(rng.uniform(0.5, 3.0) * sample_rate)
        wave = rng.normal(0, 0.01, n)
        for at in rng.integers(0, n, rng.integers(1, 4)):
            length = min(n - at, sample_rate // 4)
            decay = np.exp(-np.arange(length) / (0.02 * sample_rate))
            wave[at:at + length] += rng.uniform(0.1, 0.8) * decay * rng.normal(0, 1, length)
        sf.write(path, np.clip(wave, -1, 1).astype(np.float32), sample_rate, subtype="PCM_16")
    return paths


def model_bound(model, windows: np.ndarray, batches: int) -> tuple[float, int]:
    """Windows/s of the job's scorer fed batches of 64 windows in this process (no reading, no Ray), and how
    many windows it gives the model a call."""
    scorer = WindowScorer(model, batch_size=64)
    scorer({"wave": windows[:64].copy()})  # warm-up
    start = time.perf_counter()
    for i in range(batches):
        scorer({"wave": windows[(i * 64) % (len(windows) - 63):][:64].copy()})
    return batches * 64 / (time.perf_counter() - start), scorer.batch_size


def plain_loop(model, paths: list[Path], s: scoring.ScoringSettings) -> tuple[float, int]:
    """Files one after another in this process: read, cut into windows, scored 64 windows at a time."""
    scorer = WindowScorer(model, batch_size=64)
    pending, windows, start = [], 0, time.perf_counter()
    for path in paths:
        for chunk in s.plan(str(path), sf.info(path).duration):
            batch = {k: np.array([v], dtype=object) for k, v in chunk.items()}
            cut = scoring.read_chunks(batch, sample_rate=model.features.sample_rate, window_seconds=s.window_seconds,
                                      onset_detection=s.onset_detection, onset_threshold_db=s.onset_threshold_db,
                                      s3=storage.current_settings())
            pending.append(cut["wave"])
        if sum(len(w) for w in pending) >= 64:
            waves = np.concatenate(pending)
            windows += len(waves)
            scorer({"wave": waves})
            pending = []
    if pending:
        windows += sum(len(w) for w in pending)
        scorer({"wave": np.concatenate(pending)})
    return time.perf_counter() - start, windows


def run_job(run: Path, manifest: Path, out: Path, pythonpath: str | None, overrides: list[str]) -> dict:
    """One `python -m ray_jobs.score` process: its summary, its driver's peak RSS, the peak RSS of its whole
    process tree, and when its first shard was committed (seconds from its start)."""
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    first_shard, driver_peak, stop = [None], [0], threading.Event()
    roles: list[dict[str, list[int]]] = [{}]  # private memory by role at the largest sample
    start = time.perf_counter()
    sets = [arg for kv in overrides for arg in ("--set", kv)]
    proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.score", str(run), str(manifest), str(out),
                             "--allow-outside", *sets], env=env, cwd=pythonpath or ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    driver = psutil.Process(proc.pid)
    # The job's own processes (its driver and the local Ray it starts), not this one's. Distinct pages every
    # 5 s: walking some 15 processes' page tables takes about 0.15 s, 3% of a core.
    with PeakMemory(root=driver, pss_interval=5.0) as tree:

        def watch():
            last_roles = 0.0
            while not stop.is_set():
                try:
                    driver_peak[0] = max(driver_peak[0], driver.memory_info().rss)
                except psutil.Error:
                    pass
                if time.perf_counter() - last_roles >= 5.0:  # reading every process's smaps costs a few ms each
                    last_roles = time.perf_counter()
                    now = private_by_role(PeakMemory.processes(root=driver), proc.pid)
                    if sum(map(sum, now.values())) > sum(map(sum, roles[0].values())):
                        roles[0] = now
                if first_shard[0] is None and any((out / "files").glob("part-*-0*.parquet")):
                    first_shard[0] = time.perf_counter() - start
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, err = proc.communicate()
        stop.set()
        watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"scoring job exited {proc.returncode}:\n{err[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    windows = sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "windows").glob("*.parquet"))
    return {"summary": summary, "windows": windows, "process_wall": time.perf_counter() - start,
            "first_shard": first_shard[0], "driver_peak": driver_peak[0], "tree_peak": tree.peak,
            "tree_pages": tree.peak_unique,
            "roles": roles[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--model", default=None, help="a training run to score with (default: train one)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--loop-files", type=int, default=1000, help="files for the plain in-process loop")
    parser.add_argument("--baseline-tree", default=None, help="a checkout of other code to run the same jobs on")
    parser.add_argument("--baseline-files", type=int, nargs="*", default=[2000])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a scoring setting for the jobs and the loop, e.g. --set prediction.probability_threshold=0 "
                             "(every window a gunshot, so shots are searched in every file)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = scratch_dir(args.workdir, "gunsound-many-files-")
    run = Path(args.model) if args.model else work / "run"
    if not (run / "ensemble.json").exists():
        generate_dataset(work / "data", clips_per_class=20, seed=0)
        training.run(prepare(load_config(ROOT / "configs" / "laptop.yaml", MODEL), str(work / "data"), str(run)))
    model = load_scoring_model(str(run))
    s = scoring.ScoringSettings.from_config(scoring.scoring_config(str(run), args.overrides),
                                            model_chunk_seconds=model.chunk_seconds)
    started = time.perf_counter()
    paths = make_clips(work / "clips", max(args.files), model.features.sample_rate)
    print(f"clips: {len(paths)} of 0.5-3 s at {model.features.sample_rate} Hz ({time.perf_counter() - started:.0f} s "
          f"to make or find); {s.method} windows of {s.window_seconds:g} s, hop {s.hop_seconds:g} s; "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")

    waves = np.concatenate([scoring.read_chunks({k: np.array([v], dtype=object) for k, v in c.items()},
                                                sample_rate=model.features.sample_rate,
                                                window_seconds=s.window_seconds, onset_detection=False,
                                                onset_threshold_db=12.0, s3=storage.current_settings())["wave"]
                            for p in paths[:200] for c in s.plan(str(p), sf.info(p).duration)])
    bound, per_call = model_bound(model, waves, batches=12)
    print(f"model-bound (WindowScorer, batches of 64 in model calls of {per_call}, this process): "
          f"{bound:.1f} windows/s")
    with PeakMemory(pss_interval=5.0) as mem:
        loop_s, loop_windows = plain_loop(model, paths[:args.loop_files], s)
    print(f"plain loop, {args.loop_files} files: {args.loop_files / loop_s:.1f} files/s, {loop_windows / loop_s:.1f} "
          f"windows/s ({loop_windows / loop_s / bound:.0%} of model-bound), peak {mib(mem.peak_unique)} MiB in "
          f"distinct pages (RSS {mem.peak / 2**20:.0f} MiB)")

    rows = []
    jobs = [(args.baseline_tree, n) for n in args.baseline_files] if args.baseline_tree else []
    for tree, count in [*jobs, *((None, n) for n in args.files)]:
        manifest = work / f"clips_{count}.csv"
        pd.DataFrame({"path": [str(p) for p in paths[:count]]}).to_csv(manifest, index=False)
        out = work / f"scored-{count}-{int(time.time() * 1000)}"
        result = run_job(run, manifest, out, tree, args.overrides)
        rows.append(("baseline" if tree else "this tree", count, result))
        summary = result["summary"]
        wall = summary["wall_seconds"]
        first = f"{result['first_shard']:.1f}" if result["first_shard"] is not None else "-"
        print(f"{rows[-1][0]:<10}{count:>7} files: {count / wall:7.1f} files/s, {result['windows'] / wall:7.1f} "
              f"windows/s ({result['windows'] / wall / bound:4.0%} of model-bound); job {wall:.1f} s "
              f"(process {result['process_wall']:.1f} s), first shard at {first} s, driver peak RSS "
              f"{result['driver_peak'] / 2**20:.0f} MiB, the job's processes {mib(result['tree_pages'])} MiB in "
              f"distinct pages ({ratio(result['tree_pages'], mem.peak_unique)} the loop's; target <= 2.0x), RSS "
              f"{result['tree_peak'] / 2**20:.0f} MiB ({result['tree_peak'] / mem.peak:.1f}x); {summary['files_ok']} ok, "
              f"{summary['errors']} errors; private memory (USS) at its largest: "
              f"{describe_roles(result['roles'])}", flush=True)
    mine = {count: r for name, count, r in rows if name == "this tree"}
    if len(mine) >= 2:
        small, large = mine[min(mine)], mine[max(mine)]
        print(f"driver peak RSS {max(mine)} vs {min(mine)} files: {large['driver_peak'] / small['driver_peak']:.2f}x "
              f"(target <= 1.2); first shard {large['first_shard']:.1f} s vs {small['first_shard']:.1f} s; "
              f"windows/s at {max(mine)} files {large['windows'] / large['summary']['wall_seconds'] / bound:.0%} of "
              "model-bound (target >= 50%)")


def ratio(value: int | None, base: int | None) -> str:
    return "n/a" if not value or not base else f"{value / base:.2f}x"


if __name__ == "__main__":
    main()
