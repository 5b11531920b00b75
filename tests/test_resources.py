"""What a job asks for, from the config and the cluster's possible nodes (no Ray needed)."""

import math

import pytest
import yaml

from gunsound.resources import (
    AUTOSCALING_CONFIG_VAR,
    ClusterCapacity,
    NodeType,
    ResourceError,
    TrainWorkers,
    calls_per_cpu_scorer,
    folds_at_once,
    launcher_node_types,
    node_types_from_launcher_config,
    scorer_actors,
    train_workers,
)

GPU_FROM_ZERO = ClusterCapacity({"memory": 1e10}, (NodeType("gpu_worker", {"CPU": 16, "GPU": 1}, 8),
                                                   NodeType("cpu_worker", {"CPU": 16}, 4)))
CPU_ONLY = ClusterCapacity({"CPU": 0}, (NodeType("cpu_worker", {"CPU": 16}, 4),))
LAPTOP = ClusterCapacity({"CPU": 2})


def sizing(capacity, **kw):
    args = {"device": "auto", "listed_gpus": 1, "workers_per_fold": None, "gpus_per_worker": None,
            "cpus_per_worker": 1.0} | kw
    return train_workers(capacity=capacity, **args)


def test_a_cluster_with_no_live_gpu_but_a_gpu_node_type_asks_for_gpus():
    assert GPU_FROM_ZERO.most("GPU") == 8 and GPU_FROM_ZERO.live.get("GPU") is None
    w = sizing(GPU_FROM_ZERO, listed_gpus=2)
    assert (w.workers, w.gpus_per_worker) == (2, 1.0)
    assert scorer_actors(device="auto", actors=None, capacity=GPU_FROM_ZERO) == (8, 1.0)
    assert scorer_actors(device="auto", actors=3, capacity=GPU_FROM_ZERO) == (3, 1.0)


def test_cpu_runs_are_chosen_by_the_config_or_by_a_cluster_without_gpu_types():
    assert sizing(GPU_FROM_ZERO, device="cpu").gpus_per_worker == 0
    assert sizing(CPU_ONLY).gpus_per_worker == 0
    assert sizing(LAPTOP).describe() == "1 worker(s) of 1 CPU"
    assert scorer_actors(device="cpu", actors=None, capacity=GPU_FROM_ZERO) == (192, 0.0)
    assert scorer_actors(device="auto", actors=None, capacity=LAPTOP) == (2, 0.0)
    assert scorer_actors(device="auto", actors=5, capacity=LAPTOP) == (2, 0.0)


@pytest.mark.parametrize(("capacity", "workers", "folds"), [
    (LAPTOP, TrainWorkers(1, 0.0, 2.0), 1),  # laptop.yaml: one worker takes both cores
    (LAPTOP, TrainWorkers(1, 0.0, 1.0), 2),
    (LAPTOP, TrainWorkers(2, 0.0, 0.5), 2),  # half-CPU DDP ranks
    (ClusterCapacity({"CPU": 0.5}), TrainWorkers(1, 0.0, 1.0), 1),  # never less than one
    (CPU_ONLY, TrainWorkers(1, 0.0, 4.0), 16),  # 4 nodes of 16 CPUs that may be launched
    (GPU_FROM_ZERO, TrainWorkers(2, 1.0, 1.0), 4),  # 8 GPUs to launch, 2 a fold
    (ClusterCapacity({"CPU": 8}, (NodeType("gpu", {"CPU": 8, "GPU": 1}, -1),)), TrainWorkers(1, 1.0, 1.0), 1 << 30),
])
def test_only_the_folds_a_cluster_can_hold_start_at_once(capacity, workers, folds):
    assert folds_at_once(workers, capacity) == folds


@pytest.mark.parametrize(("capacity", "calls"), [
    (LAPTOP, 2),  # one machine: one actor, one call per CPU in threads
    (ClusterCapacity({"CPU": 16}, live_nodes=2), 1),  # nodes of unknown sizes: one CPU per actor fits any
    (CPU_ONLY, 1),  # nodes to launch: likewise
])
def test_cpu_scorers_share_one_actor_only_on_one_machine(capacity, calls):
    assert calls_per_cpu_scorer(2, capacity) == calls


@pytest.mark.parametrize(("capacity", "kw", "message"), [
    (CPU_ONLY, {"device": "cuda"}, "environment.device is cuda"),
    (GPU_FROM_ZERO, {"workers_per_fold": 9}, "9 GPUs per fold"),
    (GPU_FROM_ZERO, {"gpus_per_worker": 2.0}, "do not fit on any one node"),
    (LAPTOP, {"cpus_per_worker": 4.0}, "do not fit on any one node"),
])
def test_a_request_the_cluster_can_never_hold_is_an_error_naming_the_key(capacity, kw, message):
    with pytest.raises(ResourceError, match=message):
        sizing(capacity, **kw)


def test_node_types_from_a_launcher_config_and_an_unlimited_type():
    config = yaml.safe_load(open("cluster.yaml"))
    types = {t.name: t for t in node_types_from_launcher_config(config)}
    assert config["head_node_type"] not in types
    assert any(t.resources.get("GPU") for t in types.values())
    assert ClusterCapacity({}, (NodeType("g", {"GPU": 1}, -1),)).most("GPU") == math.inf


def test_the_autoscaling_config_is_read_from_the_named_file(tmp_path, monkeypatch):
    path = tmp_path / "as.yaml"
    path.write_text(yaml.safe_dump({"head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 0}}, "g": {"resources": {"CPU": 2, "GPU": 1}, "max_workers": 2}}}))
    monkeypatch.setenv(AUTOSCALING_CONFIG_VAR, str(path))
    assert launcher_node_types() == (NodeType("g", {"CPU": 2.0, "GPU": 1.0}, 2),)
    monkeypatch.setenv(AUTOSCALING_CONFIG_VAR, str(tmp_path / "missing.yaml"))
    with pytest.raises(ResourceError, match="missing.yaml: no such file"):
        launcher_node_types()


def test_a_gpu_on_a_live_node_fits_a_worker_even_where_only_cpu_types_may_be_launched():
    """A GPU on the head node, CPU-only worker types: `device: auto` chose the GPU (the cluster holds one) and
    then refused the worker as fitting on no node, since only the launchable types were counted per node."""
    from gunsound.resources import ClusterCapacity, NodeType

    cap = ClusterCapacity(live={"CPU": 8.0, "GPU": 1.0}, node_types=(NodeType("cpu_worker", {"CPU": 16.0}, 4),),
                          live_largest={"CPU": 8.0, "GPU": 1.0})
    workers = train_workers(device="auto", listed_gpus=1, workers_per_fold=None, gpus_per_worker=None,
                            cpus_per_worker=4, capacity=cap)
    assert (workers.workers, workers.gpus_per_worker) == (1, 1.0)
    with pytest.raises(ResourceError, match="do not fit on any one node"):  # no node, live or launchable, holds 17 CPUs
        train_workers(device="auto", listed_gpus=1, workers_per_fold=None, gpus_per_worker=None, cpus_per_worker=17,
                      capacity=cap)
