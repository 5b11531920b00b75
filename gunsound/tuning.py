"""Ray Tune sweeps over the learning rate, the number of epochs and any setting in `search_space`.

Each trial is a small Tune function (a "driver" holding 0.01 CPU) that fits the fold's TorchTrainer, whose
reports reach Tune through `TuneReportCallback`: the pattern Ray 2.60 supports for Train inside Tune.
ASHA stops weak trials early. The sweep runs on one split (the first planned fold), since early-stopping
across folds would bias the cross-validation estimate; `--then-train` then runs every fold with the best
configuration.

The features and the fold split are made once, before the trials, so `search_space` may only hold settings a
trial applies itself (`SEARCHABLE`). OUTPUT/tune/fingerprint.json records what the sweep was made with: the same
command run again keeps a finished sweep's best config (and with `seed: -1` its seed) instead of sweeping afresh,
so `--then-train` resumes OUTPUT/best; a sweep with other settings is refused there, as a training run is.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import pandas as pd
import yaml

from gunsound import fingerprint, storage, weights
from gunsound.config import Config, ConfigError, apply_overrides, config_from_dict, parse_config_yaml
from gunsound.lease import OutputLease
from gunsound.metrics import METRIC_KEYS
from gunsound.plan import TrainingPlan, prepare
from gunsound.resources import TrainWorkers, cluster_capacity, trials_at_once
from gunsound.training import (
    check_fold_shards,
    featurize,
    fold_datasets,
    make_trainer,
    planned_workers,
    start_ray,
)

log = logging.getLogger(__name__)

SAMPLERS = ("loguniform", "uniform", "randint", "choice", "quniform")

# Why a setting cannot vary between trials. Before the trials start, _sweep featurizes the clips once, splits
# them once and sizes the workers once, and run_tune fetches the pretrained weights once; a trial only swaps its
# values into the plan's config, from which make_trainer builds its LoopSettings and model.
_FEATURES = "the features are computed once, before the trials: every trial trains on the configured ones"
_FOLDS = "the clips, their targets and the folds are set once, before the trials: every trial trains on those"
_WEIGHTS = ("the pretrained weights are fetched once, for the configured backbone, before the trials: every "
            "trial loads that copy")
_UNUSED = "a trial's training does not use it"
# Settings in order, the first match deciding (a key, or a section ending in "."): None where each trial
# applies its own value, else why it cannot.
SEARCHABLE: tuple[tuple[str, str | None], ...] = (
    ("training.train_validation_data", "each fold's training set is built once, before the trials"),
    ("training.automatically_adjust_batch_size", _UNUSED),
    ("training.build_scoring_pipelines", _UNUSED),
    ("training.run_interpretations", _UNUSED),
    ("training.", None),
    ("architecture.pretrained", _WEIGHTS),
    ("architecture.pretrained_weights", _WEIGHTS),
    ("architecture.", None),
    ("augmentation.", None),
    # The features are stored in log power; each trial's Train workers normalise them.
    ("audio.spectrogram_normalization", None),
    ("audio.", _FEATURES),
    ("dataset.", _FOLDS),
    ("environment.seed", "it drew the folds, which are set once before the trials: every trial trains on that "
                         "split"),
    ("environment.mixed_precision_training", None),
    ("environment.mixed_precision_inference", None),
    ("environment.", "the trials' workers are placed and sized once, before the trials"),
    ("prediction.probability_threshold", None),
    # A trial's prediction.metric only picks the epoch it would keep, which Tune never sees.
    ("prediction.metric", "the sweep ranks every trial by the configured metric, chosen before the trials"),
)
SEARCHABLE_KEYS = ", ".join(key + ("*" if key.endswith(".") else "") for key, why in SEARCHABLE if why is None)


def _matches(key: str, pattern: str) -> bool:
    return key == pattern or (pattern.endswith(".") and key.startswith(pattern))


def unsearchable_reason(key: str, cfg: Config) -> str | None:
    """Why `key` cannot be swept (a trial would not run with the value drawn for it), or None when it can."""
    if key == "architecture.backbone" and cfg.architecture.pretrained:
        return _WEIGHTS
    return next((why for pattern, why in SEARCHABLE if _matches(key, pattern)), _UNUSED)


def _sampler_bounds(key: str, sampler: str, args: Any) -> list[Any]:
    """Check a sampler's arguments as Ray Tune will take them, here rather than inside a trial; return the
    values that bound what it draws (every choice; a range's extremes), each to be checked against the key."""

    def fail(what: str) -> NoReturn:
        raise ConfigError(f"search_space.{key}: {sampler} {what}, got {args!r}")

    if sampler == "choice":
        if not isinstance(args, list) or not args:
            fail("needs a list of at least one value")
        return list(args)
    form = "[low, high, q]" if sampler == "quniform" else "[low, high]"
    if not isinstance(args, list) or len(args) != form.count(",") + 1:
        fail(f"needs a list {form}")
    if sampler == "randint":
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            fail("needs integers")
    elif not all(isinstance(a, int | float) and not isinstance(a, bool) and math.isfinite(a) for a in args):
        fail("needs numbers")
    low, high = args[0], args[1]
    if not low < high:
        fail(f"low {low} must be below high {high}")
    if sampler == "randint":
        return [low, high - 1]  # high is exclusive
    if sampler == "loguniform" and low <= 0:
        fail("needs low > 0")
    if sampler == "quniform":
        q = args[2]
        if q <= 0:
            fail("needs q > 0")
        if not all(math.isclose(b / q, round(b / q)) for b in (low, high)):
            fail("needs low and high to be multiples of q")
        return [float(low), float(high)]  # quantizing makes high reachable
    # uniform and loguniform draw from [low, high): a key whose range ends below high (dropout < 1) still fits.
    return [float(low), math.nextafter(float(high), float(low))]


def search_space(cfg: Config) -> dict[str, Any]:
    """The sweep's space as data: {"section.key": {"sampler": [args...]}}.

    Defaults: learning rate log-uniform over a decade either side of the configured one, and epochs from
    half to twice the configured number. `search_space` in the config adds or replaces entries. A key that a
    trial would not run with (`unsearchable_reason`) is refused here, before Ray starts.
    """
    t = cfg.training
    space: dict[str, Any] = {
        "training.learning_rate": {"loguniform": [t.learning_rate / 10, t.learning_rate * 10]},
        "training.epochs": {"randint": [max(1, t.epochs // 2), 2 * t.epochs + 1]},
    }
    space.update(cfg.search_space)
    for key, spec in space.items():
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SAMPLERS):
            raise ConfigError(f"search_space.{key}: must be one of {{{', '.join(SAMPLERS)}: [...]}}, got {spec!r}")
        # Every searched key must exist and accept the sampler's values.
        sampler, args = next(iter(spec.items()))
        for value in _sampler_bounds(key, sampler, args):
            try:
                config_from_dict(apply_overrides(cfg.to_dict(), [f"{key}={json.dumps(value)}"]),
                                 f"{sampler} value {json.dumps(value)}")
            except ConfigError as exc:
                raise ConfigError(f"search_space.{key}: {exc}") from exc
        why = unsearchable_reason(key, cfg)
        if why is not None:
            raise ConfigError(f"search_space.{key}: cannot be swept: {why}. A sweep varies only what each trial "
                              f"applies: {SEARCHABLE_KEYS}")
    return space


def to_tune_space(space: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    return {key: getattr(tune, sampler)(*args) if sampler != "choice" else tune.choice(args)
            for key, spec in space.items() for sampler, args in spec.items()}


def _largest(spec: dict[str, Any]) -> int:
    """The largest value a sampler can draw (randint's upper bound is exclusive)."""
    sampler, args = next(iter(spec.items()))
    return int(args[1]) - 1 if sampler == "randint" else int(max(args))


def config_with(cfg: Config, params: dict[str, Any]) -> Config:
    data = cfg.to_dict()
    apply_overrides(data, [f"{key}={json.dumps(value)}" for key, value in params.items()])
    return config_from_dict(data)


@dataclass
class TuneResult:
    table: pd.DataFrame
    best_params: dict[str, Any]
    best_config: Config
    best_config_uri: str


def trial_driver(config: dict) -> None:
    """One Tune trial: fit the fold's TorchTrainer with this trial's settings; its epochs report to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    plan: TrainingPlan = config["plan"]
    plan = copy.copy(plan)
    plan.cfg = config_with(plan.cfg, config["params"])
    storage.configure_s3(plan.cfg.storage.endpoint_url, plan.cfg.storage.region)
    trial = tune.get_context().get_trial_id()
    trial_dir = storage.join(plan.output, "tune", "trials", trial)
    trainer = make_trainer(plan, config["fold"], config["train_ds"], config["valid_ds"], trial_dir,
                           f"trial_{trial}", storage.join(plan.output, "tune", "ray"), config["sizing"],
                           callbacks=[TuneReportCallback()])
    trainer.fit()


TRIAL_DRIVER_CPUS = 0.01  # Tune refuses a trial of no CPU


def trial_workers(sizing: TrainWorkers, node_cpus: float) -> TrainWorkers:
    """The workers each trial's trainer asks for. A trial's driver holds TRIAL_DRIVER_CPUS beside them, so a
    worker that would take a whole node (configs/laptop.yaml on a 2-core laptop) asks for that much less;
    otherwise the trial would wait forever for the CPU its own driver holds."""
    room = node_cpus - TRIAL_DRIVER_CPUS
    if room <= 0 or sizing.cpus_per_worker <= room:
        return sizing
    log.info("tune: each worker asks for %g CPU, not %g: a trial's driver holds %g of the node's %g",
             room, sizing.cpus_per_worker, TRIAL_DRIVER_CPUS, node_cpus)
    return replace(sizing, cpus_per_worker=room)


# What a sweep writes into OUTPUT/tune: all that --overwrite removes there (beside its fingerprint.json).
TUNE_OUTPUTS = ("results.csv", "best_config.yaml", "trials", "ray", "sweep")


def _tune_dir(output: str) -> str:
    return storage.join(output, "tune")


def prepare_sweep(cfg: Config, data: str | None, output: str, drop_bad_rows: bool = False,
                  overwrite: bool = False) -> TrainingPlan:
    """The sweep's plan (`plan.prepare`). With `seed: -1` a rerun into an OUTPUT that holds a sweep keeps the
    seed it drew, as `prepare` does for a training run: the same command then plans the same sweep and resumes
    it (`run_tune`); `overwrite` draws a new one."""
    kept = None
    if cfg.environment.seed < 0 and not overwrite:
        storage.configure_s3(cfg.storage.endpoint_url, cfg.storage.region)
        kept = fingerprint.stored_seed(_tune_dir(storage.absolute(output)), kind="tune")
    if kept is None:
        return prepare(cfg, data, output, drop_bad_rows=drop_bad_rows)
    plan = prepare(config_with(cfg, {"environment.seed": kept}), data, output, drop_bad_rows=drop_bad_rows)
    plan.notes.append(f"note            seed -1: kept seed {kept}, drawn by the sweep in {_tune_dir(plan.output)}")
    log.info("seed -1: kept seed %d of the sweep in %s", kept, _tune_dir(plan.output))
    return plan


def sweep_fingerprint(plan: TrainingPlan, num_samples: int, space: dict[str, Any]) -> fingerprint.Fingerprint:
    """What a sweep is made with: what its trials train on and with (a training run's fingerprint: the resolved
    config, its seed included, and the data with its folds), the fold it sweeps on, its space and its samples."""
    made = fingerprint.training_fingerprint(plan.cfg, plan.manifest.frame.assign(fold=plan.folds),
                                            plan.manifest.source)
    sweep = {"tune.fold": plan.fold_ids[0], "tune.num_samples": num_samples,
             **{f"tune.search_space.{key}": spec for key, spec in space.items()}}
    return fingerprint.Fingerprint("tune", {**made.settings, **json.loads(json.dumps(sweep))}, made.data)


def _lookup(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def _finished(output: str) -> bool:
    """Whether the sweep in OUTPUT/tune finished: best_config.yaml is written last."""
    out = _tune_dir(output)
    return storage.exists(storage.join(out, "best_config.yaml")) and storage.exists(storage.join(out, "results.csv"))


def finished_sweep(plan: TrainingPlan, space: dict[str, Any]) -> TuneResult:
    """The result of the sweep that finished in OUTPUT/tune, read back from its files. The best config is the
    file itself, so that a rerun's --then-train trains exactly what the first run's did."""
    out = _tune_dir(plan.output)
    best_uri = storage.join(out, "best_config.yaml")
    best_cfg = config_from_dict(parse_config_yaml(storage.read_text(best_uri), best_uri), best_uri)
    table = pd.read_csv(io.StringIO(storage.read_text(storage.join(out, "results.csv"))))
    best_params = {key: _lookup(best_cfg.to_dict(), key) for key in space}
    return TuneResult(table, best_params, best_cfg, best_uri)


def run_tune(plan: TrainingPlan, num_samples: int, overwrite: bool = False) -> TuneResult:
    """Sweep on the plan's first fold; write results.csv and best_config.yaml under OUTPUT/tune. Holds
    OUTPUT's lease meanwhile: one job at a time writes there.

    A sweep that finished there with the same settings, data and space is not run again: its result is read
    back (`finished_sweep`). One with others is refused (`fingerprint.OutputMismatch`) before Ray starts;
    `overwrite` removes OUTPUT/tune's sweep and starts afresh."""
    storage.makedirs(plan.output)
    with OutputLease(plan.output, "gunsound tune"):
        space = search_space(plan.cfg)
        made = sweep_fingerprint(plan, num_samples, space)  # before the weights' copy changes the config
        if not overwrite and _finished(plan.output):
            fingerprint.claim(_tune_dir(plan.output), made, overwrite=False, owned=TUNE_OUTPUTS)
            log.info("tune: the same sweep finished in %s before; keeping its results and best config "
                     "(--overwrite sweeps afresh)", _tune_dir(plan.output))
            return finished_sweep(plan, space)
        # Before Ray starts or anything is claimed: weights that cannot be had fail here, in seconds; every
        # trial reads one copy.
        plan.cfg.architecture = weights.resolve_pretrained(plan.cfg.architecture, plan.output)
        fingerprint.claim(_tune_dir(plan.output), made, overwrite=overwrite, owned=TUNE_OUTPUTS)
        return _sweep(plan, num_samples, space)


def best_result(results: Iterable[Any], metric: str, mode: str) -> Any:
    """The trial whose last report is best among those that ended without an error (finished, or stopped by
    ASHA). Ray's `get_best_result` also ranks a trial that reported and then failed (a worker lost past its
    retries, out of memory), which would become the best config and what --then-train trains."""
    results = list(results)
    ok = [r for r in results if r.error is None and isinstance((r.metrics or {}).get(metric), int | float)
          and math.isfinite(r.metrics[metric])]
    if not ok:
        # The last line of Ray's error names the exception; the first names the Ray task that raised it.
        errors = sorted({(str(r.error).strip().splitlines() or [repr(r.error)])[-1] for r in results
                         if r.error is not None})
        raise RuntimeError(f"tune: no trial ended without an error and reported {metric}; "
                           f"errors: {'; '.join(errors) or 'none'}")
    pick = min if mode == "min" else max
    return pick(ok, key=lambda r: r.metrics[metric])


def _sweep(plan: TrainingPlan, num_samples: int, space: dict[str, Any]) -> TuneResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    start_ray(plan)
    metric = METRIC_KEYS[plan.cfg.prediction.metric]
    mode = "min" if plan.cfg.prediction.metric == "LogLoss" else "max"
    k = plan.fold_ids[0]
    capacity = cluster_capacity()
    # A worker shares its node with the trial's driver: sized against the largest node's CPUs, not the cluster's.
    sizing = trial_workers(planned_workers(plan.cfg.environment, capacity), capacity.per_node("CPU"))
    # Trials run side by side as far as the cluster can ever hold them (the autoscaler adds the nodes); none
    # fitting is an error here, before the features are made.
    concurrent = trials_at_once(sizing, capacity, TRIAL_DRIVER_CPUS)
    check_fold_shards(plan, plan.folds, [k], sizing)  # a batch per worker, refused here rather than in a trial
    ds = featurize(plan, capacity=capacity)
    train_ds, valid_ds = fold_datasets(plan, ds, k)

    max_epochs = _largest(space["training.epochs"]) if "training.epochs" in space else plan.cfg.training.epochs
    log.info("tune: %d samples, %d at a time, ASHA on %s (%s), up to %d epochs, fold %d",
             num_samples, concurrent, metric, mode, max_epochs, k)

    storage_path, storage_fs = storage.storage_path_for_ray(storage.join(plan.output, "tune"))
    tuner = tune.Tuner(
        tune.with_resources(trial_driver, {"CPU": TRIAL_DRIVER_CPUS}),
        param_space={"params": to_tune_space(space), "plan": plan, "fold": k,
                     "train_ds": train_ds, "valid_ds": valid_ds, "sizing": sizing},
        tune_config=tune.TuneConfig(
            num_samples=num_samples, max_concurrent_trials=concurrent,
            scheduler=ASHAScheduler(metric=metric, mode=mode, time_attr="training_iteration",
                                    max_t=max_epochs, grace_period=1, reduction_factor=2),
        ),
        run_config=tune.RunConfig(name="sweep", storage_path=storage_path, storage_filesystem=storage_fs),
    )
    results = tuner.fit()
    rows = []
    for r in results:
        params = r.config["params"] if r.config else {}
        last = r.metrics or {}
        rows.append({**{f"param:{k}": v for k, v in params.items()}, metric: last.get(metric),
                     "epochs_run": last.get("training_iteration"), "valid_loss": last.get("valid_loss"),
                     "error": str(r.error) if r.error else ""})
    table = pd.DataFrame(rows).sort_values(metric, ascending=(mode == "min"), na_position="last")
    out = _tune_dir(plan.output)
    # Before the pick, so that the trials' errors are there to read when every trial failed.
    storage.write_text(storage.join(out, "results.csv"), table.to_csv(index=False))
    best_params = best_result(results, metric, mode).config["params"]
    best_cfg = config_with(plan.cfg, best_params)
    # Last: its presence says the sweep finished (finished_sweep).
    best_uri = storage.join(out, "best_config.yaml")
    storage.write_text(best_uri, yaml.safe_dump(best_cfg.to_dict(), sort_keys=True))
    return TuneResult(table, best_params, best_cfg, best_uri)
