"""Ray Tune sweeps: the search space as data, and a small ASHA sweep on a local Ray."""

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from gunsound import fingerprint, storage, training, tuning
from gunsound.cli import EXIT_OUTPUT_MISMATCH, main
from gunsound.config import ConfigError, load_config
from gunsound.resources import TrainWorkers
from gunsound.tuning import TRIAL_DRIVER_CPUS, best_result, search_space, to_tune_space, trial_workers
from tests.conftest import FAST, LAPTOP_CONFIG


def test_default_space_sweeps_learning_rate_and_epochs():
    cfg = load_config(LAPTOP_CONFIG, ["training.learning_rate=0.001", "training.epochs=4"])
    space = search_space(cfg)
    assert space["training.learning_rate"] == {"loguniform": [pytest.approx(1e-4), pytest.approx(1e-2)]}
    assert space["training.epochs"] == {"randint": [2, 9]}


def test_config_search_space_adds_keys_and_is_validated():
    cfg = load_config(LAPTOP_CONFIG, ['search_space={"architecture.dropout": {"choice": [0.0, 0.3]}}'])
    assert search_space(cfg)["architecture.dropout"] == {"choice": [0.0, 0.3]}
    with pytest.raises(ConfigError, match="search_space.training.nope"):
        search_space(load_config(LAPTOP_CONFIG, ['search_space={"training.nope": {"choice": [1]}}']))
    with pytest.raises(ConfigError, match="search_space.training.epochs"):
        search_space(load_config(LAPTOP_CONFIG, ['search_space={"training.epochs": {"choice": ["x"]}}']))
    with pytest.raises(ConfigError, match="must be one of"):
        search_space(load_config(LAPTOP_CONFIG, ['search_space={"training.epochs": {"normal": [1, 2]}}']))



def _space(key: str, spec) -> dict:
    return search_space(load_config(LAPTOP_CONFIG, [f"search_space={json.dumps({key: spec})}"]))


@pytest.mark.parametrize(("key", "spec", "message"), [
    ("architecture.dropout", {"choice": []}, "choice needs a list of at least one value"),
    ("architecture.dropout", {"choice": 0.1}, "choice needs a list of at least one value"),
    ("training.learning_rate", {"uniform": 0.1}, "uniform needs a list [low, high]"),
    ("training.learning_rate", {"loguniform": [0.01]}, "loguniform needs a list [low, high]"),
    ("training.learning_rate", {"uniform": [0.1, 0.01]}, "low 0.1 must be below high 0.01"),
    ("training.learning_rate", {"loguniform": [0, 0.1]}, "loguniform needs low > 0"),
    ("training.learning_rate", {"uniform": ["a", 1]}, "uniform needs numbers"),
    ("training.learning_rate", {"uniform": [True, 2]}, "uniform needs numbers"),
    ("training.learning_rate", {"quniform": [0.1, 0.2]}, "quniform needs a list [low, high, q]"),
    ("training.learning_rate", {"quniform": [0.1, 0.2, 0]}, "quniform needs q > 0"),
    ("architecture.dropout", {"quniform": [0.0, 0.55, 0.1]}, "quniform needs low and high to be multiples of q"),
    ("training.epochs", {"randint": [1.5, 4]}, "randint needs integers"),
    ("training.epochs", {"randint": [3, 3]}, "low 3 must be below high 3"),
    ("architecture.dropout", {"choice": [0.1, 1.5]}, "'architecture.dropout' must be in [0, 1)"),
    ("architecture.dropout", {"uniform": [0.0, 1.5]}, "'architecture.dropout' must be in [0, 1)"),
    ("training.epochs", {"uniform": [1, 5]}, "'training.epochs' must be an integer"),
])
def test_sampler_arguments_are_checked(key, spec, message):
    with pytest.raises(ConfigError, match=rf"^search_space\.{re.escape(key)}: .*{re.escape(message)}"):
        _space(key, spec)


@pytest.mark.parametrize(("key", "spec"), [
    ("architecture.dropout", {"uniform": [0.0, 1.0]}),  # uniform never draws its high bound
    ("architecture.dropout", {"choice": [0.0, 0.5]}),
    ("architecture.dropout", {"quniform": [0.0, 0.5, 0.1]}),
    ("training.epochs", {"randint": [1, 4]}),
    ("training.learning_rate", {"loguniform": [1e-4, 1e-2]}),
])
def test_well_formed_samplers_are_kept_and_ray_takes_them(key, spec):
    space = _space(key, spec)
    assert space[key] == spec
    to_tune_space(space)  # builds Tune's domains (no Ray started): Ray's own argument checks pass too


@pytest.mark.parametrize(("key", "spec", "why"), [
    ("audio.mel_frequency_bins", {"choice": [32, 128]}, "the features are computed once, before the trials"),
    ("audio.hop_size", {"choice": [256, 1024]}, "the features are computed once, before the trials"),
    ("dataset.validation_size", {"choice": [0.1, 0.5]}, "the folds are set once, before the trials"),
    ("dataset.background_label", {"choice": ["noise"]}, "the folds are set once, before the trials"),
    ("environment.seed", {"randint": [0, 100]}, "it drew the folds"),
    ("training.train_validation_data", {"choice": [True, False]}, "training set is built once"),
    ("environment.cpus_per_worker", {"choice": [0.5, 1.0]}, "workers are placed and sized once"),
    ("prediction.metric", {"choice": ["ROC_AUC", "LogLoss"]}, "ranks every trial by the configured metric"),
    ("architecture.pretrained", {"choice": [True, False]}, "the pretrained weights are fetched once"),
    ("training.run_interpretations", {"choice": [True, False]}, "a trial's training does not use it"),
    ("logging.number_of_audios", {"choice": [1, 2]}, "a trial's training does not use it"),
])
def test_settings_fixed_before_the_trials_cannot_be_swept(key, spec, why):
    # The sweep featurizes and splits once; a trial only swaps its config: results.csv would show values no
    # trial ran with.
    with pytest.raises(ConfigError, match=rf"^search_space\.{re.escape(key)}: cannot be swept: .*{re.escape(why)}"):
        _space(key, spec)


def test_the_backbone_is_fixed_only_when_its_pretrained_weights_are_fetched_before_the_trials():
    spec = {"architecture.backbone": {"choice": ["resnet10t", "resnet18"]}}
    assert "architecture.backbone" in search_space(load_config(LAPTOP_CONFIG, [f"search_space={json.dumps(spec)}"]))
    with pytest.raises(ConfigError, match="pretrained weights are fetched once"):
        search_space(load_config(LAPTOP_CONFIG, [f"search_space={json.dumps(spec)}", "architecture.pretrained=true"]))


@pytest.mark.parametrize(("key", "spec"), [
    ("audio.spectrogram_normalization", {"choice": ["No", "Yes", "Peak"]}),  # applied on each trial's workers
    ("augmentation.mix_probability", {"uniform": [0.2, 0.8]}),
    ("environment.mixed_precision_training", {"choice": [True, False]}),
    ("prediction.probability_threshold", {"uniform": [0.3, 0.7]}),
    ("training.weight_decay", {"uniform": [0.0, 0.01]}),
])
def test_settings_each_trial_applies_can_be_swept(key, spec):
    assert _space(key, spec)[key] == spec


def _trial(auc: float | None, error: str | None = None) -> SimpleNamespace:
    """A finished trial as Ray's Result shows it: its last report, its error, its config."""
    return SimpleNamespace(metrics=None if auc is None else {"valid_roc_auc": auc}, config={"params": {"auc": auc}},
                           error=None if error is None else RuntimeError(error))


def test_a_trial_that_failed_after_reporting_is_never_the_best():
    crashed = _trial(0.95, "worker died (CUDA out of memory at epoch 2)")
    finished, stopped = _trial(0.85), _trial(0.80)  # stopped: ASHA ended it early, without an error
    assert best_result([crashed, finished, stopped], "valid_roc_auc", "max") is finished
    assert best_result([crashed, stopped, _trial(math.nan)], "valid_roc_auc", "max") is stopped
    assert best_result([_trial(0.3, "lost"), _trial(0.5), _trial(0.4)], "valid_roc_auc", "min").metrics == {
        "valid_roc_auc": 0.4}
    with pytest.raises(RuntimeError, match="no trial ended without an error.*worker died"):
        best_result([crashed, _trial(None)], "valid_roc_auc", "max")


def _fake_sweep(calls: list):
    """Stands in for the Ray part of a sweep: draws a learning rate as Tune does (unseeded) and writes
    results.csv and best_config.yaml as _sweep does."""

    def sweep(plan, num_samples, *_):
        calls.append(plan.cfg.environment.seed)
        params = {"training.learning_rate": float(np.random.default_rng().uniform(1e-4, 1e-2))}
        best = tuning.config_with(plan.cfg, params)
        table = pd.DataFrame([{"param:training.learning_rate": params["training.learning_rate"],
                               "valid_roc_auc": 0.9, "error": ""}])
        out = storage.join(plan.output, "tune")
        storage.write_text(storage.join(out, "results.csv"), table.to_csv(index=False))
        best_uri = storage.join(out, "best_config.yaml")
        storage.write_text(best_uri, yaml.safe_dump(best.to_dict(), sort_keys=True))
        return tuning.TuneResult(table, params, best, best_uri)

    return sweep


def test_rerunning_tune_then_train_keeps_the_finished_sweep_and_resumes_its_training(monkeypatch, synth_dir,
                                                                                      tmp_path, capsys):
    sweeps, trained = [], []

    def train(plan, drop_bad_rows=False, overwrite=False):  # claims OUTPUT/best as training.run does
        made = fingerprint.training_fingerprint(plan.cfg, plan.manifest.frame.assign(fold=plan.folds),
                                                plan.manifest.source)
        fingerprint.claim(plan.output, made, overwrite=overwrite, owned=training.TRAINING_OUTPUTS)
        trained.append(plan.cfg.to_dict())
        return {"folds": {}, "cv": {"mean_over_folds": {}}}

    monkeypatch.setattr(tuning, "_sweep", _fake_sweep(sweeps))
    monkeypatch.setattr(training, "run", train)
    out = tmp_path / "sweep"
    command = ["tune", str(LAPTOP_CONFIG), "--data", str(synth_dir), "--output", str(out), "--num-samples", "2",
               "--then-train", "--set", "environment.seed=-1"]
    assert main(command) == 0, capsys.readouterr().err
    first = (out / "tune" / "best_config.yaml").read_text()
    # Killed during the training, run again: the sweep is not redone, its seed and best config are kept, and
    # OUTPUT/best is the same run (resumed, not refused).
    assert main(command) == 0, capsys.readouterr().err
    assert len(sweeps) == 1 and (out / "tune" / "best_config.yaml").read_text() == first
    assert trained[0] == trained[1] and trained[0]["environment"]["seed"] == sweeps[0]
    assert "kept seed" in capsys.readouterr().out
    # Another sweep into the same OUTPUT is refused, naming what differs; --overwrite sweeps afresh.
    assert main([*command, "--num-samples", "3"]) == EXIT_OUTPUT_MISMATCH
    assert "tune.num_samples 2 -> 3" in capsys.readouterr().err
    assert main([*command, "--num-samples", "3", "--overwrite"]) == 0, capsys.readouterr().err
    assert len(sweeps) == 2 and len(trained) == 3


@pytest.mark.ray
def test_asha_sweep_writes_results_and_a_ready_best_config(ray_local, synth_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    command = ["tune", str(LAPTOP_CONFIG), "--data", str(synth_dir), "--output", str(out), "--num-samples", "2",
               *[arg for kv in FAST for arg in ("--set", kv)], "--set", "training.epochs=1",
               "--set", "environment.seed=-1",
               # Half-CPU Train workers: on a 2-CPU machine both trials run side by side, not one after another.
               "--set", "environment.cpus_per_worker=0.5"]
    code = main(command)
    assert code == 0, capsys.readouterr().err
    table = pd.read_csv(out / "tune" / "results.csv")
    assert len(table) == 2 and table["valid_roc_auc"].notna().all()
    assert {"param:training.learning_rate", "param:training.epochs"} <= set(table.columns)
    best = load_config(out / "tune" / "best_config.yaml")  # a ready config, loadable as is
    assert best.training.learning_rate in set(table["param:training.learning_rate"])
    assert yaml.safe_load((out / "tune" / "best_config.yaml").read_text())["architecture"]["backbone"] == "resnet10t"
    assert "best:" in capsys.readouterr().out
    # The same command again keeps the finished sweep (and the seed it drew): same results, same best config.
    files = {name: (out / "tune" / name).read_bytes() for name in ("results.csv", "best_config.yaml")}
    trials = sorted(p.name for p in (out / "tune" / "trials").iterdir())
    assert main(command) == 0, capsys.readouterr().err
    assert {name: (out / "tune" / name).read_bytes() for name in files} == files
    assert sorted(p.name for p in (out / "tune" / "trials").iterdir()) == trials
    again = capsys.readouterr().out
    assert f"kept seed {best.environment.seed}" in again and "best:" in again


@pytest.mark.parametrize(("asked", "node", "expected"), [(2.0, 2.0, 1.99), (1.0, 2.0, 1.0), (0.5, 2.0, 0.5),
                                                         (4.0, 8.0, 4.0), (8.0, 8.0, 7.99)])
def test_a_trial_worker_leaves_its_driver_room_on_the_node(asked, node, expected):
    # configs/laptop.yaml's worker takes both CPUs of a 2-core laptop; beside a trial's driver it cannot.
    sizing = trial_workers(TrainWorkers(workers=1, gpus_per_worker=0.0, cpus_per_worker=asked), node)
    assert sizing.cpus_per_worker == pytest.approx(expected)
    assert sizing.cpus_per_worker + TRIAL_DRIVER_CPUS <= node + 1e-9
