"""The plan of a training run, settled and checked before anything trains (this is what --dry-run prints):
the resolved config (auto-chosen audio parameters and the drawn seed), the manifest, its folds and the feature
parameters."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from gunsound import fingerprint, storage
from gunsound.config import Config, ConfigError, check_schedule, config_from_dict
from gunsound.dataset import (
    AudioChoice,
    Manifest,
    ManifestError,
    Problem,
    assign_folds,
    choose_audio_parameters,
    load_manifest,
    loose_label_key,
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

    def _validation_line(self) -> str:
        """How clips are split, in the grouping the manifest was read with (folder per class: by file)."""
        by = self.manifest.group_by
        if self.cfg.dataset.validation_dataframe:
            return (f"validation      {self.cfg.dataset.validation_dataframe}, running {self.fold_ids}"
                    f" (grouped by {by}: none in both dataframes)")
        return (f"validation      {len(self.split_folds)} folds, running {self.fold_ids}"
                f" (stratified by class, grouped by {by})")

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
            self._validation_line(),
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
    check_schedule(resolved.training, "the config")
    manifest = load_manifest(resolved, data, drop_bad_rows=drop_bad_rows)
    notes.extend(f"note            {note}" for note in manifest.notes)
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
    notes.extend(_check_folds(resolved, manifest, folds, fold_ids))
    return TrainingPlan(resolved, manifest, folds, choice, params, output, fold_ids, notes)


def _check_folds(cfg: Config, manifest: Manifest, folds: np.ndarray, fold_ids: list[int]) -> list[str]:
    """Every fold to run must have clips to validate and to train on: an empty side (a small data_sample, a few
    uneven groups) trains nothing that can be measured. A fold that validates classes its training side never
    saw is said, not refused: with folds grouped by recording a rare class may have one group only."""
    labels = manifest.frame["label"].to_numpy()
    background = cfg.dataset.background_label
    sample = (f" after dataset.data_sample {cfg.dataset.data_sample:g}" if cfg.dataset.data_sample < 1 else "")
    notes = []
    for k in fold_ids:
        valid = folds == k
        for side, clips in (("validation", valid), ("training", ~valid)):
            if not clips.any():
                raise ManifestError(manifest.source, [Problem(-1, "", (
                    f"fold {k} (dataset.folds) has no {side} clips{sample} ({len(folds)} clips, "
                    f"{manifest.frame['group'].nunique()} groups by {manifest.group_by}): run other folds, or raise "
                    "dataset.data_sample or dataset.validation_size"))])
        unseen = sorted(set(labels[valid]) - set(labels[~valid]) - {background})
        if unseen:
            text = (f"fold {k} validates class(es) its training side has no clip of: {', '.join(unseen)} "
                    "(their scores in this fold measure nothing learned)")
            log.warning("%s", text)
            notes.append(f"warning         {text}")
    return notes


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
    valid = load_manifest(cfg, data, drop_bad_rows=drop_bad_rows, key="validation_dataframe")
    name = cfg.dataset.validation_dataframe
    valid_frame, valid_dropped = _labels_the_training_data_has(cfg, train, valid, drop_bad_rows)
    # After every training row, the dropped ones too: dropped_rows.parquet keeps `row` a unique key as well.
    offset = max([int(train.frame["row"].max()), *(p.row for p in train.dropped)]) + 1
    vframe = valid_frame.assign(row=valid_frame["row"] + offset)
    valid_dropped = [Problem(p.row + offset, p.path, f"{name} row {p.row}: {p.reason}") for p in valid_dropped]
    overlap = set(train.frame["path"]) & set(vframe["path"])
    if overlap:
        raise ConfigError(f"dataset.validation_dataframe shares {len(overlap)} file(s) with the training data, "
                          f"e.g. {sorted(overlap)[0]}")
    if train.group_by != "file":  # as with k folds, a group's clips all train or all validate
        spelled = {g.casefold(): g for g in train.frame["group"]}
        shared = sorted(spelled[g] for g in set(spelled) & {g.casefold() for g in vframe["group"]})
        if shared:
            raise ConfigError(f"dataset.group_fold_column {train.group_by!r}: {len(shared)} group(s) have clips in "
                              f"both the training data and dataset.validation_dataframe {name}, e.g. "
                              f"{', '.join(map(repr, shared[:5]))}; a group's clips must all be on one side")
    frame = pd.concat([train.frame, vframe], ignore_index=True)
    # Without dataset.classes every validation label is now one the training data has.
    classes = sorted(set(train.classes) | set(valid.classes)) if cfg.dataset.classes else train.classes
    folds = np.r_[np.full(len(train.frame), -1), np.zeros(len(vframe), dtype=np.int64)]
    return Manifest(frame, classes, train.source, dropped=train.dropped + valid_dropped, group_by=train.group_by,
                    notes=train.notes + valid.notes), folds


def _labels_the_training_data_has(cfg: Config, train: Manifest, valid: Manifest,
                                  drop_bad_rows: bool) -> tuple[pd.DataFrame, list[Problem]]:
    """The validation clips and dropped rows, where a validation row whose label no training row has is a problem
    row: it would be a class of its own that never trains (ak-47 beside AK-47). With dataset.classes the list
    says what the classes are, and an unknown label is already a problem row."""
    if cfg.dataset.classes:
        return valid.frame, valid.dropped
    trained = set(train.frame["label"]) | {cfg.dataset.background_label}
    loose = {loose_label_key(label): label for label in trained}
    foreign = ~valid.frame["label"].isin(trained)
    if not foreign.any():
        return valid.frame, valid.dropped
    problems = []
    for r in valid.frame[foreign].itertuples():
        near = loose.get(loose_label_key(r.label))
        problems.append(Problem(int(r.row), r.rel_path, (
            f"label {r.label!r} is no label of the training data, so its class would never train"
            + (f" (the training data spells it {near!r})" if near else ""))))
    if not drop_bad_rows:
        raise ManifestError(valid.source, problems)
    for p in problems:
        log.warning("dropped row %d %r: %s", p.row, p.path, p.reason)
    return valid.frame[~foreign].reset_index(drop=True), sorted(valid.dropped + problems, key=lambda p: p.row)
