"""Training: a checked plan (manifest, audio parameters, folds), features through Ray Data, and one Ray Train
`TorchTrainer` run per fold.

Outputs under the run's location (local or s3://):
    config.yaml              the resolved settings (auto-chosen audio parameters and the drawn seed included)
    manifest.parquet         every clip with its fold
    metrics.json             per fold: every epoch's metrics
    fold_<k>/metrics.json    the same, rewritten after every epoch while the fold trains
    fold_<k>/model.pt        the final model with everything scoring needs
    fold_<k>/valid_predictions.parquet
    ray/fold_<k>/            Ray Train's checkpoints (a rerun of the same command resumes from them)
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from gunsound import storage
from gunsound.config import Config, ConfigError, config_from_dict
from gunsound.dataset import (
    AudioChoice,
    Manifest,
    Problem,
    assign_folds,
    choose_audio_parameters,
    load_manifest,
    num_folds,
)
from gunsound.features import FeatureParams, mel_frames
from gunsound.metrics import METRIC_KEYS, classification_metrics
from gunsound.model import ModelArtifact, build_model

log = logging.getLogger(__name__)

WORKER_GROUP_START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
FOLD_QUEUE_TIMEOUT_S = 7 * 24 * 3600


@dataclass
class TrainingPlan:
    cfg: Config  # resolved: audio parameters and seed filled in
    manifest: Manifest
    folds: np.ndarray
    audio: AudioChoice
    features: FeatureParams
    output: str
    fold_ids: list[int]
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        frame = self.manifest.frame
        counts = frame["label"].value_counts().sort_index()
        lines = [
            f"experiment      {self.cfg.experiment_name}",
            f"dataset         {self.manifest.source}: {len(frame)} clips, {len(self.manifest.classes)} classes"
            + (f", {len(self.manifest.dropped)} bad rows dropped" if self.manifest.dropped else ""),
            *(f"                  {label}: {n}" for label, n in counts.items()),
            f"audio           {self.audio.reason}",
            f"features        log-mel {self.features.n_mels} x {mel_frames(self.audio.chunk_seconds, self.features)}"
            f" (n_fft {self.features.n_fft}, hop {self.features.hop_length},"
            f" {self.features.f_min:g}-{self.features.f_max:g} Hz, normalize {self.features.normalize})",
            f"model           {self.cfg.architecture.backbone} (pretrained {self.cfg.architecture.pretrained},"
            f" pool {self.cfg.architecture.pool}, dropout {self.cfg.architecture.dropout})",
            f"training        {self.cfg.training.epochs} epochs, batch {self.cfg.training.batch_size},"
            f" lr {self.cfg.training.learning_rate:g}, {self.cfg.training.optimizer},"
            f" {self.cfg.training.schedule}, loss {self.cfg.training.loss_function}",
            f"validation      {num_folds(self.cfg.dataset)} folds, running {self.fold_ids}"
            f" (stratified by class, grouped by {self.cfg.dataset.group_fold_column or 'file'})",
            f"seed            {self.cfg.environment.seed}",
            f"output          {self.output}",
            *self.notes,
        ]
        for k in self.fold_ids:
            lines.append(f"fold {k}          train {(self.folds != k).sum()} clips, validate {(self.folds == k).sum()}")
        return "\n".join(lines)


def prepare(cfg: Config, data: str | None, output: str, drop_bad_rows: bool = False) -> TrainingPlan:
    """Check the dataset and settle everything a run needs, without training (this is --dry-run)."""
    s3 = storage.configure_s3(cfg.storage.endpoint_url, cfg.storage.region)
    output, data = storage.absolute(output), storage.absolute(data) if data else None
    resolved = config_from_dict(cfg.to_dict())
    # Workers may run in processes that never saw this environment; the endpoint travels in the config.
    resolved.storage.endpoint_url, resolved.storage.region = s3.endpoint_url, s3.region
    notes = []
    if resolved.environment.seed < 0:
        resolved.environment.seed = int(np.random.SeedSequence().entropy % (2**31))
        notes.append(f"note            seed -1: drew seed {resolved.environment.seed}")
        log.info("seed -1: drew seed %d", resolved.environment.seed)
    manifest = load_manifest(resolved, data, drop_bad_rows=drop_bad_rows)
    if resolved.training.loss_function == "CrossEntropy" and (manifest.frame["label"] == resolved.dataset.background_label).any():
        raise ConfigError("training.loss_function: CrossEntropy cannot learn from background clips (all-zero "
                          "targets); use BCE")
    choice = choose_audio_parameters(resolved, manifest)
    resolved.audio.sample_rate = choice.sample_rate
    resolved.audio.training_chunk_seconds = choice.chunk_seconds
    params = FeatureParams.from_config(resolved.audio, choice.sample_rate)
    if resolved.dataset.validation_dataframe:
        manifest, folds = _with_validation_dataframe(resolved, manifest, data, drop_bad_rows)
        notes.append(f"note            validation from {resolved.dataset.validation_dataframe} (one split, fold 0)")
        return TrainingPlan(resolved, manifest, folds, choice, params, output, [0], notes)
    k = num_folds(resolved.dataset)
    bad = [f for f in resolved.dataset.folds if f >= k]
    if bad:
        raise ConfigError(f"dataset.folds {bad}: validation_size {resolved.dataset.validation_size} gives folds 0..{k - 1}")
    folds = assign_folds(manifest, resolved.dataset, resolved.environment.seed)
    return TrainingPlan(resolved, manifest, folds, choice, params, output, list(resolved.dataset.folds), notes)


def _with_validation_dataframe(cfg: Config, train: Manifest, data: str | None,
                               drop_bad_rows: bool) -> tuple[Manifest, np.ndarray]:
    """A separate validation dataframe: its clips form fold 0 and every training clip trains (fold -1).
    Its rows are numbered after the training dataframe's so that `row` stays a unique key."""
    vcfg = config_from_dict(cfg.to_dict())
    vcfg.dataset.train_dataframe = cfg.dataset.validation_dataframe
    valid = load_manifest(vcfg, data, drop_bad_rows=drop_bad_rows)
    offset = int(train.frame["row"].max()) + 1
    vframe = valid.frame.assign(row=valid.frame["row"] + offset)
    overlap = set(train.frame["path"]) & set(vframe["path"])
    if overlap:
        raise ConfigError(f"dataset.validation_dataframe shares {len(overlap)} file(s) with the training data, "
                          f"e.g. {sorted(overlap)[0]}")
    frame = pd.concat([train.frame, vframe], ignore_index=True)
    classes = sorted(set(train.classes) | set(valid.classes))
    folds = np.r_[np.full(len(train.frame), -1), np.zeros(len(vframe), dtype=np.int64)]
    return Manifest(frame, classes, train.source, dropped=train.dropped + valid.dropped), folds


# ---------------------------------------------------------------- the loop that runs on every worker


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Parameters under `differential_learning_rate_layers` get the differential rate, the rest the base."""
    t = cfg.training
    special, base = [], []
    for name, p in model.named_parameters():
        (special if any(name.startswith(layer) for layer in t.differential_learning_rate_layers) else base).append(p)
    groups = [{"params": base, "lr": t.learning_rate}]
    if special:
        groups.append({"params": special, "lr": t.differential_learning_rate})
    if t.optimizer == "SGD":
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "AdamW" else torch.optim.Adam
    return cls(groups, weight_decay=t.weight_decay)


def lr_lambda(cfg: Config, steps_per_epoch: int):
    """Linear warmup over warmup_epochs, then cosine (or linear, or constant) decay, per optimizer step."""
    t = cfg.training
    total = max(1, t.epochs * steps_per_epoch)
    warmup = int(t.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if t.schedule == "Cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if t.schedule == "Linear":
            return 1 - progress
        return 1.0

    return factor


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "BCE":
        return F.binary_cross_entropy_with_logits(logits, targets)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def probabilities(logits: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.sigmoid(logits) if kind == "BCE" else torch.softmax(logits, dim=1)


def spec_augment(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Random time and frequency masks (one of each per clip), filled with the clip's mean."""
    a = cfg.augmentation
    if not a.time_mask_frames and not a.frequency_mask_bins:
        return x
    b, _, mels, frames = x.shape
    fill = x.mean(dim=(-2, -1), keepdim=True)
    mask = torch.zeros_like(x, dtype=torch.bool)
    for size, length, dim in ((a.frequency_mask_bins, mels, 2), (a.time_mask_frames, frames, 3)):
        if size <= 0:
            continue
        width = torch.randint(0, size + 1, (b,), device=x.device)
        start = (torch.rand(b, device=x.device) * (length - width).clamp_min(1)).long()
        pos = torch.arange(length, device=x.device)
        hit = (pos[None] >= start[:, None]) & (pos[None] < (start + width)[:, None])
        mask |= hit.view(b, 1, length, 1) if dim == 2 else hit.view(b, 1, 1, length)
    return torch.where(mask, fill, x)


def mixup(x: torch.Tensor, y: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix clips in the power domain of the log-mel (the sound of two sources played together).

    Ratio targets are the weighted sum; Max targets are the elementwise maximum (both guns were heard).
    """
    a = cfg.augmentation
    if a.mix_audio == "Disabled":
        return x, y
    for _ in range(a.mix_iterations):
        if torch.rand(()) >= a.mix_probability:
            continue
        lam = float(np.random.beta(a.mix_concentration, a.mix_concentration))
        perm = torch.randperm(x.shape[0], device=x.device)
        x = torch.logaddexp(x + math.log(max(lam, 1e-6)), x[perm] + math.log(max(1 - lam, 1e-6)))
        y = torch.maximum(y, y[perm]) if a.mix_target == "Max" else lam * y + (1 - lam) * y[perm]
    return x, y


def evaluate(model: torch.nn.Module, batches, cfg: Config, device: torch.device) -> dict[str, np.ndarray]:
    model.eval()
    rows, probs, targets, losses = [], [], [], []
    amp = device.type == "cuda" and cfg.environment.mixed_precision_inference
    with torch.inference_mode():
        for batch in batches:
            x = batch["features"].to(device).unsqueeze(1)
            y = batch["target"].to(device)
            with torch.autocast(device.type, enabled=amp):
                logits = model(x).float()
            losses.append(loss_fn(logits, y, cfg.training.loss_function).item() * len(y))
            probs.append(probabilities(logits, cfg.training.loss_function).cpu().numpy())
            targets.append(y.cpu().numpy())
            rows.append(batch["row"].cpu().numpy())
    return {"row": np.concatenate(rows), "probs": np.concatenate(probs), "targets": np.concatenate(targets),
            "loss": np.array(sum(losses) / max(1, sum(len(t) for t in targets)))}


def load_shard(shard, columns: list[str]) -> dict[str, np.ndarray]:
    """A worker's whole dataset shard as NumPy arrays (one pass over its blocks)."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        for c in columns:
            parts[c].append(np.asarray(batch[c]))
    if not parts[columns[0]]:
        raise RuntimeError("this worker's dataset shard is empty")
    return {c: np.concatenate(v) for c, v in parts.items()}


def shuffled_batches(arrays: dict[str, np.ndarray], batch_size: int, drop_last: bool, seed: int):
    """Batches of in-memory arrays in a fresh random order (a full shuffle, unlike a streaming buffer)."""
    n = len(next(iter(arrays.values())))
    order = np.random.default_rng(seed).permutation(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = np.sort(order[i:i + batch_size])  # sorted indices gather faster; the batch's order does not matter
        yield {c: torch.from_numpy(a[idx]) for c, a in arrays.items()}


def training_precision(device: torch.device, mixed_precision: bool) -> tuple[bool, torch.dtype]:
    """Autocast on CUDA only: bfloat16 where the GPU has it (no loss scaling needed), else float16 with a
    GradScaler. CPU autocast would slow the convolutions down rather than speed them up."""
    amp = device.type == "cuda" and mixed_precision
    return amp, (torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16)


def _save_state(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def train_loop_per_worker(loop_config: dict) -> None:
    """One fold on one Ray Train worker (DDP across workers when there are several)."""
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(loop_config["config"])
    storage.configure_s3(cfg.storage.endpoint_url, cfg.storage.region)
    classes: list[str] = loop_config["classes"]
    fold_dir: str = loop_config["fold_dir"]
    t = cfg.training
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.environment.seed + rank)
    np.random.seed((cfg.environment.seed + rank) % (2**32))

    model = build_model(cfg.architecture, len(classes)).to(device)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = loop_config["optimizer_steps_per_epoch"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    amp, amp_dtype = training_precision(device, cfg.environment.mixed_precision_training)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)

    history: list[dict] = []
    start_epoch, best_score, best_epoch = 0, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted worker or a rerun of the same command
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history, start_epoch = state["history"], state["epoch"] + 1
        best_score, best_epoch = state["best_score"], state["best_epoch"]
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model

    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")
    # A shard that fits is read once and reshuffled in memory each epoch: streaming it again costs a Ray Data
    # execution (a second or two) per epoch, which dominates short epochs.
    cached = loop_config.get("cache_shards", False)
    if cached:
        loading = time.perf_counter()
        train_arrays = load_shard(train_shard, ["features", "target"])
        valid_arrays = load_shard(valid_shard, ["row", "features", "target"]) if rank == 0 else None
        load_seconds = time.perf_counter() - loading
        log.info("worker %d holds its shard in memory: %d training clips, read in %.1f s",
                 rank, len(train_arrays["target"]), load_seconds)
    eval_every = max(1, round(t.evaluation_epochs))
    for epoch in range(start_epoch, t.epochs):
        started = time.perf_counter()
        model.train()
        batch_losses, seen, train_probs, train_targets = [], 0, [], []
        optimizer.zero_grad(set_to_none=True)
        seed = cfg.environment.seed + epoch * 1000 + rank
        if cached:
            batches = shuffled_batches(train_arrays, t.batch_size, t.drop_last_batch, seed)
        else:
            batches = train_shard.iter_torch_batches(
                batch_size=t.batch_size, drop_last=t.drop_last_batch, local_shuffle_buffer_size=4 * t.batch_size,
                local_shuffle_seed=seed,
            )
        for step, batch in enumerate(batches):
            x = batch["features"].to(device, non_blocking=True).unsqueeze(1)
            y = batch["target"].to(device, non_blocking=True)
            x, y = mixup(spec_augment(x, cfg), y, cfg)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                logits = model(x).float()
                loss = loss_fn(logits, y, t.loss_function)
            scaler.scale(loss / t.grad_accumulation).backward()
            if (step + 1) % t.grad_accumulation == 0:
                if t.gradient_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.gradient_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            batch_losses.append(loss.item())
            seen += len(y)
            if t.calculate_train_metric:
                train_probs.append(probabilities(logits.detach().float(), t.loss_function).cpu().numpy())
                train_targets.append((y > 0.5).float().cpu().numpy())
        metrics = {"epoch": epoch + 1, "train_loss": float(np.mean(batch_losses)) if batch_losses else float("nan"),
                   "train_batch_loss": batch_losses, "lr": scheduler.get_last_lr()[0], "train_clips": seen,
                   "device": str(device), "precision": str(amp_dtype if amp else torch.float32).split(".")[-1]}
        if train_probs:  # on the augmented training batches, as seen by this worker
            metrics.update({f"train_{k}": v for k, v in classification_metrics(
                np.concatenate(train_probs), np.concatenate(train_targets), classes,
                cfg.prediction.probability_threshold, cfg.dataset.background_label).items()})
        last = epoch + 1 == t.epochs
        predictions = None
        metrics["train_seconds"] = time.perf_counter() - started
        if cached and epoch == start_epoch:
            metrics["shard_load_seconds"] = load_seconds  # once per worker start, before the first epoch
        if rank == 0 and ((epoch + 1) % eval_every == 0 or last):
            valid_batches = (shuffled_batches(valid_arrays, 64, False, 0) if cached
                             else valid_shard.iter_torch_batches(batch_size=64))
            result = evaluate(core, valid_batches, cfg, device)
            metrics["valid_loss"] = float(result["loss"])
            metrics.update({f"valid_{k}": v for k, v in classification_metrics(
                result["probs"], result["targets"], classes, cfg.prediction.probability_threshold,
                cfg.dataset.background_label).items()})
            predictions = result
        metrics["epoch_seconds"] = time.perf_counter() - started

        if rank == 0:
            history.append(metrics)
            score = metrics.get(METRIC_KEYS[cfg.prediction.metric])
            if score is not None and (best_score is None or _better(score, best_score, cfg.prediction.metric)):
                best_score, best_epoch = score, epoch + 1
                if t.save_best_checkpoint:
                    storage.write_bytes(storage.join(fold_dir, "best_state.pt"), _save_state(core.state_dict()))
            storage.write_text(storage.join(fold_dir, "metrics.json"), json.dumps(history, indent=1))
            if loop_config.get("run_dir"):
                _live_report(loop_config["run_dir"])
            if last and predictions is not None:
                frame = pd.DataFrame({"row": predictions["row"]})
                for i, c in enumerate(classes):
                    frame[f"prob_{c}"] = predictions["probs"][:, i]
                    frame[f"true_{c}"] = predictions["targets"][:, i]
                storage.write_parquet(frame, storage.join(fold_dir, "valid_predictions.parquet"))
            state = {"model": core.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch, "history": history, "best_score": best_score, "best_epoch": best_epoch}
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "state.pt").write_bytes(_save_state(state))
                ray.train.report(_scalar_metrics(metrics), checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(_scalar_metrics(metrics))


def _better(score: float, best: float, metric: str) -> bool:
    return score < best if metric == "LogLoss" else score > best


def _live_report(run_dir: str) -> None:
    """Refresh report.html while training runs; a chart that fails never stops training."""
    from gunsound.report import write_report

    try:
        write_report(run_dir, live=True)
    except Exception as exc:  # noqa: BLE001 - the report is a view, training is the job
        log.warning("live report not updated: %s", exc)


def _scalar_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


# ---------------------------------------------------------------- the driver


def worker_sizing(cfg: Config, gpus_in_cluster: float) -> tuple[int, float, float]:
    env = cfg.environment
    gpus_per_worker = env.gpus_per_worker if env.gpus_per_worker is not None else (1.0 if gpus_in_cluster else 0.0)
    if env.workers_per_fold is not None:
        workers = env.workers_per_fold
    elif gpus_per_worker:
        workers = max(1, min(len(env.gpus), int(gpus_in_cluster // gpus_per_worker)))
    else:
        workers = 1
    return workers, gpus_per_worker, env.cpus_per_worker


def featurize(plan: TrainingPlan, drop_bad_rows: bool = False):
    """Features of every clip in the manifest, materialized once for all folds."""
    import ray.data
    from ray.data.expressions import col

    from gunsound.ray_features import feature_dataset

    # Datasets carry this context to the Train workers: no progress bars interleaved with training logs.
    ray.data.DataContext.get_current().enable_progress_bars = False
    frame = plan.manifest.frame
    targets = plan.manifest.targets(plan.cfg.dataset.background_label)
    clips = pd.DataFrame({"row": frame["row"].to_numpy(), "path": frame["path"], "fold": plan.folds,
                          "target": list(targets)})
    ds = feature_dataset(clips, plan.features, plan.audio.chunk_seconds).materialize()
    errors = ds.select_columns(["row", "path", "error"]).filter(expr=col("error") != "").to_pandas()
    if len(errors):
        problems = [Problem(int(r.row), r.path, r.error) for r in errors.itertuples()]
        if not drop_bad_rows:
            from gunsound.dataset import ManifestError

            raise ManifestError(plan.manifest.source, problems)
        for p in problems:
            log.warning("dropped row %d %s: %s", p.row, p.path, p.reason)
        ds = ds.filter(expr=col("error") == "").materialize()
    return ds


def make_trainer(plan: TrainingPlan, k: int, train_ds, valid_ds, fold_dir: str, name: str, storage_dir: str,
                 callbacks: list | None = None, run_dir: str | None = None):
    """The Ray Train TorchTrainer for fold k of a plan (also what every Tune trial fits)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from gunsound.ray_runtime import cluster_gpus

    workers, gpus_per_worker, cpus_per_worker = worker_sizing(plan.cfg, cluster_gpus())
    t = plan.cfg.training
    n_valid = int(np.sum(plan.folds == k))
    n_train = len(plan.folds) - n_valid + (n_valid if t.train_validation_data else 0)
    per_worker = n_train // workers
    batches = per_worker // t.batch_size if t.drop_last_batch else math.ceil(per_worker / t.batch_size)
    clip_bytes = 4 * (plan.features.n_mels * mel_frames(plan.audio.chunk_seconds, plan.features)
                      + len(plan.manifest.classes))
    cache_shards = (per_worker + n_valid) * clip_bytes <= plan.cfg.environment.shard_cache_mb * 2**20
    storage_path, storage_fs = storage.storage_path_for_ray(storage_dir)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": plan.cfg.to_dict(), "classes": plan.manifest.classes, "fold_dir": fold_dir,
                           "optimizer_steps_per_epoch": max(1, batches // t.grad_accumulation),
                           "run_dir": run_dir, "cache_shards": cache_shards},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=gpus_per_worker > 0,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=3),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
        ),
        datasets={"train": train_ds, "valid": valid_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def fit_fold(plan: TrainingPlan, k: int, train_ds, valid_ds) -> dict:
    """Train one fold with Ray Train and export its model; returns the fold's epoch history."""
    storage.configure_s3(plan.cfg.storage.endpoint_url, plan.cfg.storage.region)
    t = plan.cfg.training
    fold_dir = storage.join(plan.output, f"fold_{k}")
    trainer = make_trainer(plan, k, train_ds, valid_ds, fold_dir, f"fold_{k}", storage.join(plan.output, "ray"),
                           run_dir=plan.output)
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
    weights = state["model"]
    if t.save_best_checkpoint and storage.exists(storage.join(fold_dir, "best_state.pt")):
        weights = storage.read_torch(storage.join(fold_dir, "best_state.pt"))
    ModelArtifact(classes=plan.manifest.classes, features=plan.features, chunk_seconds=plan.audio.chunk_seconds,
                  architecture=plan.cfg.architecture, loss_function=t.loss_function, state_dict=weights,
                  fold=int(k), best_epoch=state.get("best_epoch")).save(storage.join(fold_dir, "model.pt"))
    return {"epochs": [_scalar_metrics(m) for m in state["history"]], "final": _scalar_metrics(state["history"][-1])}


def cross_validate(plan: TrainingPlan) -> dict:
    """Out-of-fold predictions of every planned fold -> oof_predictions.parquet and the CV metrics."""
    from gunsound.metrics import classification_metrics, mean_and_spread, per_class_report

    classes, cfg = plan.manifest.classes, plan.cfg
    frames = []
    for k in plan.fold_ids:
        pred = storage.read_parquet(storage.join(plan.output, f"fold_{k}", "valid_predictions.parquet"))
        frames.append(pred.assign(fold=k))
    oof = pd.concat(frames, ignore_index=True)
    manifest = plan.manifest.frame.set_index("row")
    oof.insert(1, "file", manifest.loc[oof["row"], "rel_path"].to_numpy())
    oof.insert(2, "label", manifest.loc[oof["row"], "label"].to_numpy())
    storage.write_parquet(oof, storage.join(plan.output, "oof_predictions.parquet"))
    probs = oof[[f"prob_{c}" for c in classes]].to_numpy()
    targets = oof[[f"true_{c}" for c in classes]].to_numpy()
    args = (cfg.prediction.probability_threshold, cfg.dataset.background_label)
    per_fold = {}
    for k, part in oof.groupby("fold"):
        per_fold[str(k)] = classification_metrics(part[[f"prob_{c}" for c in classes]].to_numpy(),
                                                  part[[f"true_{c}" for c in classes]].to_numpy(), classes, *args)
    summary = {name: mean_and_spread([m[name] for m in per_fold.values()])
               for name in ("roc_auc", "accuracy", "f1", "log_loss")}
    return {"folds": plan.fold_ids, "per_fold": per_fold, "mean_over_folds": summary,
            "pooled": classification_metrics(probs, targets, classes, *args),
            **per_class_report(probs, targets, classes, *args)}


def fold_datasets(plan: TrainingPlan, ds, k: int):
    """Fold k's training and validation sets, materialized so that Train workers only read blocks and need
    no CPU for Ray Data tasks (on a small machine the workers hold every CPU)."""
    from ray.data.expressions import col

    train_all = ds if plan.cfg.training.train_validation_data else ds.filter(expr=col("fold") != k)
    train_ds = train_all.select_columns(["features", "target"]).materialize()
    valid_ds = ds.filter(expr=col("fold") == k).select_columns(["row", "features", "target"]).materialize()
    return train_ds, valid_ds


def finished_fold(plan: TrainingPlan, k: int) -> dict | None:
    """The history of a fold that an earlier run of the same command already finished, else None."""
    fold_dir = storage.join(plan.output, f"fold_{k}")
    if not (storage.exists(storage.join(fold_dir, "model.pt")) and storage.exists(storage.join(fold_dir, "metrics.json"))):
        return None
    history = json.loads(storage.read_text(storage.join(fold_dir, "metrics.json")))
    if len(history) != plan.cfg.training.epochs:
        return None
    return {"epochs": [_scalar_metrics(m) for m in history], "final": _scalar_metrics(history[-1])}


def run(plan: TrainingPlan, drop_bad_rows: bool = False) -> dict:
    """Train every planned fold (concurrently when the cluster has room); returns what metrics.json holds.

    Rerunning the same command with the same output resumes: finished folds are kept, unfinished ones
    continue from their last checkpoint."""
    import ray

    from gunsound.ray_runtime import init_ray

    init_ray(plan.cfg.environment.ray_address)
    out = plan.output
    storage.makedirs(out)
    storage.write_text(storage.join(out, "config.yaml"), plan.cfg.to_yaml())
    storage.write_parquet(plan.manifest.frame.assign(fold=plan.folds), storage.join(out, "manifest.parquet"))
    if plan.manifest.dropped:
        storage.write_parquet(pd.DataFrame([asdict(p) for p in plan.manifest.dropped]), storage.join(out, "dropped_rows.parquet"))

    results: dict = {"classes": plan.manifest.classes, "audio": {"sample_rate": plan.audio.sample_rate,
                     "chunk_seconds": plan.audio.chunk_seconds, "reason": plan.audio.reason}, "folds": {}}
    done = {k: h for k in plan.fold_ids if (h := finished_fold(plan, k)) is not None}
    for k in done:
        log.info("fold %d: finished by an earlier run, kept", k)
    todo = [k for k in plan.fold_ids if k not in done]
    pending = {}
    if todo:
        ds = featurize(plan, drop_bad_rows)
        # A fold's driver holds almost nothing; its Train workers reserve their own resources, so folds
        # queue for workers when the cluster is full and run side by side when it is not.
        # Ray Train gives up waiting for a worker group after 60 s and retries, logging an error each time;
        # a fold queued behind others should simply wait (Ray Train reads this variable where fit() runs).
        queue_timeout = os.environ.get(WORKER_GROUP_START_TIMEOUT_VAR, str(FOLD_QUEUE_TIMEOUT_S))
        remote_fit = ray.remote(num_cpus=0.01, max_retries=0, runtime_env={
            "env_vars": {WORKER_GROUP_START_TIMEOUT_VAR: queue_timeout}})(fit_fold)
        for k in todo:
            train_ds, valid_ds = fold_datasets(plan, ds, k)
            log.info("fold %d: %d train / %d validation clips", k, train_ds.count(), valid_ds.count())
            pending[k] = remote_fit.remote(plan, k, train_ds, valid_ds)
    for k in plan.fold_ids:
        results["folds"][str(k)] = done[k] if k in done else ray.get(pending[k])
    results["cv"] = cross_validate(plan)
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(results, indent=1))
    storage.write_text(storage.join(out, "ensemble.json"), json.dumps(
        {"models": [f"fold_{k}/model.pt" for k in plan.fold_ids], "combine": "mean_probability"}, indent=1))
    from gunsound.report import write_report

    log.info("report: %s", write_report(out))
    return results
