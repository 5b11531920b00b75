"""Pieces of the Train worker loop and the trainer's sizing, in-process without Ray: `ray.train.report` is
replaced by a stub that keeps every reported checkpoint, as a restarted worker would find them."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from gunsound.config import ConfigError, load_config
from gunsound.features import FeatureParams
from gunsound.metrics import classification_metrics, cross_validated_metrics, per_class_report
from gunsound.model import ModelArtifact, build_model
from gunsound.optim import make_optimizer
from gunsound.train_loop import (
    EmptyEpoch,
    LoopSettings,
    TrainState,
    report_and_checkpoint,
    restore,
    train_one_epoch,
)
from gunsound.training import (
    check_fold_shards,
    clip_table,
    exported_weights,
    finished_fold,
    fit_fold,
    fold_datasets,
    fold_summary,
    make_trainer,
    optimizer_steps_per_epoch,
    shuffle_buffer_clips,
)
from gunsound.worker_data import WorkerData
from tests.conftest import LAPTOP_CONFIG

ray_train = pytest.importorskip("ray.train")

CLASSES = ["a", "b", "c"]
TINY = ["architecture.backbone=resnet10t", "architecture.pretrained=false", "training.epochs=3",
        "training.batch_size=4"]


def _settings(fold_dir: Path, steps: int = 2, **kw) -> LoopSettings:
    cfg = load_config(LAPTOP_CONFIG, TINY)
    s = LoopSettings.from_config(cfg, classes=CLASSES, fold_dir=str(fold_dir), optimizer_steps_per_epoch=steps)
    return dataclasses.replace(s, **kw)


def _state(s: LoopSettings) -> TrainState:
    torch.manual_seed(0)
    return TrainState.create(s, torch.device("cpu"), False, torch.float32)


def _batches(n: int, bs: int = 4, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    for i in range(0, n, bs):
        k = min(bs, n - i)
        yield {"row": torch.arange(i, i + k), "features": torch.randn(k, 16, 20, generator=g),
               "target": torch.eye(3)[torch.randint(0, 3, (k,), generator=g)]}


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _first_weight(state_dict: dict) -> float:
    return float(next(v for v in state_dict.values() if v.is_floating_point() and v.numel() > 1).flatten()[0])


def _predictions(value: float) -> dict[str, np.ndarray]:
    return {"row": np.arange(3), "probs": np.full((3, 3), value, np.float32), "targets": np.eye(3, dtype=np.float32)}


@pytest.fixture
def reports(monkeypatch, tmp_path) -> list[Path]:
    """Every checkpoint directory reported, copied as Ray Train would persist it."""
    kept: list[Path] = []

    def report(metrics: dict, checkpoint=None) -> None:
        if checkpoint is not None:
            keep = tmp_path / f"ckpt{len(kept)}"
            shutil.copytree(checkpoint.path, keep)
            kept.append(keep)

    monkeypatch.setattr(ray_train, "report", report)
    return kept


def _epoch(state: TrainState, s: LoopSettings, score: float, fill: float, with_predictions: bool = True) -> None:
    """An epoch whose weights are all `fill` (recognisable) and whose predictions are `fill / 10`."""
    with torch.no_grad():
        for p in state.model.parameters():
            p.fill_(fill)
    report_and_checkpoint(state, {"epoch": state.next_epoch + 1, "valid_roc_auc": score},
                          _predictions(fill / 10) if with_predictions else None, s, 0)


# ---------------------------------------------------------------- 1. best epoch with undefined scores


def test_nan_score_is_never_the_best(tmp_path, reports):
    """ROC AUC on a one-class validation set is NaN; as the first best nothing would ever beat it."""
    s = _settings(tmp_path, save_best_checkpoint=True)
    state = _state(s)
    for score, fill in [(float("nan"), 1.0), (0.5, 2.0), (0.4, 3.0)]:
        _epoch(state, s, score, fill)
    assert (state.best_epoch, state.best_score) == (2, 0.5)
    assert _first_weight(torch.load(tmp_path / "best_state.pt", weights_only=True)) == 2.0


def test_exported_epoch_is_the_epoch_of_the_exported_weights():
    """model.pt's best_epoch names the epoch whose weights it holds, with or without save_best_checkpoint."""
    state = {"model": {"w": torch.ones(1)}, "epoch": 2, "best_epoch": 1, "best_model": {"w": torch.zeros(1)}}
    weights, epoch = exported_weights(state, save_best_checkpoint=False)
    assert (float(weights["w"]), epoch) == (1.0, 3)
    weights, epoch = exported_weights(state, save_best_checkpoint=True)
    assert (float(weights["w"]), epoch) == (0.0, 1)
    weights, epoch = exported_weights({**state, "best_epoch": None, "best_model": None}, save_best_checkpoint=True)
    assert (float(weights["w"]), epoch) == (1.0, 3)


# ---------------------------------------------------------------- 2. gradient accumulation


def test_fewer_batches_than_accumulation_still_step(tmp_path):
    s = _settings(tmp_path, grad_accumulation=4, steps=optimizer_steps_per_epoch(12, 1, 4, True, 4))
    state = _state(s)
    before = _flat(state.model).clone()
    train_one_epoch(state.model, state, _batches(12), s, torch.device("cpu"), False, torch.float32)
    assert state.scheduler.last_epoch == 1 == s.optimizer_steps_per_epoch
    assert not torch.equal(before, _flat(state.model))


def test_partial_accumulation_is_stepped_not_dropped(tmp_path):
    s = _settings(tmp_path, grad_accumulation=4, steps=optimizer_steps_per_epoch(40, 1, 4, True, 4))
    state = _state(s)
    train_one_epoch(state.model, state, _batches(40), s, torch.device("cpu"), False, torch.float32)
    assert state.scheduler.last_epoch == 3 == s.optimizer_steps_per_epoch
    assert all(p.grad is None for p in state.model.parameters())


def test_schedule_counts_partial_accumulations():
    assert optimizer_steps_per_epoch(40, 1, 4, True, 4) == 3  # 10 batches: 4 + 4 + 2
    assert optimizer_steps_per_epoch(42, 1, 4, False, 4) == 3  # 11 batches
    assert optimizer_steps_per_epoch(40, 2, 4, True, 1) == 5
    assert optimizer_steps_per_epoch(4, 1, 4, True, 4) == 1


# ---------------------------------------------------------------- 3. background predicted alike in every fold


def test_background_prediction_is_decided_for_the_dataset():
    """The same predictions score the same in a fold without background clips as pooled with one."""
    targets = np.eye(3, dtype=np.float32)
    probs = np.array([[.4, .1, .1], [.1, .45, .1], [.1, .1, .3]], np.float32)  # right class, under 0.5
    assert classification_metrics(probs, targets, CLASSES, 0.5, predict_background=True)["accuracy"] == 0.0
    assert classification_metrics(probs, targets, CLASSES, 0.5, predict_background=False)["accuracy"] == 1.0
    report = per_class_report(probs, targets, CLASSES, 0.5, predict_background=True)
    assert "background" in report["labels"]

    all_targets = np.vstack([targets, np.zeros((1, 3), np.float32)])
    all_probs = np.vstack([probs, np.full((1, 3), 0.1, np.float32)])
    oof = pd.DataFrame({"fold": [0, 0, 0, 1], **{f"prob_{c}": all_probs[:, i] for i, c in enumerate(CLASSES)},
                        **{f"true_{c}": all_targets[:, i] for i, c in enumerate(CLASSES)}})
    cv = cross_validated_metrics(oof, CLASSES)
    assert cv["per_fold"]["0"]["accuracy"] == 0.0  # as in the pooled figures, not 1.0
    assert cv["pooled"]["accuracy"] == 0.25


def test_loop_settings_carry_the_dataset_decision(tmp_path):
    targets = np.eye(3, dtype=np.float32)
    probs = np.full((3, 3), 0.1, np.float32)
    cfg = load_config(LAPTOP_CONFIG, TINY)
    s = LoopSettings.from_config(cfg, classes=CLASSES, fold_dir=str(tmp_path), optimizer_steps_per_epoch=1,
                                 predict_background=True)
    assert s.predict_background
    assert s.metrics_of(probs, targets)["accuracy"] == 0.0


# ---------------------------------------------------------------- 4. schedule from the rows actually trained


class _Rows:
    def __init__(self, n: int) -> None:
        self.n = n

    def count(self) -> int:
        return self.n


def test_schedule_is_sized_from_the_datasets_not_the_plan(tmp_path, monkeypatch):
    """Rows dropped by --drop-bad-rows are in plan.folds but not in the fold's datasets."""
    import ray.train.torch

    made: dict = {}
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", lambda *a, **kw: made.update(kw))
    cfg = load_config(LAPTOP_CONFIG, [*TINY, "training.batch_size=16", "training.grad_accumulation=1"])
    folds = np.array([0] * 40 + [1] * 160)
    plan = SimpleNamespace(cfg=cfg, folds=folds, features=FeatureParams.from_config(cfg.audio, sample_rate=16000),
                           audio=SimpleNamespace(chunk_seconds=1.0),
                           manifest=SimpleNamespace(classes=CLASSES, frame=pd.DataFrame({"label": ["a"] * 200})))
    sizing = SimpleNamespace(workers=1, gpus_per_worker=0, cpus_per_worker=1)
    make_trainer(plan, 0, _Rows(128), _Rows(40), str(tmp_path / "fold_0"), "fold_0", str(tmp_path / "ray"), sizing)
    s = made["train_loop_config"]
    assert s.optimizer_steps_per_epoch == 128 // 16  # not 160 // 16
    assert not s.predict_background


# ---------------------------------------------------------------- 5. differential learning rate names


def test_differential_layer_that_names_nothing_is_refused():
    cfg = load_config(LAPTOP_CONFIG, TINY)
    model = build_model(cfg.architecture, 3)
    groups = make_optimizer(model, kind="AdamW", learning_rate=0.01, differential_layers=["backbone"],
                            differential_learning_rate=0.0001).param_groups
    assert [g["lr"] for g in groups] == [0.01, 0.0001]
    with pytest.raises(ValueError, match=r"model\.backbone.*'backbone', 'head'"):
        make_optimizer(model, kind="AdamW", learning_rate=0.01, differential_layers=["model.backbone"],
                       differential_learning_rate=0.0001)


# ---------------------------------------------------------------- 6. and 7. the best epoch's files


def test_valid_predictions_are_the_best_epochs(tmp_path, reports):
    """model.pt holds the best epoch's weights: the out-of-fold predictions must be theirs too."""
    s = _settings(tmp_path, save_best_checkpoint=True)
    state = _state(s)
    for score, fill in [(0.9, 1.0), (0.6, 2.0), (0.5, 3.0)]:
        _epoch(state, s, score, fill)
    frame = pd.read_parquet(tmp_path / "valid_predictions.parquet")
    assert frame["prob_a"].tolist() == pytest.approx([0.1] * 3)


def test_last_epochs_predictions_without_best_checkpoint(tmp_path, reports):
    s = _settings(tmp_path, save_best_checkpoint=False)
    state = _state(s)
    for score, fill in [(0.9, 1.0), (0.6, 2.0), (0.5, 3.0)]:
        _epoch(state, s, score, fill)
    assert pd.read_parquet(tmp_path / "valid_predictions.parquet")["prob_a"].tolist() == pytest.approx([0.3] * 3)
    assert not (tmp_path / "best_state.pt").exists()


def test_kill_before_the_checkpoint_keeps_no_discarded_best(tmp_path, reports, monkeypatch):
    """Epoch 2 is a new best but the worker dies before its checkpoint is reported; the resumed run redoes
    epoch 2 worse: the best weights are epoch 1's, in the checkpoint and in best_state.pt."""
    s = _settings(tmp_path, save_best_checkpoint=True)
    state = _state(s)
    _epoch(state, s, 0.6, 1.0)
    stub = ray_train.report

    def killed(metrics: dict, checkpoint=None) -> None:
        raise SystemExit("worker killed")

    monkeypatch.setattr(ray_train, "report", killed)
    with pytest.raises(SystemExit):
        _epoch(state, s, 0.9, 2.0)
    monkeypatch.setattr(ray_train, "report", stub)
    state = _state(s)
    restore(state, ray_train.Checkpoint.from_directory(str(reports[-1])))
    assert (state.next_epoch, state.best_epoch) == (1, 1)
    _epoch(state, s, 0.5, 20.0)
    _epoch(state, s, 0.4, 30.0)
    assert state.best_epoch == 1
    assert _first_weight(torch.load(tmp_path / "best_state.pt", weights_only=True)) == 1.0
    last = torch.load(reports[-1] / "state.pt", weights_only=True)
    weights, epoch = exported_weights(last, save_best_checkpoint=True)
    assert (_first_weight(weights), epoch) == (1.0, 1)
    assert pd.read_parquet(tmp_path / "valid_predictions.parquet")["prob_a"].tolist() == pytest.approx([0.1] * 3)


# ---------------------------------------------------------------- 8. a streamed shard's batches mix the classes


def _sorted_plan(per_class: int = 64, classes: int = 4, seed: int = 3) -> SimpleNamespace:
    """A folder-per-class manifest: its rows sorted by class."""
    labels = np.repeat([f"c{i}" for i in range(classes)], per_class)
    frame = pd.DataFrame({"row": np.arange(len(labels)), "path": [f"/d/{x}/{i}.wav" for i, x in enumerate(labels)],
                          "label": labels})
    targets = np.eye(classes, dtype=np.float32)[np.repeat(np.arange(classes), per_class)]
    return SimpleNamespace(manifest=SimpleNamespace(frame=frame, targets=lambda background: targets),
                           folds=np.arange(len(labels)) % 5,
                           cfg=SimpleNamespace(dataset=SimpleNamespace(background_label="background"),
                                               environment=SimpleNamespace(seed=seed),
                                               training=SimpleNamespace(train_validation_data=False)))


def test_clips_are_featurized_in_a_random_order():
    """A feature block is 32-64 consecutive rows: in manifest order each would hold one class."""
    plan = _sorted_plan()
    clips = clip_table(plan)
    assert sorted(clips["row"]) == list(range(256))
    by_row = clips.set_index("row").sort_index()
    assert by_row["fold"].tolist() == plan.folds.tolist()
    assert by_row["path"].tolist() == plan.manifest.frame["path"].tolist()
    classes_per_block = [len(set(map(tuple, clips["target"][i:i + 32]))) for i in range(0, 256, 32)]
    assert min(classes_per_block) >= 3
    assert clips["row"].tolist() == clip_table(plan)["row"].tolist()  # drawn from environment.seed


class _Recorded:
    """A stand-in for a Ray Dataset: each derived dataset knows the calls that made it."""

    def __init__(self, calls: tuple = ()) -> None:
        self.calls = calls

    def filter(self, expr) -> _Recorded:
        return _Recorded((*self.calls, ("filter", None)))

    def select_columns(self, cols) -> _Recorded:
        return _Recorded((*self.calls, ("select_columns", None)))

    def materialize(self) -> _Recorded:
        return _Recorded((*self.calls, ("materialize", None)))

    def randomize_block_order(self, *, seed) -> _Recorded:
        return _Recorded((*self.calls, ("randomize_block_order", seed)))


def test_training_blocks_come_in_a_new_order_every_epoch():
    """The training set's block order is drawn again every execution (every epoch of a streamed shard), after
    materializing (which would otherwise fix one order)."""
    train, valid = fold_datasets(_sorted_plan(), _Recorded(), 1)
    assert [c for c, _ in train.calls[-2:]] == ["materialize", "randomize_block_order"]
    seed = train.calls[-1][1]
    assert seed.seed == 3 + 1 and seed.reseed_after_execution
    assert "randomize_block_order" not in [c for c, _ in valid.calls]


def test_streamed_shard_shuffles_across_many_blocks(tmp_path, monkeypatch):
    asked: dict = {}
    shard = SimpleNamespace(iter_torch_batches=lambda **kw: asked.update(kw) or [])
    monkeypatch.setattr(ray_train, "get_dataset_shard", lambda name: shard)
    s = _settings(tmp_path, cache_shards=False, shuffle_buffer_clips=shuffle_buffer_clips(100_000, 16, 100_000))
    WorkerData(s, 0, torch.device("cpu")).train_batches(seed=5)
    assert asked["local_shuffle_buffer_size"] == 1024 >= 16 * 64  # 16 feature blocks, not 4 batches
    assert asked["local_shuffle_seed"] == 5


def test_shuffle_buffer_is_bounded_by_memory_and_shard():
    assert shuffle_buffer_clips(100_000, 16, 2**20) == 256  # 256 MB of 1 MB clips
    assert shuffle_buffer_clips(300, 16, 1000) == 300  # the whole shard
    assert shuffle_buffer_clips(100_000, 128, 2**30) == 512  # never under 4 batches


# ---------------------------------------------------------------- 9. a shard smaller than one batch


def test_shard_smaller_than_a_batch_is_refused():
    """100 clips on 8 workers with batch 16 and drop_last_batch: 12 clips per worker, no batch at all."""
    with pytest.raises(ConfigError, match=r"12 clips per worker.*batch_size 16.*drop_last_batch true"):
        optimizer_steps_per_epoch(100, 8, 16, True, 1)
    assert optimizer_steps_per_epoch(100, 8, 16, False, 1) == 1  # the partial batch trains
    with pytest.raises(ConfigError, match="0 clips per worker"):
        optimizer_steps_per_epoch(3, 4, 16, False, 1)


def test_folds_are_checked_before_any_trains():
    from gunsound.cli import exit_code

    plan = _sorted_plan(per_class=5)  # 20 clips in 5 folds: 16 training clips per fold
    plan.cfg.training.batch_size, plan.cfg.training.drop_last_batch = 16, True
    with pytest.raises(ConfigError, match=r"fold 0's training set: 16 clips over 2 .* 8 clips per worker") as caught:
        check_fold_shards(plan, plan.folds, [0, 1], SimpleNamespace(workers=2))
    assert exit_code(caught.value) == 2
    check_fold_shards(plan, plan.folds, [0, 1], SimpleNamespace(workers=1))


def test_an_epoch_without_a_batch_is_an_error(tmp_path):
    s = _settings(tmp_path, batch_size=16)
    state = _state(s)
    with pytest.raises(EmptyEpoch, match="batch_size 16"):
        train_one_epoch(state.model, state, iter([]), s, torch.device("cpu"), False, torch.float32)


# ---------------------------------------------------------------- 10. the fold's final figures


def test_final_figures_are_the_exported_epochs(tmp_path, reports):
    """With save_best_checkpoint, model.pt holds epoch 1's weights: the fold's final figures are epoch 1's."""
    s = _settings(tmp_path, save_best_checkpoint=True)
    state = _state(s)
    for score, fill in [(0.95, 1.0), (0.7, 2.0), (0.8, 3.0)]:
        _epoch(state, s, score, fill)
    last = torch.load(reports[-1] / "state.pt", weights_only=True)
    summary = fold_summary(last["history"], exported_weights(last, True)[1])
    assert (summary["exported_epoch"], summary["final"]["epoch"], summary["final"]["valid_roc_auc"]) == (1, 1, 0.95)
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2, 3]
    plain = fold_summary(last["history"], exported_weights(last, False)[1])
    assert (plain["exported_epoch"], plain["final"]["valid_roc_auc"]) == (3, 0.8)


def test_fit_fold_reports_the_exported_epoch(tmp_path, reports, monkeypatch):
    """fit_fold's summary (printed by `gunsound train`, written to metrics.json) from the last checkpoint."""
    import gunsound.training as training

    s = _settings(tmp_path, save_best_checkpoint=True)
    state = _state(s)
    for score, fill in [(0.6, 1.0), (0.9, 2.0), (0.5, 3.0)]:
        _epoch(state, s, score, fill)
    result = SimpleNamespace(checkpoint=ray_train.Checkpoint.from_directory(str(reports[-1])))
    monkeypatch.setattr(training, "make_trainer", lambda *a, **kw: SimpleNamespace(fit=lambda: result))
    cfg = load_config(LAPTOP_CONFIG, [*TINY, "training.save_best_checkpoint=true"])
    plan = SimpleNamespace(cfg=cfg, output=str(tmp_path), manifest=SimpleNamespace(classes=CLASSES),
                           features=FeatureParams.from_config(cfg.audio, sample_rate=16000),
                           audio=SimpleNamespace(chunk_seconds=1.0))
    out = fit_fold(plan, 0, None, None, None, queue_timeout_s="1")
    assert (out["exported_epoch"], out["final"]["epoch"], out["final"]["valid_roc_auc"]) == (2, 2, 0.9)
    assert ModelArtifact.load(str(tmp_path / "fold_0" / "model.pt")).best_epoch == 2

    (tmp_path / "fold_0" / "metrics.json").write_text(json.dumps(last_history(reports)))
    kept = finished_fold(plan, 0)  # a rerun keeps the finished fold: the same figures
    assert (kept["exported_epoch"], kept["final"]["valid_roc_auc"]) == (2, 0.9)


def last_history(reports: list[Path]) -> list[dict]:
    return torch.load(reports[-1] / "state.pt", weights_only=True)["history"]
