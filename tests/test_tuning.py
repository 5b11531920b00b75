"""Ray Tune sweeps: the search space as data, and a small ASHA sweep on a local Ray."""

import json
import re

import pandas as pd
import pytest
import yaml

from gunsound.cli import main
from gunsound.config import ConfigError, load_config
from gunsound.resources import TrainWorkers
from gunsound.tuning import TRIAL_DRIVER_CPUS, search_space, to_tune_space, trial_workers
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


@pytest.mark.ray
def test_asha_sweep_writes_results_and_a_ready_best_config(ray_local, synth_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["tune", str(LAPTOP_CONFIG), "--data", str(synth_dir), "--output", str(out), "--num-samples", "2",
                 *[arg for kv in FAST for arg in ("--set", kv)], "--set", "training.epochs=1",
                 # Half-CPU Train workers: on a 2-CPU machine both trials run side by side, not one after another.
                 "--set", "environment.cpus_per_worker=0.5"])
    assert code == 0, capsys.readouterr().err
    table = pd.read_csv(out / "tune" / "results.csv")
    assert len(table) == 2 and table["valid_roc_auc"].notna().all()
    assert {"param:training.learning_rate", "param:training.epochs"} <= set(table.columns)
    best = load_config(out / "tune" / "best_config.yaml")  # a ready config, loadable as is
    assert best.training.learning_rate in set(table["param:training.learning_rate"])
    assert yaml.safe_load((out / "tune" / "best_config.yaml").read_text())["architecture"]["backbone"] == "resnet10t"
    assert "best:" in capsys.readouterr().out


@pytest.mark.parametrize(("asked", "node", "expected"), [(2.0, 2.0, 1.99), (1.0, 2.0, 1.0), (0.5, 2.0, 0.5),
                                                         (4.0, 8.0, 4.0), (8.0, 8.0, 7.99)])
def test_a_trial_worker_leaves_its_driver_room_on_the_node(asked, node, expected):
    # configs/laptop.yaml's worker takes both CPUs of a 2-core laptop; beside a trial's driver it cannot.
    sizing = trial_workers(TrainWorkers(workers=1, gpus_per_worker=0.0, cpus_per_worker=asked), node)
    assert sizing.cpus_per_worker == pytest.approx(expected)
    assert sizing.cpus_per_worker + TRIAL_DRIVER_CPUS <= node + 1e-9
