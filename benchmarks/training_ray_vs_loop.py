"""Training throughput, in one run on the same model and features:

1. an epoch through the Ray Train path (one worker) against a plain PyTorch loop (target ratio <= 1.15),
   median over --epochs epochs of each;
2. the seed's recipe (every clip padded to a 60 s chunk) against the automatic chunk length: one epoch each,
   with the time ratio and the validation ROC AUC of each.

    python benchmarks/training_ray_vs_loop.py [--clips-per-class 40] [--epochs 3] [--pad-clips-per-class 12]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from memory import scratch_dir

from gunsound import training
from gunsound.config import load_config
from gunsound.features import normalized
from gunsound.model import build_model
from gunsound.optim import lr_lambda, make_optimizer
from gunsound.plan import TrainingPlan, prepare
from gunsound.synthesis import generate_dataset
from gunsound.train_loop import loss_fn

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["architecture.backbone=resnet18", "training.batch_size=32", "training.epochs=1", "dataset.folds=[0]",
         # One worker with every core, as the plain loop has (Ray pins a 1-CPU worker to one torch thread).
         "environment.cpus_per_worker=2",
         "augmentation.time_mask_frames=0", "augmentation.frequency_mask_bins=0"]


def plain_epochs(plan: TrainingPlan, features: np.ndarray, targets: np.ndarray) -> list[float]:
    """The same model, optimizer, schedule and loss as the Ray loop, without Ray: seconds of each epoch."""
    cfg, t = plan.cfg, plan.cfg.training
    torch.manual_seed(0)
    model = build_model(cfg.architecture, len(plan.manifest.classes))
    optimizer = make_optimizer(model, kind=t.optimizer, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
                               differential_layers=t.differential_learning_rate_layers,
                               differential_learning_rate=t.differential_learning_rate)
    steps = len(features) // t.batch_size
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
        epochs=t.epochs, steps_per_epoch=steps, warmup_epochs=t.warmup_epochs, schedule=t.schedule))
    rng = np.random.default_rng(0)
    seconds = []
    for _ in range(cfg.training.epochs):
        start = time.perf_counter()
        order = rng.permutation(len(features))
        model.train()
        for i in range(steps):
            idx = order[i * cfg.training.batch_size:(i + 1) * cfg.training.batch_size]
            x = normalized(torch.from_numpy(features[idx]).unsqueeze(1), normalize=plan.features.normalize,
                           relative_to_peak=plan.features.relative_to_peak)  # as the Ray workers do
            y = torch.from_numpy(targets[idx])
            loss = loss_fn(model(x), y, t.loss_function)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def ray_vs_plain(data: Path, work: Path, epochs: int) -> None:
    from ray.data.expressions import col

    cfg = load_config(ROOT / "configs" / "laptop.yaml", [*MODEL, f"training.epochs={epochs}"])
    out = work / f"ray_vs_plain-{int(time.time())}"  # a fresh run: an existing one would be resumed
    plan = prepare(cfg, str(data), str(out))
    from gunsound.ray_runtime import init_ray

    init_ray()
    ds = training.featurize(plan)
    train = ds.filter(expr=col("fold") != 0).select_columns(["features", "target"]).to_pandas()
    features = np.stack(train["features"].to_numpy()).astype(np.float32)
    targets = np.stack(train["target"].to_numpy()).astype(np.float32)
    plain = plain_epochs(plan, features, targets)
    start = time.perf_counter()
    training.run(plan)
    ray_total = time.perf_counter() - start
    history = json.loads((out / "fold_0" / "metrics.json").read_text())
    ray = [h["train_seconds"] for h in history]
    print(f"[1] {len(features)} training clips, {features.shape[1]}x{features.shape[2]} log-mel, "
          f"{cfg.architecture.backbone}, batch {cfg.training.batch_size}, {epochs} epochs each")
    print(f"    plain PyTorch loop, seconds per epoch:          {' '.join(f'{x:5.1f}' for x in plain)}")
    print(f"    Ray Train (1 worker), training part per epoch:  {' '.join(f'{x:5.1f}' for x in ray)}")
    print(f"    Ray worker reading its shard into memory, once before the first epoch: "
          f"{history[0].get('shard_load_seconds', float('nan')):.1f} s")
    print(f"    ratio Ray/plain, median epoch: {np.median(ray) / np.median(plain):.2f}, first epoch "
          f"{ray[0] / plain[0]:.2f} (target <= 1.15); whole Ray job incl. featurizing, trainer start-up, "
          f"validation, checkpoints, report: {ray_total:.0f} s")


def padding(data: Path, work: Path) -> None:
    rows = []
    for name, extra in (("seed recipe: 60 s chunk", ["audio.audio_parameters=Manual", "audio.training_chunk_seconds=60"]),
                        ("automatic chunk", ["audio.audio_parameters=Auto"])):
        cfg = load_config(ROOT / "configs" / "laptop.yaml", [*MODEL, "architecture.backbone=resnet10t", *extra])
        plan = prepare(cfg, str(data), str(work / f"{name.split(':')[0].replace(' ', '_')}-{int(time.time())}"))
        start = time.perf_counter()
        result = training.run(plan)
        final = result["folds"]["0"]["final"]
        rows.append((name, plan.audio.chunk_seconds, final["epoch_seconds"], time.perf_counter() - start,
                     final["valid_roc_auc"]))
    print(f"[2] {len(plan.manifest.frame)} clips, resnet10t, one epoch each")
    for name, chunk, epoch_s, total_s, auc in rows:
        print(f"    {name:<26} chunk {chunk:5.1f} s  epoch {epoch_s:7.1f} s  job {total_s:6.0f} s  valid ROC AUC {auc:.3f}")
    print(f"    time ratio 60 s / automatic (epoch): {rows[0][2] / rows[1][2]:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips-per-class", type=int, default=40)
    parser.add_argument("--pad-clips-per-class", type=int, default=12)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--part", choices=["all", "ray", "padding"], default="all")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = scratch_dir(args.workdir, "gunsound-train-bench-")
    if args.part in ("all", "ray"):
        data = work / "data"
        if not (data / "train.pq").exists():
            generate_dataset(data, clips_per_class=args.clips_per_class, seed=0)
        ray_vs_plain(data, work, args.epochs)
    if args.part in ("all", "padding"):
        small = work / "data_small"
        if not (small / "train.pq").exists():
            generate_dataset(small, clips_per_class=args.pad_clips_per_class, seed=1)
        padding(small, work)


if __name__ == "__main__":
    main()
