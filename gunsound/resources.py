"""What a job asks the cluster for: sized from the config and from what the cluster *may* have (its autoscaler's
node types), never only from the nodes alive when the job starts.

A cluster whose GPU workers scale from zero has no GPU until something asks for one: a job that sized itself from
`ray.cluster_resources()` would train on one CPU and score with CPU actors. Here a request for GPUs is made
whenever the cluster can have them (a live GPU, or a GPU node type its autoscaler may launch), so the autoscaler
brings the nodes; CPU-only runs happen when chosen (`environment.device: cpu`) or when no GPU is possible at all.

Where the node types come from, first found wins: the autoscaler's cluster config in Ray's GCS (autoscaler v2,
KubeRay), else the cluster launcher's config on the head (`~/ray_bootstrap_config.yaml`, or the file named by
GUNSOUND_AUTOSCALING_CONFIG). Without either (a laptop, a fixed cluster) the live nodes are all there is.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

AUTOSCALING_CONFIG_VAR = "GUNSOUND_AUTOSCALING_CONFIG"
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts the autoscaler's config on the head


class ResourceError(ValueError):
    """A request the cluster can never satisfy (names the config key)."""


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_workers: int  # how many the autoscaler may run; -1: no limit


@dataclass(frozen=True)
class ClusterCapacity:
    """The resources alive now and the node types an autoscaler may add (empty: no autoscaler known)."""

    live: dict[str, float]
    node_types: tuple[NodeType, ...] = ()
    live_nodes: int = 1
    live_largest: dict[str, float] = field(default_factory=dict)  # the most of each resource one live node holds

    def most(self, resource: str) -> float:
        """The most of a resource the cluster can ever hold at once: live, or every node type at its maximum."""
        if not self.node_types:
            return float(self.live.get(resource, 0.0))
        total = 0.0
        for t in self.node_types:
            amount = t.resources.get(resource, 0.0)
            if amount and t.max_workers < 0:
                return math.inf
            total += amount * t.max_workers
        return max(total, float(self.live.get(resource, 0.0)))

    def per_node(self, resource: str) -> float:
        """The most of a resource one node can hold (live or launchable): what one worker can ask for."""
        amounts = [t.resources.get(resource, 0.0) for t in self.node_types if t.max_workers != 0]
        # A live node counts as much as a launchable one (a GPU on the head, say): `most` counts it too.
        live = self.live_largest.get(resource, 0.0 if self.node_types else float(self.live.get(resource, 0.0)))
        return max([*amounts, live])

    def describe(self) -> str:
        live = ", ".join(f"{k} {v:g}" for k, v in sorted(self.live.items()) if k in ("CPU", "GPU")) or "nothing"
        if not self.node_types:
            return f"live: {live}; no autoscaler node types known"
        types = "; ".join(f"{t.name} x{t.max_workers if t.max_workers >= 0 else 'any'} "
                          f"({', '.join(f'{k} {v:g}' for k, v in sorted(t.resources.items()) if k in ('CPU', 'GPU'))})"
                          for t in self.node_types)
        return f"live: {live}; may launch: {types}"


def node_types_from_launcher_config(config: dict) -> tuple[NodeType, ...]:
    """The worker node types of a cluster launcher config (`available_node_types`; the head excluded, since
    it is alive whenever a job runs and its resources are in the live totals)."""
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items() if isinstance(v, int | float)}
        types.append(NodeType(name, resources, int(spec.get("max_workers", config.get("max_workers", 0)))))
    return tuple(types)


def _gcs_node_types() -> tuple[NodeType, ...]:
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as exc:  # noqa: BLE001 - an internal API of Ray: without it, fall back to the launcher's file
        log.debug("no cluster config in GCS: %s", exc)
        return ()
    if config is None:
        return ()
    return tuple(NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
                 for g in config.node_group_configs)


def launcher_node_types() -> tuple[NodeType, ...]:
    """The worker node types of the cluster launcher config on this machine (GUNSOUND_AUTOSCALING_CONFIG, else
    ~/ray_bootstrap_config.yaml, where `ray up` puts it on the head); () when there is none."""
    import yaml

    named = os.environ.get(AUTOSCALING_CONFIG_VAR)
    path = Path(named or LAUNCHER_CONFIG).expanduser()
    if not path.is_file():
        if named:
            raise ResourceError(f"{AUTOSCALING_CONFIG_VAR}={named}: no such file")
        return ()
    try:
        return node_types_from_launcher_config(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, AttributeError, TypeError, ValueError) as exc:
        raise ResourceError(f"{path}: not a readable autoscaler config ({exc})") from exc


def cluster_capacity() -> ClusterCapacity:
    """The connected Ray cluster's live resources and its autoscaler's node types."""
    import ray

    live = {k: float(v) for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
    alive = [n for n in ray.nodes() if n.get("Alive")]
    largest: dict[str, float] = {}
    for node in alive:
        for k, v in (node.get("Resources") or {}).items():
            if not k.startswith("node:"):
                largest[k] = max(largest.get(k, 0.0), float(v))
    return ClusterCapacity(live, _gcs_node_types() or launcher_node_types(), live_nodes=len(alive),
                           live_largest=largest)


@dataclass(frozen=True)
class TrainWorkers:
    """The Ray Train workers one fold asks for."""

    workers: int
    gpus_per_worker: float
    cpus_per_worker: float

    def describe(self) -> str:
        each = f"{self.cpus_per_worker:g} CPU" + (f" + {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else "")
        return f"{self.workers} worker(s) of {each}"


def uses_gpus(device: str, capacity: ClusterCapacity) -> bool:
    """Whether work asks for GPUs: `device` "cuda" always (an error where none can ever exist), "cpu" never,
    "auto" when the cluster has or may launch a GPU."""
    possible = capacity.most("GPU") > 0
    if device == "cuda" and not possible:
        raise ResourceError(f"environment.device is cuda but this cluster has no GPU and no GPU node type to "
                            f"launch ({capacity.describe()}); set environment.device: cpu or add a GPU node type")
    return device == "cuda" or (device == "auto" and possible)


def train_workers(*, device: str, listed_gpus: int, workers_per_fold: int | None, gpus_per_worker: float | None,
                  cpus_per_worker: float, capacity: ClusterCapacity) -> TrainWorkers:
    """Workers per fold: `workers_per_fold`, else one per listed GPU (`environment.gpus`) when GPUs are used,
    else one CPU worker. A request larger than the cluster can ever hold is an error naming the key."""
    gpu = uses_gpus(device, capacity)
    per_worker = (gpus_per_worker if gpus_per_worker is not None else 1.0) if gpu else 0.0
    workers = workers_per_fold if workers_per_fold is not None else (max(1, listed_gpus) if gpu else 1)
    if per_worker and workers * per_worker > capacity.most("GPU"):
        raise ResourceError(f"environment.workers_per_fold x gpus_per_worker = {workers * per_worker:g} GPUs per "
                            f"fold, more than this cluster can hold ({capacity.describe()})")
    if per_worker > capacity.per_node("GPU") or cpus_per_worker > max(capacity.per_node("CPU"), 1.0):
        raise ResourceError(f"environment.gpus_per_worker/cpus_per_worker ({per_worker:g} GPU, {cpus_per_worker:g} "
                            f"CPU) do not fit on any one node ({capacity.describe()})")
    return TrainWorkers(workers, per_worker, cpus_per_worker)


def folds_at_once(workers: TrainWorkers, capacity: ClusterCapacity) -> int:
    """How many folds' worker groups the cluster can ever hold side by side (at least one). A fold beyond
    them would only wait, and waiting is not free: its driver task and Ray Train's controller are processes
    that import torch (about 450 MB each) and sit idle until workers are free."""
    room = [capacity.most("CPU") / (workers.workers * workers.cpus_per_worker)]
    if workers.gpus_per_worker:
        room.append(capacity.most("GPU") / (workers.workers * workers.gpus_per_worker))
    fit = min(room)
    return max(1, int(fit)) if math.isfinite(fit) else 1 << 30


def scorer_actors(*, device: str, actors: int | None, capacity: ClusterCapacity) -> tuple[int, float]:
    """(actor pool's largest size, GPUs per actor) for scoring: one GPU per actor when GPUs are used, as many
    actors as `scoring.actors` or as GPUs the cluster can hold; without GPUs one actor per CPU it can hold."""
    if uses_gpus(device, capacity):
        most = capacity.most("GPU")
        return max(1, actors or int(min(most, 64))), 1.0
    cpus = int(min(capacity.most("CPU"), 4096)) or 1
    if actors and actors > cpus:
        log.warning("scoring.actors=%d but this cluster can hold %d CPUs and no GPU: using %d", actors, cpus, cpus)
    return max(1, min(actors or cpus, cpus)), 0.0


def calls_per_cpu_scorer(scorers: int, capacity: ClusterCapacity) -> int:
    """Scoring calls each CPU scorer actor runs side by side (one CPU each), for `scorers` calls in all. On one
    machine (one node alive, none to launch) a single actor holds them all, so torch and the model are in
    memory once for every core; across nodes each actor takes one CPU, which fits on any node."""
    return max(1, scorers) if capacity.live_nodes <= 1 and not capacity.node_types else 1


def placement(device: str) -> dict[str, Any]:
    """Where this Ray worker or actor runs: node address, autoscaler node type (where the node knows it), the
    GPUs Ray granted it and the device it computes on."""
    import ray

    context = ray.get_runtime_context()
    return {"node": ray.util.get_node_ip_address(), "node_type": os.environ.get("RAY_NODE_TYPE_NAME", ""),
            "gpus": [str(g) for g in context.get_accelerator_ids().get("GPU", [])], "device": device}


def describe_placement(where: dict[str, Any]) -> str:
    node = where["node"] + (f" ({where['node_type']})" if where.get("node_type") else "")
    gpus = f", GPU {','.join(where['gpus'])}" if where.get("gpus") else ""
    threads = f" ({where['threads']} threads)" if where.get("threads") else ""
    return f"{where['device']}{threads} on {node}{gpus}"
