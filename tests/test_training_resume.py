"""A fold resumed from a checkpoint, in-process without Ray: `train_loop_per_worker` runs as rank 0 of one
with Ray Train's calls stubbed, and a worker killed after a checkpoint is restarted from it, as Ray Train
restarts a failed worker group (or a rerun of the same command resumes)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from gunsound.config import load_config
from gunsound.train_loop import (
    LoopSettings,
    TrainState,
    report_and_checkpoint,
    restore,
    seed_epoch,
    train_loop_per_worker,
)
from tests.conftest import LAPTOP_CONFIG

ray_train = pytest.importorskip("ray.train")
ray_train_torch = pytest.importorskip("ray.train.torch")

CLASSES = ["a", "b", "c"]
TINY = ["architecture.backbone=resnet10t", "architecture.pretrained=false", "training.epochs=2",
        "training.batch_size=4", "architecture.dropout=0.3"]


def _settings(fold_dir: Path, **kw) -> LoopSettings:
    cfg = load_config(LAPTOP_CONFIG, TINY)
    s = LoopSettings.from_config(cfg, classes=CLASSES, fold_dir=str(fold_dir), optimizer_steps_per_epoch=2)
    return dataclasses.replace(s, **kw)


def _shard(n: int, seed: int) -> SimpleNamespace:
    """A dataset shard of n clips of natural-log mel power, read in one pass (`worker_data.load_shard`)."""
    rng = np.random.default_rng(seed)
    arrays = {"row": np.arange(n), "features": rng.normal(-5, 1, (n, 16, 20)).astype(np.float32),
              "target": np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)]}
    return SimpleNamespace(iter_batches=lambda **kw: iter([arrays]))


class _Worker:
    """train_loop_per_worker's view of Ray Train; `kill_at` ends the worker at that report, before its
    checkpoint is kept, as a crash would."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.tmp, self.kept, self.reported, self.kill_at = tmp_path, [], 0, None
        shards = {"train": _shard(8, 1), "valid": _shard(6, 2)}
        monkeypatch.setattr(ray_train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0))
        monkeypatch.setattr(ray_train, "get_dataset_shard", shards.__getitem__)
        monkeypatch.setattr(ray_train, "get_checkpoint", self.checkpoint)
        monkeypatch.setattr(ray_train, "report", self.report)
        monkeypatch.setattr(ray_train_torch, "get_device", lambda: torch.device("cpu"))
        monkeypatch.setattr(ray_train_torch, "prepare_model", lambda model, move_to_device=None: model)
        monkeypatch.setattr("gunsound.train_loop.placement", lambda device: {"device": device})

    def checkpoint(self) -> ray_train.Checkpoint | None:
        return ray_train.Checkpoint.from_directory(str(self.kept[-1])) if self.kept else None

    def report(self, metrics: dict, checkpoint: ray_train.Checkpoint | None = None) -> None:
        self.reported += 1
        if self.reported == self.kill_at:
            raise SystemExit("worker killed")
        if checkpoint is not None:
            keep = self.tmp / f"ckpt{len(self.kept)}"
            shutil.copytree(checkpoint.path, keep)
            self.kept.append(keep)

    def final_weights(self) -> dict[str, torch.Tensor]:
        return torch.load(self.kept[-1] / "state.pt", weights_only=True)["model"]


def _augmented(fold_dir: Path) -> LoopSettings:
    """Every random draw of training on: mixup, colouring, both masks, dropout; shards in memory."""
    return _settings(fold_dir, mix_iterations=1, mix_probability=1.0, colouring_db=6.0, time_mask_frames=4,
                     frequency_mask_bins=4, cache_shards=True)


def test_resumed_fold_trains_what_an_uninterrupted_one_does(monkeypatch, tmp_path):
    """Killed after epoch 1's checkpoint and restarted: epoch 2 draws the same augmentation and dropout as
    in a run that was never interrupted, so the two end with the same weights."""
    whole = _Worker(monkeypatch, tmp_path / "whole")
    train_loop_per_worker(_augmented(tmp_path / "whole"))
    assert len(whole.kept) == 2

    resumed = _Worker(monkeypatch, tmp_path / "resumed")
    s = _augmented(tmp_path / "resumed")
    resumed.kill_at = 2
    with pytest.raises(SystemExit):
        train_loop_per_worker(s)
    assert len(resumed.kept) == 1
    resumed.kill_at = None
    train_loop_per_worker(s)  # the restarted worker: from epoch 1's checkpoint
    assert len(resumed.kept) == 2

    a, b = whole.final_weights(), resumed.final_weights()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) == 0.0


def test_epochs_and_ranks_draw_differently():
    """Seeding per epoch must not repeat one epoch's draws in the next, nor one rank's on another."""
    draws = []
    for epoch, rank in [(0, 0), (1, 0), (0, 1)]:
        seed_epoch(7, epoch, rank)
        draws.append((float(torch.rand(())), float(np.random.random())))
    seed_epoch(7, 0, 0)
    assert (float(torch.rand(())), float(np.random.random())) == draws[0]
    assert len(set(draws)) == 3


def test_resume_after_the_best_epoch_on_a_gpu_worker_finishes(monkeypatch, tmp_path):
    """save_best_checkpoint, restarted after its best epoch: the best predictions must come back where the last
    epoch can export them (np.asarray). `torch.load` here stands in for a GPU worker's: what it maps onto a
    device other than the CPU comes back on the meta device, which NumPy cannot read, as it cannot read CUDA."""
    kept: list[Path] = []

    def report(metrics: dict, checkpoint: ray_train.Checkpoint | None = None) -> None:
        if checkpoint is not None:
            kept.append(Path(shutil.copytree(checkpoint.path, tmp_path / f"ckpt{len(kept)}")))

    real_load = torch.load

    def load(f, map_location=None, **kw) -> dict:
        state = real_load(f, map_location="cpu", **kw)
        if map_location is not None and torch.device(map_location).type != "cpu":
            for key in ("best_model", "best_predictions"):
                state[key] = {k: v.to("meta") for k, v in state[key].items()}
        return state

    monkeypatch.setattr(ray_train, "report", report)
    s = _settings(tmp_path, save_best_checkpoint=True)
    state = TrainState.create(s, torch.device("cpu"), False, torch.float32)
    predictions = {"row": np.arange(3), "probs": np.full((3, 3), 0.3, np.float32),
                   "targets": np.eye(3, dtype=np.float32)}
    report_and_checkpoint(state, {"epoch": 1, "valid_roc_auc": 0.9}, predictions, s, 0)  # the best epoch

    monkeypatch.setattr(torch, "load", load)
    restarted = TrainState.create(s, torch.device("cpu"), False, torch.float32)
    restore(restarted, ray_train.Checkpoint.from_directory(str(kept[-1])))
    assert {v.device.type for v in restarted.best_predictions.values()} == {"cpu"}
    assert {v.device.type for v in restarted.best_model.values()} == {"cpu"}
    report_and_checkpoint(restarted, {"epoch": 2, "valid_roc_auc": 0.5}, predictions, s, 0)  # the last epoch
    assert pd.read_parquet(tmp_path / "valid_predictions.parquet")["prob_a"].tolist() == pytest.approx([0.3] * 3)
