"""Ray Tune sweeps over the learning rate, the number of epochs and any setting in `search_space`.

Each trial is a small Tune function (a "driver" holding 0.01 CPU) that fits the fold's TorchTrainer, whose
reports reach Tune through `TuneReportCallback`: the pattern Ray 2.60 supports for Train inside Tune.
ASHA stops weak trials early. The sweep runs on one split (the first planned fold), since early-stopping
across folds would bias the cross-validation estimate; `--then-train` then runs every fold with the best
configuration.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import pandas as pd
import yaml

from gunsound import storage, weights
from gunsound.config import Config, ConfigError, apply_overrides, config_from_dict
from gunsound.lease import OutputLease
from gunsound.metrics import METRIC_KEYS
from gunsound.plan import TrainingPlan
from gunsound.resources import TrainWorkers, cluster_capacity
from gunsound.training import featurize, fold_datasets, make_trainer, planned_workers, start_ray

log = logging.getLogger(__name__)

SAMPLERS = ("loguniform", "uniform", "randint", "choice", "quniform")


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
    half to twice the configured number. `search_space` in the config adds or replaces entries.
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


def run_tune(plan: TrainingPlan, num_samples: int) -> TuneResult:
    """Sweep on the plan's first fold; write results.csv and best_config.yaml under OUTPUT/tune. Holds
    OUTPUT's lease meanwhile: one job at a time writes there."""
    storage.makedirs(plan.output)
    with OutputLease(plan.output, "gunsound tune"):
        # Before Ray starts: weights that cannot be had fail here, in seconds; every trial reads one copy.
        plan.cfg.architecture = weights.resolve_pretrained(plan.cfg.architecture, plan.output)
        return _sweep(plan, num_samples)


def _sweep(plan: TrainingPlan, num_samples: int) -> TuneResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    start_ray(plan)
    space = search_space(plan.cfg)
    metric = METRIC_KEYS[plan.cfg.prediction.metric]
    mode = "min" if plan.cfg.prediction.metric == "LogLoss" else "max"
    k = plan.fold_ids[0]
    capacity = cluster_capacity()
    sizing = trial_workers(planned_workers(plan.cfg.environment, capacity), capacity.most("CPU"))
    ds = featurize(plan, capacity=capacity)
    train_ds, valid_ds = fold_datasets(plan, ds, k)

    # Trials run side by side as far as the cluster can ever hold them (the autoscaler adds the nodes).
    fits = [int(max(capacity.most("CPU"), 1) // (sizing.workers * sizing.cpus_per_worker + TRIAL_DRIVER_CPUS))]
    if sizing.gpus_per_worker:
        fits.append(int(min(capacity.most("GPU"), 1024) // (sizing.workers * sizing.gpus_per_worker)))
    concurrent = max(1, min(fits))
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
    if table[metric].isna().all():
        raise RuntimeError(f"tune: no trial reported {metric}; errors: {set(table['error'])}")
    best = results.get_best_result(metric=metric, mode=mode, scope="last")
    best_params = best.config["params"]
    best_cfg = config_with(plan.cfg, best_params)
    out = storage.join(plan.output, "tune")
    storage.write_text(storage.join(out, "results.csv"), table.to_csv(index=False))
    best_uri = storage.join(out, "best_config.yaml")
    storage.write_text(best_uri, yaml.safe_dump(best_cfg.to_dict(), sort_keys=True))
    return TuneResult(table, best_params, best_cfg, best_uri)
