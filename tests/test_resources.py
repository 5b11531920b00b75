"""What a job asks for, from the config and the cluster's possible nodes (no Ray needed)."""

import copy
import logging
import math
import shutil

import pytest
import yaml

from gunsound.resources import (
    AUTOSCALING_CONFIG_VAR,
    ClusterCapacity,
    NodeType,
    ResourceError,
    TrainWorkers,
    calls_per_cpu_scorer,
    capacity_from_nodes,
    folds_at_once,
    launcher_config,
    launcher_node_types,
    max_workers_from_launcher_config,
    node_types_from_launcher_config,
    scorer_actors,
    train_workers,
    trials_at_once,
)
from gunsound.tuning import TRIAL_DRIVER_CPUS, trial_workers

GPU_FROM_ZERO = ClusterCapacity({"memory": 1e10}, (NodeType("gpu_worker", {"CPU": 16, "GPU": 1}, 8),
                                                   NodeType("cpu_worker", {"CPU": 16}, 4)))
CPU_ONLY = ClusterCapacity({"CPU": 0}, (NodeType("cpu_worker", {"CPU": 16}, 4),))
LAPTOP = ClusterCapacity({"CPU": 2})
# What Ray reports on cluster.yaml's head right after `ray up`: the head alive (CPU 0, no GPU), no worker yet.
HEAD_NODE = {"Alive": True, "Resources": {"CPU": 0.0, "memory": 2.2e10, "object_store_memory": 9e9,
                                          "node:10.0.1.5": 1.0, "node:__internal_head__": 1.0}}
# KubeRay, or a cluster started without `ray up`: a head of CPU 0 and no node types gunsound knows of.
NOTHING_KNOWN = capacity_from_nodes([HEAD_NODE])


def cluster_yaml(**node_types) -> ClusterCapacity:
    """cluster.yaml's cluster as a job on its head sees it, with some node types' fields changed."""
    config = copy.deepcopy(yaml.safe_load(open("cluster.yaml")))
    for name, fields in node_types.items():
        config["available_node_types"][name].update(fields)
    return capacity_from_nodes([HEAD_NODE], node_types_from_launcher_config(config),
                               max_workers_from_launcher_config(config))


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
    # One actor per CPU of the CPU-only type (4 x 16), not per CPU of every type (192): Ray's autoscaler launches a
    # GPU node for work that asks for no GPU only when no CPU-only node can take it, so a larger pool would buy
    # GPU nodes to decode audio. Asked for, more actors run on the GPU nodes' CPUs too.
    assert scorer_actors(device="cpu", actors=None, capacity=GPU_FROM_ZERO) == (64, 0.0)
    assert scorer_actors(device="cpu", actors=100, capacity=GPU_FROM_ZERO) == (100, 0.0)
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


def test_the_cluster_wide_max_workers_caps_what_the_node_types_can_reach_together():
    """cluster.yaml: 8 gpu_workers and 4 cpu_workers of 16 CPUs each, but at most 8 worker nodes in all: 128 CPUs
    at once, not 192; a gpu_worker max_workers raised past the cap does not raise the GPUs past 8."""
    cap = cluster_yaml()
    assert (cap.max_workers, cap.most("CPU"), cap.most("GPU")) == (8, 128, 8)
    assert cap.most("CPU", gpu_nodes=False) == 64
    assert "at most 8 worker node(s) in all" in cap.describe()
    assert scorer_actors(device="cpu", actors=None, capacity=cap) == (64, 0.0)
    assert scorer_actors(device="cpu", actors=500, capacity=cap) == (128, 0.0)
    more = cluster_yaml(gpu_worker={"max_workers": 16})
    assert more.most("GPU") == 8 and more.most("CPU") == 128
    with pytest.raises(ResourceError, match="12 GPUs per fold, but this cluster can hold at most 8"):
        train_workers(device="auto", listed_gpus=1, workers_per_fold=12, gpus_per_worker=None, cpus_per_worker=1.0,
                      capacity=more)
    # The best mix under the cap: the larger nodes first.
    mixed = ClusterCapacity({}, (NodeType("small", {"CPU": 4}, 10), NodeType("large", {"CPU": 32}, 2)), max_workers=3)
    assert mixed.most("CPU") == 2 * 32 + 4
    assert ClusterCapacity({}, (NodeType("g", {"GPU": 1}, -1),), max_workers=5).most("GPU") == 5


@pytest.mark.parametrize(("capacity", "cpus"), [
    # cpu_worker moved to 32 CPUs; the GPU type keeps 16: no node holds 1 GPU and 24 CPUs.
    (cluster_yaml(cpu_worker={"resources": {"CPU": 32}}), 24),
    # A GPU on an 8-CPU head, CPU-only worker types of 16: no node holds 1 GPU and 12 CPUs.
    (ClusterCapacity({"CPU": 8.0, "GPU": 1.0}, (NodeType("cpu_worker", {"CPU": 16.0}, 4),),
                     live_largest={"CPU": 8.0, "GPU": 1.0}), 12),
    # Two live nodes, one with the GPU and one with the CPUs, no autoscaler.
    (capacity_from_nodes([{"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}},
                          {"Alive": True, "Resources": {"CPU": 32.0}}]), 8),
])
def test_a_worker_must_fit_whole_on_one_node(capacity, cpus):
    assert capacity.per_node("GPU") >= 1 and capacity.per_node("CPU") >= cpus  # each resource alone would fit
    with pytest.raises(ResourceError, match="do not fit on any one node"):
        train_workers(device="auto", listed_gpus=1, workers_per_fold=None, gpus_per_worker=None, cpus_per_worker=cpus,
                      capacity=capacity)


@pytest.mark.parametrize(("workers", "folds"), [
    (TrainWorkers(2, 0.75, 1.0), 4),  # one 0.75-GPU worker a 1-GPU node: 8 workers, not 8 / 1.5 = 5 folds
    (TrainWorkers(1, 0.6, 1.0), 8),  # not 8 / 0.6 = 13
    (TrainWorkers(2, 0.5, 10.0), 4),  # two halves of a GPU fit a node, two 10-CPU shares of its 16 do not
    (TrainWorkers(1, 0.0, 10.0), 8),  # one 10-CPU worker a 16-CPU node, 8 nodes: not 192 / 10 = 19
    (TrainWorkers(1, 0.0, 6.0), 16),  # two a node: not 192 / 6 = 32
])
def test_folds_at_once_counts_whole_workers_node_by_node(workers, folds):
    assert folds_at_once(workers, cluster_yaml()) == folds


def test_folds_at_once_on_live_nodes_counts_them_one_by_one():
    nodes = [{"Alive": True, "Resources": {"CPU": 6.0, "GPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 6.0}}]
    assert folds_at_once(TrainWorkers(1, 0.0, 4.0), capacity_from_nodes(nodes)) == 2  # 12 CPUs, but 4 + 2 left over


def test_a_trial_is_sized_on_one_node_and_none_fitting_is_an_error():
    # A fixed cluster of two 16-CPU nodes, one 16-CPU worker on each: a trial's driver needs 0.01 CPU beside them.
    two = ClusterCapacity({"CPU": 32.0}, live_nodes=2, live_largest={"CPU": 16.0})
    fold = train_workers(device="cpu", listed_gpus=1, workers_per_fold=2, gpus_per_worker=None, cpus_per_worker=16,
                         capacity=two)
    trial = trial_workers(fold, two.per_node("CPU"))
    assert two.per_node("CPU") == 16 and trial.cpus_per_worker == pytest.approx(16 - TRIAL_DRIVER_CPUS)
    assert trials_at_once(trial, two, TRIAL_DRIVER_CPUS) == 1
    with pytest.raises(ResourceError, match="no Tune trial fits"):  # unshrunk, driver and workers need 32.01 CPUs
        trials_at_once(fold, two, TRIAL_DRIVER_CPUS)
    # Two 1-CPU workers fill a 2-core laptop: no CPU left for the driver, none shrunk since each fits beside it.
    laptop = trial_workers(TrainWorkers(2, 0.0, 1.0), LAPTOP.per_node("CPU"))
    with pytest.raises(ResourceError, match="lower environment.workers_per_fold"):
        trials_at_once(laptop, LAPTOP, TRIAL_DRIVER_CPUS)
    assert trials_at_once(TrainWorkers(1, 1.0, 15.99), cluster_yaml(), TRIAL_DRIVER_CPUS) == 8


def test_gpu_scorers_are_capped_at_the_gpus_the_cluster_can_hold(caplog):
    with caplog.at_level(logging.WARNING, logger="gunsound.resources"):
        assert scorer_actors(device="auto", actors=16, capacity=cluster_yaml()) == (8, 1.0)
    assert "scoring.actors=16 but this cluster can hold 8 GPU scorer(s)" in caplog.text


def test_a_gpu_on_the_head_adds_to_the_gpu_node_types():
    head_gpu = ClusterCapacity({"CPU": 8.0, "GPU": 1.0}, (NodeType("gpu_worker", {"CPU": 16.0, "GPU": 1.0}, 2),),
                               live_largest={"CPU": 8.0, "GPU": 1.0})
    assert head_gpu.most("GPU") == 3 and head_gpu.most("CPU") == 40
    assert sizing(head_gpu, workers_per_fold=3).workers == 3
    with pytest.raises(ResourceError, match="4 GPUs per fold"):
        sizing(head_gpu, workers_per_fold=4)
    assert scorer_actors(device="auto", actors=None, capacity=head_gpu) == (3, 1.0)
    # A live gpu_worker is one of the launchable ones: not counted twice.
    nodes = [HEAD_NODE | {"Resources": {**HEAD_NODE["Resources"], "GPU": 1.0, "CPU": 8.0}},
             {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0, "node:10.0.1.9": 1.0}}]
    live = capacity_from_nodes(nodes, head_gpu.node_types)
    assert live.head == {"CPU": 8.0, "GPU": 1.0, "memory": 2.2e10, "object_store_memory": 9e9}
    assert live.most("GPU") == 3


def test_device_cuda_asks_for_gpus_where_no_node_types_are_known(caplog):
    """KubeRay, or `ray start --autoscaling-config` without `ray up`: no launcher file on the head, nothing in the
    GCS. `auto` stays on what is known; `cuda` asks anyway and says how to tell gunsound the node types."""
    assert NOTHING_KNOWN.describe() == "live: CPU 0; no autoscaler node types known"
    assert sizing(NOTHING_KNOWN).describe() == "1 worker(s) of 1 CPU"
    assert scorer_actors(device="auto", actors=None, capacity=NOTHING_KNOWN) == (1, 0.0)
    with caplog.at_level(logging.WARNING, logger="gunsound.resources"):
        workers = sizing(NOTHING_KNOWN, device="cuda", listed_gpus=2, cpus_per_worker=4.0)
    assert workers.describe() == "2 worker(s) of 4 CPU + 1 GPU"
    assert "autoscaler must supply them" in caplog.text and AUTOSCALING_CONFIG_VAR in caplog.text
    assert folds_at_once(workers, NOTHING_KNOWN) == 1
    assert trials_at_once(workers, NOTHING_KNOWN, TRIAL_DRIVER_CPUS) == 1
    assert scorer_actors(device="cuda", actors=None, capacity=NOTHING_KNOWN) == (1, 1.0)
    assert scorer_actors(device="cuda", actors=4, capacity=NOTHING_KNOWN) == (4, 1.0)
    # Where node types are known and none has a GPU, cuda is still refused.
    with pytest.raises(ResourceError, match="environment.device is cuda"):
        sizing(CPU_ONLY, device="cuda")


def test_the_launcher_config_on_the_head_is_found_in_home(tmp_path, monkeypatch):
    """`ray up` puts the autoscaler's config in the head's ~/ray_bootstrap_config.yaml; the job on the head reads
    its node types and its cluster-wide max_workers from there."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(AUTOSCALING_CONFIG_VAR, raising=False)
    assert launcher_config() == {}
    shutil.copy("cluster.yaml", tmp_path / "ray_bootstrap_config.yaml")
    config = launcher_config()
    cap = capacity_from_nodes([HEAD_NODE], node_types_from_launcher_config(config),
                              max_workers_from_launcher_config(config))
    assert [t.name for t in cap.node_types] == ["gpu_worker", "cpu_worker"]
    assert (cap.most("GPU"), cap.most("CPU"), cap.live_nodes, cap.head["CPU"]) == (8, 128, 1, 0.0)
    assert launcher_node_types() == cap.node_types
