"""The plan of a training run, settled and checked before anything trains (this is what --dry-run prints):
the resolved config (auto-chosen audio parameters and the drawn seed), the manifest, its folds and the feature
parameters."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from gunsound import fingerprint, storage
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

log = logging.getLogger(__name__)


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

    @property
    def split_folds(self) -> list[int]:
        """Every fold of the split, of which this job runs `fold_ids`: one with a validation dataframe."""
        return [0] if self.cfg.dataset.validation_dataframe else list(range(num_folds(self.cfg.dataset)))

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
            f" {self.features.f_min:g}-{self.features.f_max:g} Hz, normalization {self.cfg.audio.spectrogram_normalization})",
            f"model           {self.cfg.architecture.backbone} (pretrained {self.cfg.architecture.pretrained},"
            f" pool {self.cfg.architecture.pool}, dropout {self.cfg.architecture.dropout})",
            f"training        {self.cfg.training.epochs} epochs, batch {self.cfg.training.batch_size},"
            f" lr {self.cfg.training.learning_rate:g}, {self.cfg.training.optimizer},"
            f" {self.cfg.training.schedule}, loss {self.cfg.training.loss_function}",
            f"validation      {len(self.split_folds)} folds, running {self.fold_ids}"
            f" (stratified by class, grouped by {self.cfg.dataset.group_fold_column or 'file'})",
            f"seed            {self.cfg.environment.seed}",
            f"output          {self.output}",
            *self.notes,
        ]
        for k in self.fold_ids:
            lines.append(f"fold {k}          train {(self.folds != k).sum()} clips, validate {(self.folds == k).sum()}")
        return "\n".join(lines)


def prepare(cfg: Config, data: str | None, output: str, drop_bad_rows: bool = False,
            overwrite: bool = False) -> TrainingPlan:
    """Check the dataset and settle everything a run needs, without training (this is --dry-run).

    With `seed: -1` a rerun into an OUTPUT that holds a run keeps that run's seed, so that it resumes on the
    same split; a fresh OUTPUT, or `overwrite`, draws one."""
    s3 = storage.configure_s3(cfg.storage.endpoint_url, cfg.storage.region)
    output, data = storage.absolute(output), storage.absolute(data) if data else None
    resolved = config_from_dict(cfg.to_dict())
    # Workers may run in processes that never saw this environment; the endpoint travels in the config.
    resolved.storage.endpoint_url, resolved.storage.region = s3.endpoint_url, s3.region
    notes = []
    kept = None if overwrite or resolved.environment.seed >= 0 else fingerprint.stored_seed(output)
    if kept is not None:
        resolved.environment.seed = kept
        notes.append(f"note            seed -1: kept seed {kept}, drawn by the run in {output}")
        log.info("seed -1: kept seed %d of the run in %s", kept, output)
    elif resolved.environment.seed < 0:
        resolved.environment.seed = int(np.random.SeedSequence().entropy % (2**31))
        notes.append(f"note            seed -1: drew seed {resolved.environment.seed}")
        log.info("seed -1: drew seed %d", resolved.environment.seed)
    manifest = load_manifest(resolved, data, drop_bad_rows=drop_bad_rows)
    _check_loss_takes_the_labels(resolved, manifest, "the training data")
    choice = choose_audio_parameters(resolved, manifest)
    resolved.audio.sample_rate = choice.sample_rate
    resolved.audio.training_chunk_seconds = choice.chunk_seconds
    params = FeatureParams.from_config(resolved.audio, choice.sample_rate)
    if resolved.dataset.validation_dataframe:
        manifest, folds = _with_validation_dataframe(resolved, manifest, data, drop_bad_rows)
        _check_loss_takes_the_labels(resolved, manifest, resolved.dataset.validation_dataframe)
        notes.append(f"note            validation from {resolved.dataset.validation_dataframe} (one split, fold 0)")
        fold_ids = [0]
    else:
        k = num_folds(resolved.dataset)
        bad = [f for f in resolved.dataset.folds if f >= k]
        if bad:
            raise ConfigError(f"dataset.folds {bad}: validation_size {resolved.dataset.validation_size} gives "
                              f"folds 0..{k - 1}")
        folds = assign_folds(manifest, resolved.dataset, resolved.environment.seed)
        fold_ids = list(resolved.dataset.folds)
    if resolved.dataset.data_sample < 1:
        manifest, folds, note = _sampled(manifest, folds, fraction=resolved.dataset.data_sample,
                                         sides=resolved.dataset.data_sample_choice,
                                         split=bool(resolved.dataset.validation_dataframe),
                                         seed=resolved.environment.seed)
        notes.append(note)
    return TrainingPlan(resolved, manifest, folds, choice, params, output, fold_ids, notes)


def _check_loss_takes_the_labels(cfg: Config, manifest: Manifest, what: str) -> None:
    if cfg.training.loss_function == "CrossEntropy" and (manifest.frame["label"] == cfg.dataset.background_label).any():
        raise ConfigError(f"training.loss_function: CrossEntropy cannot learn or be validated on background clips "
                          f"(all-zero targets), and {what} holds '{cfg.dataset.background_label}' clips; use BCE")


def _sampled(manifest: Manifest, folds: np.ndarray, *, fraction: float, sides: list[str], split: bool,
             seed: int) -> tuple[Manifest, np.ndarray, str]:
    """`dataset.data_sample`: a share of the clips, drawn in each class (and side) alike, after the folds were
    assigned on the whole dataset (so a sample's folds keep their groups apart). With a validation dataframe
    the sides are its clips (Validation) and the training dataframe's (Train); with k folds every clip trains
    in some folds and validates in its own, so only both sides together can be sampled."""
    chosen = {side.lower() for side in sides}
    if not chosen <= {"train", "validation"} or not chosen:
        raise ConfigError(f"dataset.data_sample_choice {sides}: the sides are Train and Validation")
    if not split and chosen != {"train", "validation"}:
        raise ConfigError(f"dataset.data_sample_choice {sides}: with k folds every clip trains in some folds and "
                          "validates in one, so gunsound samples clips for both: [Train, Validation] (or set a "
                          "validation_dataframe to sample one side)")
    side = np.where(folds < 0, "train", "validation")
    frame = manifest.frame.assign(_side=side)
    rng = np.random.default_rng(seed)
    keep = np.ones(len(frame), dtype=bool)
    for (_, name), rows in frame.groupby(["label", "_side"]).indices.items():
        if name in chosen:
            keep[rows] = False
            keep[rng.choice(rows, max(1, int(round(fraction * len(rows)))), replace=False)] = True
    frame = manifest.frame[keep].reset_index(drop=True)
    note = (f"note            dataset.data_sample {fraction:g} of {' and '.join(sorted(chosen))}: "
            f"{int(keep.sum())} of {len(keep)} clips")
    log.info("%s", note.removeprefix("note").strip())
    return replace(manifest, frame=frame), folds[keep], note


def _with_validation_dataframe(cfg: Config, train: Manifest, data: str | None,
                               drop_bad_rows: bool) -> tuple[Manifest, np.ndarray]:
    """A separate validation dataframe: its clips form fold 0 and every training clip trains (fold -1).
    Its rows are numbered after the training dataframe's so that `row` stays a unique key."""
    vcfg = config_from_dict(cfg.to_dict())
    vcfg.dataset.train_dataframe = cfg.dataset.validation_dataframe
    valid = load_manifest(vcfg, data, drop_bad_rows=drop_bad_rows)
    # After every training row, the dropped ones too: dropped_rows.parquet keeps `row` a unique key as well.
    offset = max([int(train.frame["row"].max()), *(p.row for p in train.dropped)]) + 1
    vframe = valid.frame.assign(row=valid.frame["row"] + offset)
    name = cfg.dataset.validation_dataframe
    valid_dropped = [Problem(p.row + offset, p.path, f"{name} row {p.row}: {p.reason}") for p in valid.dropped]
    overlap = set(train.frame["path"]) & set(vframe["path"])
    if overlap:
        raise ConfigError(f"dataset.validation_dataframe shares {len(overlap)} file(s) with the training data, "
                          f"e.g. {sorted(overlap)[0]}")
    frame = pd.concat([train.frame, vframe], ignore_index=True)
    classes = sorted(set(train.classes) | set(valid.classes))
    folds = np.r_[np.full(len(train.frame), -1), np.zeros(len(vframe), dtype=np.int64)]
    return Manifest(frame, classes, train.source, dropped=train.dropped + valid_dropped), folds
