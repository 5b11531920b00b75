"""Training: features through Ray Data, then one Ray Train `TorchTrainer` run per fold (the plan comes from
`gunsound.plan`, the loop on every worker from `gunsound.train_loop`).

Outputs under the run's location (local or s3://):
    fingerprint.json         what the run was made with: a rerun resumes only the same settings and data
    lease.json               while a job trains into the location (one job at a time)
    config.yaml              the resolved settings (auto-chosen audio parameters and the drawn seed included)
    manifest.parquet         every clip with its fold
    metrics.json             per fold: every epoch's metrics; "cv": the cross-validated metrics
    oof_predictions.parquet  every planned fold's validation probabilities
    ensemble.json            the fold models that score together
    fold_<k>/metrics.json    every epoch's metrics, rewritten after every epoch while the fold trains
    fold_<k>/model.pt        the final model with everything scoring needs
    fold_<k>/valid_predictions.parquet
    ray/fold_<k>/            Ray Train's checkpoints (a rerun of the same command resumes from them)
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from gunsound import fingerprint, storage, tracking, weights
from gunsound.config import ConfigError, EnvironmentConfig
from gunsound.dataset import Problem
from gunsound.features import mel_frames
from gunsound.lease import OutputLease
from gunsound.metrics import cross_validated_metrics
from gunsound.model import ModelArtifact
from gunsound.plan import TrainingPlan
from gunsound.resources import (
    ClusterCapacity,
    TrainWorkers,
    cluster_capacity,
    describe_placement,
    folds_at_once,
    train_workers,
    uses_gpus,
)
from gunsound.train_loop import LoopSettings, scalar_metrics, train_loop_per_worker

if TYPE_CHECKING:
    from ray.data import Dataset
    from ray.train.torch import TorchTrainer

log = logging.getLogger(__name__)

# What a training run writes into its OUTPUT: all that --overwrite removes there.
# tracking.json and tensorboard/ among them: an overwritten run is tracked as a new run, not mixed into the old.
TRAINING_OUTPUTS = ("config.yaml", "manifest.parquet", "dropped_rows.parquet", "metrics.json",
                    "oof_predictions.parquet", "ensemble.json", "report.html", "*.png", "fold_*", "ray",
                    "tracking.json", "tensorboard")
WORKER_GROUP_START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
FOLD_QUEUE_TIMEOUT_S = 7 * 24 * 3600


def fold_workers(env: EnvironmentConfig, capacity: ClusterCapacity) -> TrainWorkers:
    """The Train workers each fold asks for, from the config and what the cluster may hold (`resources`)."""
    return train_workers(device=env.device, listed_gpus=len(env.gpus), workers_per_fold=env.workers_per_fold,
                         gpus_per_worker=env.gpus_per_worker, cpus_per_worker=env.cpus_per_worker,
                         capacity=capacity)


def planned_workers(env: EnvironmentConfig, capacity: ClusterCapacity) -> TrainWorkers:
    """Size the folds on the connected cluster and say so in the log."""
    sizing = fold_workers(env, capacity)
    log.info("each fold asks for %s (environment.device %s; cluster %s)", sizing.describe(), env.device,
             capacity.describe())
    return sizing


def clip_table(plan: TrainingPlan) -> pd.DataFrame:
    """Every clip of the manifest with its fold and target, in a random order drawn from environment.seed. A
    folder-per-class manifest is sorted by class and a feature block holds 32-64 consecutive rows: in manifest
    order a streamed shard's blocks, and so its batches, would each hold one class."""
    frame = plan.manifest.frame
    targets = plan.manifest.targets(plan.cfg.dataset.background_label)
    clips = pd.DataFrame({"row": frame["row"].to_numpy(), "path": frame["path"].to_numpy(),
                          "fold": np.asarray(plan.folds), "target": list(targets)})
    order = np.random.default_rng(plan.cfg.environment.seed % 2**63).permutation(len(clips))
    return clips.iloc[order].reset_index(drop=True)


def featurize(plan: TrainingPlan, drop_bad_rows: bool = False, capacity: ClusterCapacity | None = None) -> Dataset:
    """Features of every clip in the manifest (in `clip_table`'s order), materialized once for all folds, sized
    against `capacity` (default: read from the connected cluster)."""
    import ray.data
    from ray.data.expressions import col

    from gunsound.ray_features import feature_dataset

    # Datasets carry this context to the Train workers: no progress bars interleaved with training logs.
    ray.data.DataContext.get_current().enable_progress_bars = False
    clips = clip_table(plan)
    capacity = capacity or cluster_capacity()
    gpus = min(capacity.most("GPU"), 1024) if uses_gpus(plan.cfg.environment.device, capacity) else 0.0
    # In natural-log power: the Train workers augment the sound, then normalise (`features.normalized`).
    ds = feature_dataset(clips, plan.features.unnormalized(), plan.audio.chunk_seconds, gpus=gpus,
                         cpus=int(min(capacity.most("CPU"), 4096))).materialize()
    errors = ds.select_columns(["row", "path", "error"]).filter(expr=col("error") != "").to_pandas()
    if len(errors):
        problems = sorted((Problem(int(r.row), r.path, r.error) for r in errors.itertuples()), key=lambda p: p.row)
        if not drop_bad_rows:
            from gunsound.dataset import ManifestError

            raise ManifestError(plan.manifest.source, problems)
        for p in problems:
            log.warning("dropped row %d %s: %s", p.row, p.path, p.reason)
        ds = ds.filter(expr=col("error") == "").materialize()
    return ds


def worker_batches(n_train: int, workers: int, batch_size: int, drop_last_batch: bool,
                   what: str = "the training set") -> int:
    """Batches each Train worker gets per epoch (Ray Train splits the training set equally). None is refused
    as a setting, before anything trains: every epoch would take no step and the fold would export untrained
    weights."""
    per_worker = n_train // workers
    batches = per_worker // batch_size if drop_last_batch else math.ceil(per_worker / batch_size)
    if batches == 0:
        raise ConfigError(
            f"{what}: {n_train} clips over {workers} Train worker(s) is {per_worker} clips per worker, "
            f"fewer than training.batch_size {batch_size} with training.drop_last_batch "
            f"{str(drop_last_batch).lower()}: no worker would get a batch to train on. Lower "
            f"training.batch_size, set training.drop_last_batch=false or use fewer workers "
            f"(environment.workers_per_fold)")
    return batches


def optimizer_steps_per_epoch(n_train: int, workers: int, batch_size: int, drop_last_batch: bool,
                              grad_accumulation: int, what: str = "the training set") -> int:
    """Optimizer steps a worker takes per epoch: one per `grad_accumulation` batches, and one more for a last,
    partial accumulation (`train_loop.train_one_epoch` steps it too), so the schedule ends where training does.
    Raises ConfigError where a worker would get no batch (`worker_batches`)."""
    batches = worker_batches(n_train, workers, batch_size, drop_last_batch, what)
    return math.ceil(batches / grad_accumulation)


def check_fold_shards(plan: TrainingPlan, folds: np.ndarray, fold_ids: list[int], sizing: TrainWorkers) -> None:
    """Refuse, before any fold trains, folds whose Train workers would get no batch: `folds` holds the fold of
    every clip that will be featurized (or was), as `fold_datasets` splits them."""
    t = plan.cfg.training
    folds = np.asarray(folds)
    for k in fold_ids:
        n_train = len(folds) if t.train_validation_data else int((folds != k).sum())
        worker_batches(n_train, sizing.workers, t.batch_size, t.drop_last_batch, f"fold {k}'s training set")


# A streamed shard's local shuffle buffer: many feature blocks (at most 64 clips each, `ray_features`), within
# this much of a Train worker's memory, and never under 4 batches.
SHUFFLE_BUFFER_BLOCKS = 16
SHUFFLE_BUFFER_MB = 256


def shuffle_buffer_clips(per_worker: int, batch_size: int, clip_bytes: int) -> int:
    """Clips a streamed shard shuffles among (`worker_data.WorkerData.train_batches`)."""
    wanted = min(SHUFFLE_BUFFER_BLOCKS * 64, SHUFFLE_BUFFER_MB * 2**20 // max(1, clip_bytes), per_worker)
    return int(max(wanted, 4 * batch_size))


def predicts_background(plan: TrainingPlan) -> bool:
    """Whether a clip under the probability threshold is predicted as background: decided once for the
    dataset (its manifest holds background clips), so every fold and the pooled figures score alike."""
    return bool((plan.manifest.frame["label"] == plan.cfg.dataset.background_label).any())


def make_trainer(plan: TrainingPlan, k: int, train_ds: Dataset, valid_ds: Dataset, fold_dir: str, name: str,
                 storage_dir: str, sizing: TrainWorkers, callbacks: list[Any] | None = None,
                 run_dir: str | None = None) -> TorchTrainer:
    """The Ray Train TorchTrainer for fold k of a plan (also what every Tune trial fits). The schedule is sized
    from the clips the fold's datasets hold: rows that featurize(drop_bad_rows=True) dropped are in the plan's
    folds but never trained."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    workers, gpus_per_worker, cpus_per_worker = sizing.workers, sizing.gpus_per_worker, sizing.cpus_per_worker
    t = plan.cfg.training
    n_train, n_valid = train_ds.count(), valid_ds.count()
    per_worker = n_train // workers
    clip_bytes = 4 * (plan.features.n_mels * mel_frames(plan.audio.chunk_seconds, plan.features)
                      + len(plan.manifest.classes))
    cache_shards = (per_worker + n_valid) * clip_bytes <= plan.cfg.environment.shard_cache_mb * 2**20
    steps = optimizer_steps_per_epoch(n_train, workers, t.batch_size, t.drop_last_batch, t.grad_accumulation,
                                      f"fold {k}'s training set")
    storage_path, storage_fs = storage.storage_path_for_ray(storage_dir)
    return TorchTrainer(
        train_loop_per_worker,
        # One worker exchanges nothing: gloo sets it up anywhere, without an NCCL communicator on its GPU.
        torch_config=TorchConfig(backend="gloo") if workers == 1 else None,
        train_loop_config=LoopSettings.from_config(
            plan.cfg, classes=plan.manifest.classes, fold_dir=fold_dir, run_dir=run_dir, cache_shards=cache_shards,
            shuffle_buffer_clips=shuffle_buffer_clips(per_worker, t.batch_size, clip_bytes),
            predict_background=predicts_background(plan), optimizer_steps_per_epoch=steps),
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


def fit_fold(plan: TrainingPlan, k: int, train_ds: Dataset, valid_ds: Dataset, sizing: TrainWorkers, *,
             queue_timeout_s: str) -> dict:
    """Train one fold with Ray Train and export its model; returns the fold's epoch history. The fold waits up
    to `queue_timeout_s` for its worker group."""
    storage.configure_s3(plan.cfg.storage.endpoint_url, plan.cfg.storage.region)
    t = plan.cfg.training
    fold_dir = storage.join(plan.output, f"fold_{k}")
    trainer = make_trainer(plan, k, train_ds, valid_ds, fold_dir, f"fold_{k}", storage.join(plan.output, "ray"),
                           sizing, run_dir=plan.output)
    # Ray Train reads the variable from the environment of the process that calls fit(): set here, for this
    # call only, not in the task's runtime_env, since a task with a runtime_env of its own cannot run in the
    # workers Ray keeps warm (torch already imported by the feature tasks) and starts a process of its own.
    before = os.environ.get(WORKER_GROUP_START_TIMEOUT_VAR)
    os.environ[WORKER_GROUP_START_TIMEOUT_VAR] = queue_timeout_s
    try:
        result = trainer.fit()
    finally:
        if before is None:
            os.environ.pop(WORKER_GROUP_START_TIMEOUT_VAR)
        else:
            os.environ[WORKER_GROUP_START_TIMEOUT_VAR] = before
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    model_weights, epoch = exported_weights(state, t.save_best_checkpoint)
    ModelArtifact(classes=plan.manifest.classes, features=plan.features, chunk_seconds=plan.audio.chunk_seconds,
                  architecture=plan.cfg.architecture, loss_function=t.loss_function, state_dict=model_weights,
                  fold=int(k), best_epoch=epoch).save(storage.join(fold_dir, "model.pt"))
    if epoch != len(state["history"]):
        log.info("fold %d: model.pt holds epoch %d, the best by %s; its metrics are the fold's final figures",
                 k, epoch, plan.cfg.prediction.metric)
    return {**fold_summary(state["history"], epoch), "workers": state["history"][-1].get("workers", [])}


def fold_summary(history: list[dict], exported_epoch: int) -> dict:
    """A fold's epochs and its final figures: those of the epoch whose weights model.pt holds (the best epoch
    with save_best_checkpoint, else the last), which `exported_epoch` names (1-based)."""
    final = next((m for m in history if m.get("epoch") == exported_epoch), history[-1])
    return {"epochs": [scalar_metrics(m) for m in history], "final": scalar_metrics(final),
            "exported_epoch": int(final.get("epoch", len(history)))}


def exported_weights(state: dict, save_best_checkpoint: bool) -> tuple[dict, int]:
    """The weights a fold exports from its last checkpoint and the epoch (1-based) they are from: the best
    epoch's with save_best_checkpoint (when any epoch had a defined score), else the last epoch's."""
    if save_best_checkpoint and state.get("best_model") is not None:
        return state["best_model"], int(state["best_epoch"])
    return state["model"], int(state["epoch"]) + 1


def describe_worker(worker: dict) -> str:
    """One Train worker's placement, as the fold's metrics record it (`ddp.placement`)."""
    return f"rank {worker['rank']}: {describe_placement(worker)}"


def cross_validate(plan: TrainingPlan, fold_ids: list[int]) -> dict:
    """Out-of-fold predictions of the finished folds `fold_ids` -> oof_predictions.parquet and the CV metrics."""
    classes = plan.manifest.classes
    frames = []
    for k in fold_ids:
        pred = storage.read_parquet(storage.join(plan.output, f"fold_{k}", "valid_predictions.parquet"))
        frames.append(pred.assign(fold=k))
    oof = pd.concat(frames, ignore_index=True)
    manifest = plan.manifest.frame.set_index("row")
    oof.insert(1, "file", manifest.loc[oof["row"], "rel_path"].to_numpy())
    oof.insert(2, "label", manifest.loc[oof["row"], "label"].to_numpy())
    storage.write_parquet(oof, storage.join(plan.output, "oof_predictions.parquet"))
    return {"folds": fold_ids, **cross_validated_metrics(
        oof, classes, plan.cfg.prediction.probability_threshold, plan.cfg.dataset.background_label,
        predicts_background(plan))}


def fold_datasets(plan: TrainingPlan, ds: Dataset, k: int) -> tuple[Dataset, Dataset]:
    """Fold k's training and validation sets, materialized so that Train workers only read blocks and need
    no CPU for Ray Data tasks (on a small machine the workers hold every CPU). The training set's blocks come
    in another order every epoch (every execution; seeded from environment.seed and k), which only reorders
    block references: a streamed shard is not the same blocks in the same order each epoch."""
    from ray.data import RandomSeedConfig
    from ray.data.expressions import col

    train_all = ds if plan.cfg.training.train_validation_data else ds.filter(expr=col("fold") != k)
    seed = RandomSeedConfig(seed=(plan.cfg.environment.seed + k) % 2**32, reseed_after_execution=True)
    train_ds = (train_all.select_columns(["row", "features", "target"]).materialize()
                .randomize_block_order(seed=seed))
    valid_ds = ds.filter(expr=col("fold") == k).select_columns(["row", "features", "target"]).materialize()
    return train_ds, valid_ds


def finished_fold(plan: TrainingPlan, k: int) -> dict | None:
    """The history of a fold that an earlier run of the same command already finished, else None; its final
    figures are those of the epoch its model.pt holds."""
    fold_dir = storage.join(plan.output, f"fold_{k}")
    model_file = storage.join(fold_dir, "model.pt")
    if not (storage.exists(model_file) and storage.exists(storage.join(fold_dir, "metrics.json"))):
        return None
    history = json.loads(storage.read_text(storage.join(fold_dir, "metrics.json")))
    if len(history) != plan.cfg.training.epochs:
        return None
    return fold_summary(history, ModelArtifact.load(model_file).best_epoch or len(history))


def run(plan: TrainingPlan, drop_bad_rows: bool = False, overwrite: bool = False) -> dict:
    """Train every planned fold (concurrently when the cluster has room); returns what metrics.json holds.

    Rerunning the same command with the same output resumes: finished folds are kept, unfinished ones
    continue from their last checkpoint. A rerun with other settings or data is refused before anything
    starts (`fingerprint.OutputMismatch`), and so is a second job while one trains there (`lease.LeaseHeld`);
    `overwrite` removes the earlier run's outputs and starts afresh."""
    storage.makedirs(plan.output)
    with OutputLease(plan.output, "gunsound train"):
        frame = plan.manifest.frame.assign(fold=plan.folds)
        claim = fingerprint.training_fingerprint(plan.cfg, frame, plan.manifest.source)
        # Before anything is written or Ray starts: weights that cannot be had fail here, in seconds.
        plan.cfg.architecture = weights.resolve_pretrained(plan.cfg.architecture, plan.output)
        fingerprint.claim(plan.output, claim, overwrite=overwrite, owned=TRAINING_OUTPUTS)
        tracker = tracking.TrackingSettings.from_config(plan.cfg, plan.output)
        tracking.start_run(tracker, plan.cfg.to_dict())  # before Ray starts: a refused tracking store fails in seconds
        try:
            results = _train(plan, frame, drop_bad_rows)
        except BaseException:
            tracking.finish_run_quietly(tracker, None, failed=True)
            raise
        tracking.finish_run_quietly(tracker, results)
        return results


def start_ray(plan: TrainingPlan) -> None:
    """Connect to the cluster, or start a local Ray whose object store holds this plan's features."""
    from gunsound.ray_features import feature_bytes
    from gunsound.ray_runtime import init_ray, object_store_bytes_for

    features = feature_bytes(len(plan.manifest.frame), plan.features, plan.audio.chunk_seconds)
    init_ray(plan.cfg.environment.ray_address, object_store_bytes=object_store_bytes_for(features))


def _train(plan: TrainingPlan, manifest: pd.DataFrame, drop_bad_rows: bool) -> dict:
    import ray

    out = plan.output
    storage.write_text(storage.join(out, "config.yaml"), plan.cfg.to_yaml())
    start_ray(plan)
    storage.write_parquet(manifest, storage.join(out, "manifest.parquet"))
    if plan.manifest.dropped:
        storage.write_parquet(pd.DataFrame([asdict(p) for p in plan.manifest.dropped]), storage.join(out, "dropped_rows.parquet"))

    results: dict = {"classes": plan.manifest.classes, "audio": {"sample_rate": plan.audio.sample_rate,
                     "chunk_seconds": plan.audio.chunk_seconds, "reason": plan.audio.reason}, "folds": {}}
    done = {k: h for k in plan.fold_ids if (h := finished_fold(plan, k)) is not None}
    for k in done:
        log.info("fold %d: finished by an earlier run, kept", k)
    todo = [k for k in plan.fold_ids if k not in done]
    folds = dict(done)
    if todo:
        capacity = cluster_capacity()
        sizing = planned_workers(plan.cfg.environment, capacity)
        check_fold_shards(plan, plan.folds, todo, sizing)  # before featurizing: a refusal takes seconds
        ds = featurize(plan, drop_bad_rows, capacity)
        if drop_bad_rows:  # the clips that featurized, as the folds will split them
            check_fold_shards(plan, ds.select_columns(["fold"]).to_pandas()["fold"].to_numpy(), todo, sizing)
        # A fold's driver holds no CPU, only waits on its trainer: its Train workers reserve their own
        # resources, so folds run side by side where the cluster has room, and a worker may take every CPU
        # of a node. Only as many folds start as the cluster can ever hold; the rest wait here, as a number.
        # Ray Train gives up waiting for a worker group after 60 s and retries, logging an error each time;
        # a fold that waits for another's workers (another job's too) should simply wait (Ray Train reads
        # this variable where fit() runs).
        queue_timeout = os.environ.get(WORKER_GROUP_START_TIMEOUT_VAR, str(FOLD_QUEUE_TIMEOUT_S))
        remote_fit = ray.remote(num_cpus=0, max_retries=0)(fit_fold)
        at_once = folds_at_once(sizing, capacity)
        if at_once < len(todo):
            log.info("%d folds to train, %d at a time (what this cluster can hold)", len(todo), at_once)
        running: dict[ray.ObjectRef, int] = {}
        queued = list(todo)
        while queued or running:
            while queued and len(running) < at_once:
                k = queued.pop(0)
                train_ds, valid_ds = fold_datasets(plan, ds, k)
                log.info("fold %d: %d train / %d validation clips", k, train_ds.count(), valid_ds.count())
                running[remote_fit.remote(plan, k, train_ds, valid_ds, sizing, queue_timeout_s=queue_timeout)] = k
            finished, _ = ray.wait(list(running), num_returns=1)
            k = running.pop(finished[0])
            folds[k] = ray.get(finished[0])
            log.info("fold %d ran on %s", k, "; ".join(map(describe_worker, folds[k]["workers"])))
    # Folds of the split that earlier jobs into this OUTPUT finished (a job may run only some, `dataset.folds`):
    # the run's metrics, out-of-fold predictions and ensemble hold every finished fold, not only this job's.
    for k in plan.split_folds:
        if k not in folds and (history := finished_fold(plan, k)) is not None:
            log.info("fold %d: finished by an earlier job into %s, included", k, out)
            folds[k] = history
    fold_ids = sorted(folds)
    results["folds"] = {str(k): folds[k] for k in fold_ids}
    results["cv"] = cross_validate(plan, fold_ids)
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(results, indent=1))
    storage.write_text(storage.join(out, "ensemble.json"), json.dumps(
        {"models": [f"fold_{k}/model.pt" for k in fold_ids], "combine": "mean_probability"}, indent=1))
    from gunsound.report import write_report

    log.info("report: %s", write_report(out))
    return results
