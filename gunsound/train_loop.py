"""The loop every Ray Train worker runs for one fold (DDP across workers when there are several): restore from
the latest checkpoint, then per epoch train, validate (rank 0), report and checkpoint.

Rank 0 writes under the fold's folder while it trains:
    metrics.json                 every epoch's metrics so far
    best_state.pt                the best epoch's weights (training.save_best_checkpoint), after its checkpoint
    valid_predictions.parquet    at the last epoch: the validation probabilities of the weights the fold exports
                                 (the best epoch's with training.save_best_checkpoint, else the last epoch's)
"""

from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from gunsound import storage
from gunsound.accelerator import compute_device
from gunsound.augment import colour, mixup, spec_augment
from gunsound.config import ArchitectureConfig, Config
from gunsound.ddp import check_ranks
from gunsound.features import FeatureParams, normalized
from gunsound.metrics import METRIC_KEYS, classification_metrics
from gunsound.model import build_model
from gunsound.optim import lr_lambda, make_optimizer
from gunsound.resources import placement
from gunsound.tracking import FoldTracker, TrackingSettings
from gunsound.worker_data import Batch, WorkerData

if TYPE_CHECKING:
    import ray.train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    """Everything a Train worker needs for one fold, as plain values (Ray pickles it to every worker)."""

    classes: tuple[str, ...]
    fold_dir: str
    architecture: ArchitectureConfig
    seed: int
    epochs: int
    batch_size: int
    optimizer_steps_per_epoch: int
    loss_function: Literal["BCE", "CrossEntropy"] = "BCE"
    optimizer: Literal["AdamW", "Adam", "SGD"] = "AdamW"
    learning_rate: float = 0.001
    weight_decay: float = 0.0
    differential_layers: tuple[str, ...] = ()
    differential_learning_rate: float = 0.001
    schedule: Literal["Cosine", "Linear", "Constant"] = "Cosine"
    warmup_epochs: float = 0.0
    grad_accumulation: int = 1
    gradient_clip: float = 0.0
    drop_last_batch: bool = True
    evaluate_every: int = 1
    save_best_checkpoint: bool = False
    calculate_train_metric: bool = False
    mixed_precision_training: bool = True
    mixed_precision_inference: bool = False
    time_mask_frames: int = 0
    frequency_mask_bins: int = 0
    mix_iterations: int = 0  # 0: mixup off
    mix_probability: float = 1.0
    mix_concentration: float = 1.0
    mix_target: Literal["Ratio", "Max"] = "Ratio"
    colouring_db: float = 0.0
    # The features arrive in natural-log power and are normalised here, after mixup and colouring.
    normalize: bool = False
    relative_to_peak: bool = False
    metric: Literal["ROC_AUC", "Accuracy", "F1", "LogLoss"] = "ROC_AUC"
    probability_threshold: float = 0.5
    background_label: str = "background"
    predict_background: bool = False  # decided once for the dataset: does it hold background clips
    cache_shards: bool = False
    # Rows a streamed shard (not cache_shards) shuffles among: many feature blocks, as each block holds
    # consecutive rows of the featurized table (`training.shuffle_buffer_clips`).
    shuffle_buffer_clips: int = 1024
    run_dir: str | None = None  # where the live report is refreshed after every epoch; None: no live report
    tracking: TrackingSettings | None = None  # rank 0 logs every epoch to the command's tracked run
    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_config(cls, cfg: Config, *, classes: Iterable[str], fold_dir: str, optimizer_steps_per_epoch: int,
                    cache_shards: bool = False, shuffle_buffer_clips: int = 1024, run_dir: str | None = None,
                    predict_background: bool = False) -> LoopSettings:
        t, a, env = cfg.training, cfg.augmentation, cfg.environment
        features = FeatureParams.from_config(cfg.audio)
        return cls(
            classes=tuple(classes), fold_dir=fold_dir, architecture=cfg.architecture, seed=env.seed,
            epochs=t.epochs, batch_size=t.batch_size, optimizer_steps_per_epoch=optimizer_steps_per_epoch,
            loss_function=t.loss_function, optimizer=t.optimizer, learning_rate=t.learning_rate,
            weight_decay=t.weight_decay, differential_layers=tuple(t.differential_learning_rate_layers),
            differential_learning_rate=t.differential_learning_rate, schedule=t.schedule,
            warmup_epochs=t.warmup_epochs, grad_accumulation=t.grad_accumulation, gradient_clip=t.gradient_clip,
            drop_last_batch=t.drop_last_batch, evaluate_every=max(1, round(t.evaluation_epochs)),
            save_best_checkpoint=t.save_best_checkpoint, calculate_train_metric=t.calculate_train_metric,
            mixed_precision_training=env.mixed_precision_training,
            mixed_precision_inference=env.mixed_precision_inference,
            time_mask_frames=a.time_mask_frames, frequency_mask_bins=a.frequency_mask_bins,
            mix_iterations=a.mix_iterations if a.mix_audio == "Mixup" else 0, mix_probability=a.mix_probability,
            mix_concentration=a.mix_concentration, mix_target=a.mix_target, colouring_db=a.colouring_db,
            normalize=features.normalize, relative_to_peak=features.relative_to_peak, metric=cfg.prediction.metric,
            probability_threshold=cfg.prediction.probability_threshold,
            background_label=cfg.dataset.background_label, predict_background=predict_background,
            cache_shards=cache_shards, shuffle_buffer_clips=shuffle_buffer_clips, run_dir=run_dir,
            tracking=TrackingSettings.from_config(cfg, run_dir) if run_dir else None,
            endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region,
        )

    def metrics_of(self, probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        return classification_metrics(probs, targets, list(self.classes), self.probability_threshold,
                                      self.background_label, self.predict_background)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "BCE":
        return F.binary_cross_entropy_with_logits(logits, targets)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def probabilities(logits: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.sigmoid(logits) if kind == "BCE" else torch.softmax(logits, dim=1)


def training_precision(device: torch.device, mixed_precision: bool) -> tuple[bool, torch.dtype]:
    """Autocast on CUDA only: bfloat16 where the GPU has it (no loss scaling needed), else float16 with a
    GradScaler. CPU autocast would slow the convolutions down rather than speed them up."""
    amp = device.type == "cuda" and mixed_precision
    return amp, (torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16)


@dataclass
class TrainState:
    """What a checkpoint holds: the model (unwrapped), optimizer, schedule, loss scaler and the epochs so far,
    and with training.save_best_checkpoint the best epoch's weights and validation predictions (in the
    checkpoint, so that a resume never keeps those of an epoch it discarded).
    Its `state_dict` holds tensors and plain values only, so it loads with `torch.load(weights_only=True)`."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    history: list[dict]
    next_epoch: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    best_model: dict[str, torch.Tensor] | None = None
    best_predictions: dict[str, torch.Tensor] | None = None

    @classmethod
    def create(cls, s: LoopSettings, device: torch.device, amp: bool, amp_dtype: torch.dtype) -> TrainState:
        model = build_model(s.architecture, len(s.classes)).to(device)
        optimizer = make_optimizer(model, kind=s.optimizer, learning_rate=s.learning_rate,
                                   weight_decay=s.weight_decay, differential_layers=s.differential_layers,
                                   differential_learning_rate=s.differential_learning_rate)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
            epochs=s.epochs, steps_per_epoch=s.optimizer_steps_per_epoch, warmup_epochs=s.warmup_epochs,
            schedule=s.schedule))
        scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)
        return cls(model, optimizer, scheduler, scaler, history=[])

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.next_epoch - 1, "history": self.history, "best_score": self.best_score,
                "best_epoch": self.best_epoch, "best_model": self.best_model,
                "best_predictions": self.best_predictions}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history, self.next_epoch = state["history"], state["epoch"] + 1
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        # On the CPU whatever the checkpoint was read onto: they are exported (np.asarray at the last epoch,
        # model.pt), never trained, and a copy on the GPU would only take its memory.
        self.best_model = _on_cpu(state.get("best_model"))
        self.best_predictions = _on_cpu(state.get("best_predictions"))


def _on_cpu(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if tensors is None else {k: v.cpu() for k, v in tensors.items()}


def save_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def restore(state: TrainState, checkpoint: ray.train.Checkpoint | None) -> None:
    """Continue from a Ray Train checkpoint (a restarted worker or a rerun of the same command), if any. Read
    onto the CPU: loading copies the weights and optimizer state onto the model's device, and the best epoch's
    weights and predictions stay on the CPU, where the last epoch exports them."""
    if checkpoint:
        with checkpoint.as_directory() as d:
            state.load_state_dict(torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True))


class EmptyEpoch(RuntimeError):
    """A worker's epoch gave it no batch to train on: the fold would finish with untrained weights."""


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed torch's and NumPy's global generators (augmentation, mixup, dropout) from (seed, epoch, rank) at the
    start of every epoch: a worker restarted from a checkpoint draws what an uninterrupted one would have, and
    the ranks draw differently from one another."""
    words = np.random.SeedSequence([seed % 2**63, epoch, rank]).generate_state(2, np.uint32)
    torch.manual_seed(int(words[0]) << 32 | int(words[1]))
    np.random.seed(int(words[0]))


def train_one_epoch(model: torch.nn.Module, state: TrainState, batches: Iterable[Batch], s: LoopSettings,
                    device: torch.device, amp: bool, amp_dtype: torch.dtype,
                    rows_trained: list[np.ndarray] | None = None) -> dict[str, Any]:
    """One pass over this worker's batches (augmented, accumulated, clipped); returns the epoch's metrics.
    The manifest rows it trained on are appended to `rows_trained` where batches carry them."""
    model.train()
    optimizer, scheduler, scaler = state.optimizer, state.scheduler, state.scaler
    batch_losses, seen, train_probs, train_targets = [], 0, [], []
    optimizer.zero_grad(set_to_none=True)
    pending = 0  # batches whose gradients wait for the next optimizer step
    for batch in batches:
        x = batch["features"].to(device, non_blocking=True).unsqueeze(1)
        y = batch["target"].to(device, non_blocking=True)
        x, y = mixup(x, y, iterations=s.mix_iterations, probability=s.mix_probability,
                     concentration=s.mix_concentration, target=s.mix_target)
        x = normalized(colour(x, max_db=s.colouring_db), normalize=s.normalize, relative_to_peak=s.relative_to_peak)
        x = spec_augment(x, time_mask_frames=s.time_mask_frames, frequency_mask_bins=s.frequency_mask_bins)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            logits = model(x).float()
            loss = loss_fn(logits, y, s.loss_function)
        scaler.scale(loss / s.grad_accumulation).backward()
        pending += 1
        if pending == s.grad_accumulation:
            _optimizer_step(model, state, s, pending)
            pending = 0
        batch_losses.append(loss.item())
        seen += len(y)
        if rows_trained is not None and "row" in batch:
            rows_trained.append(batch["row"].cpu().numpy())
        if s.calculate_train_metric:
            train_probs.append(probabilities(logits.detach().float(), s.loss_function).cpu().numpy())
            train_targets.append((y > 0.5).float().cpu().numpy())
    if pending:  # the epoch's last, partial accumulation: stepped, not dropped (nor carried into the next epoch)
        _optimizer_step(model, state, s, pending)
    if not seen:
        raise EmptyEpoch(f"epoch {state.next_epoch + 1} gave this worker no batch to train on: its shard "
                         f"holds fewer clips than training.batch_size {s.batch_size} "
                         f"(training.drop_last_batch {str(s.drop_last_batch).lower()})")
    metrics: dict[str, Any] = {
        "epoch": state.next_epoch + 1, "train_loss": float(np.mean(batch_losses)) if batch_losses else float("nan"),
        "train_batch_loss": batch_losses, "lr": float(scheduler.get_last_lr()[0]), "train_clips": seen,
        "device": str(device), "precision": str(amp_dtype if amp else torch.float32).split(".")[-1]}
    if train_probs:  # on the augmented training batches, as seen by this worker
        metrics.update({f"train_{k}": v for k, v in s.metrics_of(np.concatenate(train_probs),
                                                                 np.concatenate(train_targets)).items()})
    return metrics


def _optimizer_step(model: torch.nn.Module, state: TrainState, s: LoopSettings, accumulated: int) -> None:
    """One optimizer and schedule step on `accumulated` batches' gradients, averaged over those batches."""
    optimizer, scaler = state.optimizer, state.scaler
    if accumulated != s.grad_accumulation:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(s.grad_accumulation / accumulated)
    if s.gradient_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.gradient_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()


def evaluate(model: torch.nn.Module, batches: Iterable[Batch], loss_function: str, device: torch.device,
             mixed_precision: bool = False, *, normalize: bool = False,
             relative_to_peak: bool = False) -> dict[str, np.ndarray]:
    """Rows, probabilities, targets and mean loss of a model over batches of ("row", "features", "target"),
    the features in natural-log power, normalised here as the model was trained (`features.normalized`)."""
    model.eval()
    rows, probs, targets, losses = [], [], [], []
    amp = device.type == "cuda" and mixed_precision
    with torch.inference_mode():
        for batch in batches:
            x = normalized(batch["features"].to(device).unsqueeze(1), normalize=normalize,
                           relative_to_peak=relative_to_peak)
            y = batch["target"].to(device)
            with torch.autocast(device.type, enabled=amp):
                logits = model(x).float()
            losses.append(loss_fn(logits, y, loss_function).item() * len(y))
            probs.append(probabilities(logits, loss_function).cpu().numpy())
            targets.append(y.cpu().numpy())
            rows.append(batch["row"].cpu().numpy())
    return {"row": np.concatenate(rows), "probs": np.concatenate(probs), "targets": np.concatenate(targets),
            "loss": np.array(sum(losses) / max(1, sum(len(t) for t in targets)))}


def validate(model: torch.nn.Module, batches: Iterable[Batch], s: LoopSettings, device: torch.device,
             metrics: dict[str, Any]) -> dict[str, np.ndarray]:
    """Evaluate on the validation set, add valid_* to the epoch's metrics, return the predictions."""
    result = evaluate(model, batches, s.loss_function, device, s.mixed_precision_inference,
                      normalize=s.normalize, relative_to_peak=s.relative_to_peak)
    metrics["valid_loss"] = float(result["loss"])
    metrics.update({f"valid_{k}": v for k, v in s.metrics_of(result["probs"], result["targets"]).items()})
    return result


def report_and_checkpoint(state: TrainState, metrics: dict[str, Any], predictions: dict[str, np.ndarray] | None,
                          s: LoopSettings, rank: int, tracker: FoldTracker | None = None) -> None:
    """Report the epoch to Ray Train; rank 0 also tracks the best epoch, writes the fold's files, logs the
    epoch to the experiment tracker and passes the checkpoint. An undefined score (NaN: e.g. ROC AUC on a
    one-class validation set) is never the best, since nothing would ever beat it. best_state.pt is written
    only once the checkpoint that holds those weights is reported."""
    import ray.train

    state.next_epoch += 1
    if rank != 0:
        ray.train.report(scalar_metrics(metrics))
        return
    state.history.append(metrics)
    score = metrics.get(METRIC_KEYS[s.metric])
    new_best = (score is not None and math.isfinite(score)
                and (state.best_score is None or _better(score, state.best_score, s.metric)))
    if new_best:
        state.best_score, state.best_epoch = float(score), state.next_epoch
        if s.save_best_checkpoint:
            state.best_model = {k: v.detach().cpu().clone() for k, v in state.model.state_dict().items()}
            state.best_predictions = ({k: torch.from_numpy(np.asarray(v)) for k, v in predictions.items()}
                                      if predictions is not None else None)
    storage.write_text(storage.join(s.fold_dir, "metrics.json"), json.dumps(state.history, indent=1))
    if s.run_dir:
        _live_report(s.run_dir)
    if tracker is not None:
        _track(tracker, state.next_epoch, metrics)
    last = state.next_epoch == s.epochs
    exported = exported_predictions(state, predictions, s)
    if last and exported is not None:
        frame = pd.DataFrame({"row": np.asarray(exported["row"])})
        for i, c in enumerate(s.classes):
            frame[f"prob_{c}"] = np.asarray(exported["probs"])[:, i]
            frame[f"true_{c}"] = np.asarray(exported["targets"])[:, i]
        storage.write_parquet(frame, storage.join(s.fold_dir, "valid_predictions.parquet"))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "state.pt").write_bytes(save_bytes(state.state_dict()))
        ray.train.report(scalar_metrics(metrics), checkpoint=ray.train.Checkpoint.from_directory(d))
    # After the report, and again at the last epoch: the file never holds weights no checkpoint kept, and a
    # resume that rolled a best epoch back rewrites it from the restored state.
    if s.save_best_checkpoint and state.best_model is not None and (new_best or last):
        storage.write_bytes(storage.join(s.fold_dir, "best_state.pt"), save_bytes(state.best_model))


def exported_predictions(state: TrainState, predictions: dict[str, np.ndarray] | None,
                         s: LoopSettings) -> dict[str, Any] | None:
    """The validation predictions of the weights the fold exports: the best epoch's with save_best_checkpoint
    (when an epoch had a defined score), else this epoch's."""
    if s.save_best_checkpoint and state.best_model is not None and state.best_predictions is not None:
        return state.best_predictions
    return predictions


def train_loop_per_worker(s: LoopSettings) -> None:
    """One fold on one Ray Train worker."""
    import ray.train
    import ray.train.torch

    storage.configure_s3(s.endpoint_url, s.region)
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        device = compute_device(f"rank {rank}")  # a granted GPU CUDA cannot use: an error unless allowed
    torch.manual_seed(s.seed + rank)
    np.random.seed((s.seed + rank) % (2**32))
    amp, amp_dtype = training_precision(device, s.mixed_precision_training)
    state = TrainState.create(s, device, amp, amp_dtype)
    restore(state, ray.train.get_checkpoint())
    model = ray.train.torch.prepare_model(state.model, move_to_device=device)  # DDP with several workers
    state.model = model.module if hasattr(model, "module") else model
    data = WorkerData(s, rank, device)
    # torch computes on one thread per CPU the worker holds (Ray's OMP_NUM_THREADS): recorded, as it sets the speed.
    where = {**placement(str(device)), "threads": torch.get_num_threads()}
    # Rank 0 only: it alone holds the validation metrics, and one writer per fold keeps each epoch once.
    tracker = _fold_tracker(s) if rank == 0 and s.tracking else None
    first_epoch = state.next_epoch
    try:
        for epoch in range(first_epoch, s.epochs):
            started = time.perf_counter()
            rows: list[np.ndarray] = []
            seed_epoch(s.seed, epoch, rank)
            metrics = train_one_epoch(model, state, data.train_batches(s.seed + epoch * 1000 + rank), s, device,
                                      amp, amp_dtype, rows)
            metrics["train_seconds"] = time.perf_counter() - started
            metrics.update(check_ranks(state.model, np.concatenate(rows) if rows else np.zeros(0, np.int64),
                                       where))
            if data.load_seconds is not None and epoch == first_epoch:
                metrics["shard_load_seconds"] = data.load_seconds  # once per worker start, before the first epoch
            predictions = None
            if rank == 0 and ((epoch + 1) % s.evaluate_every == 0 or epoch + 1 == s.epochs):
                predictions = validate(state.model, data.valid_batches(), s, device, metrics)
            metrics["epoch_seconds"] = time.perf_counter() - started
            report_and_checkpoint(state, metrics, predictions, s, rank, tracker)
    finally:
        if tracker is not None:
            tracker.close()


def _better(score: float, best: float, metric: str) -> bool:
    return score < best if metric == "LogLoss" else score > best


def _live_report(run_dir: str) -> None:
    """Refresh report.html while training runs; a chart that fails never stops training."""
    from gunsound.report import write_report

    try:
        write_report(run_dir, live=True)
    except Exception as exc:  # noqa: BLE001 - the report is a view, training is the job
        log.warning("live report not updated: %s", exc)


def _fold_tracker(s: LoopSettings) -> FoldTracker | None:
    """The fold's tracked run. A tracking store that fails is logged and training goes on: tracking is a view
    of the run, and every epoch's metrics stay in the fold's metrics.json."""
    try:
        return FoldTracker(s.tracking, posixpath.basename(s.fold_dir), s.epochs)
    except Exception as exc:  # noqa: BLE001 - see above
        log.warning("tracking: fold %s not tracked: %s", s.fold_dir, exc)
        return None


def _track(tracker: FoldTracker, epoch: int, metrics: dict[str, Any]) -> None:
    try:
        tracker.log_epoch(epoch, metrics)
    except Exception as exc:  # noqa: BLE001 - as in _fold_tracker
        log.warning("tracking: epoch %d not logged: %s", epoch, exc)


def scalar_metrics(metrics: dict) -> dict:
    """The numbers of an epoch's metrics (what Ray Train and metrics.json's per-fold summary carry)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}
