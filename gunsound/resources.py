"""What a job asks the cluster for: sized from the config and from what the cluster *may* have (its autoscaler's
node types), never only from the nodes alive when the job starts.

A cluster whose GPU workers scale from zero has no GPU until something asks for one: a job that sized itself from
`ray.cluster_resources()` would train on one CPU and score with CPU actors. Here a request for GPUs is made
whenever the cluster can have them (a live GPU, or a GPU node type its autoscaler may launch), so the autoscaler
brings the nodes; CPU-only runs happen when chosen (`environment.device: cpu`) or when no GPU is possible at all.

Where the node types come from, first found wins: the cluster config in Ray's GCS (`state.get_cluster_config()`,
which Ray Train and Ray Data read too; Ray 2.60's own autoscalers do not write it, an autoscaler that calls the
GCS's ReportClusterConfig does), else the cluster launcher's config on the driver's machine
(GUNSOUND_AUTOSCALING_CONFIG, or `~/ray_bootstrap_config.yaml` where `ray up` puts it on the head). Without either
(a laptop, a fixed cluster, KubeRay unless told) the live nodes are all there is; `environment.device: cuda` then
still asks for GPUs, since only the autoscaler can say whether they come.

Workers are placed whole, each on one node: what a cluster can hold is counted node by node (each node type up
to its own max_workers, all worker nodes up to the cluster's max_workers), never from cluster-wide totals.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

AUTOSCALING_CONFIG_VAR = "GUNSOUND_AUTOSCALING_CONFIG"
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts the autoscaler's config on the head
HEAD_RESOURCE = "node:__internal_head__"  # Ray's marker resource on the head node

Shape = dict[str, float]  # one node's resources


class ResourceError(ValueError):
    """A request the cluster can never satisfy (names the config key)."""


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_workers: int  # how many the autoscaler may run; -1: no limit


def _whole(shape: Shape, need: Shape) -> float:
    """How many whole workers of `need` one node of `shape` holds (inf where a worker needs nothing). Ray keeps
    resources to 1/10000, so a share like 1/3 is allowed its rounding."""
    counts = [math.floor(shape.get(k, 0.0) / v + 1e-6) for k, v in need.items() if v > 0]
    return min(counts, default=math.inf)


@dataclass(frozen=True)
class ClusterCapacity:
    """The resources alive now and the node types an autoscaler may add (empty: no autoscaler known)."""

    live: dict[str, float]
    node_types: tuple[NodeType, ...] = ()
    live_nodes: int = 1
    live_largest: dict[str, float] = field(default_factory=dict)  # the most of each resource one live node holds
    max_workers: int = -1  # the cluster-wide cap on worker nodes (the launcher's top-level max_workers); -1: none
    live_shapes: tuple[Shape, ...] = ()  # each live node's resources, where known
    head: Shape | None = None  # the head node's resources, where known

    def _live(self) -> tuple[Shape, ...]:
        """The live nodes' shapes: as given, else the one live node, else the largest node standing for all."""
        if self.live_shapes:
            return self.live_shapes
        if self.live_nodes <= 1 or not self.live_largest:
            return (self.live,)
        return (self.live_largest,)

    def _head(self) -> Shape:
        """The head's resources: alive whenever a job runs and never launched, so they add to the launchable
        types' (a live worker is one of those types, counted there already). One live node is the head."""
        if self.head is not None:
            return self.head
        return self.live if self.live_nodes <= 1 else {}

    def launchable(self) -> tuple[NodeType, ...]:
        """The node types the autoscaler may launch at all (a max_workers of 0, its own or the cluster's, bars one)."""
        return tuple(t for t in self.node_types if t.max_workers != 0) if self.max_workers != 0 else ()

    def _on_live(self, per_node: Callable[[Shape], float]) -> float:
        if self.live_shapes or self.live_nodes <= 1:
            return sum(per_node(s) for s in self._live())
        # Node sizes not given: no more than live_nodes of the largest node hold, nor than the totals do.
        return min(self.live_nodes * per_node(self.live_largest or self.live), per_node(self.live))

    def _best_mix(self, per_node: Callable[[Shape], float], types: tuple[NodeType, ...]) -> float:
        """The largest sum of `per_node` over the worker nodes the autoscaler may run at once: each type up to
        its max_workers, all of them up to the cluster's. Every node takes one place under the cap, so the
        types that give the most per node, taken first, reach it."""
        places = self.max_workers if self.max_workers >= 0 else math.inf
        total = 0.0
        for amount, most in sorted(((per_node(t.resources), t.max_workers) for t in types), key=lambda p: -p[0]):
            count = min(places, most if most >= 0 else math.inf)
            if amount <= 0 or count <= 0:
                continue
            if math.isinf(count):
                return math.inf
            total += amount * count
            places -= count
        return total

    def _at_most(self, per_node: Callable[[Shape], float], *, gpu_nodes: bool = True) -> float:
        live = self._on_live(per_node)
        types = tuple(t for t in self.launchable() if gpu_nodes or not t.resources.get("GPU"))
        if not self.node_types:
            return live
        return max(self._best_mix(per_node, types) + per_node(self._head()), live)

    def most(self, resource: str, *, gpu_nodes: bool = True) -> float:
        """The most of a resource the cluster can ever hold at once: the live nodes, or the head plus the best
        mix of node types the autoscaler may launch. `gpu_nodes=False` leaves out launchable GPU node types."""
        return self._at_most(lambda shape: float(shape.get(resource, 0.0)), gpu_nodes=gpu_nodes)

    def workers_at_once(self, gpus: float, cpus: float) -> float:
        """Whole workers of `gpus` GPUs and `cpus` CPUs the cluster can ever hold side by side, each on one node:
        fractional GPU shares and large CPU shares leave a node's remainder unused."""
        need = {"GPU": gpus, "CPU": cpus}
        return self._at_most(lambda shape: _whole(shape, need))

    def per_node(self, resource: str) -> float:
        """The most of a resource one node can hold (live or launchable)."""
        return max(s.get(resource, 0.0) for s in self._shapes())

    def holds(self, gpus: float, cpus: float) -> bool:
        """Whether one node (a launchable type or a live node) holds a worker of `gpus` GPUs and `cpus` CPUs."""
        return any(_whole(s, {"GPU": gpus, "CPU": cpus}) >= 1 for s in self._shapes())

    def _shapes(self) -> tuple[Shape, ...]:
        return (*(t.resources for t in self.launchable()), *self._live())

    def describe(self) -> str:
        live = ", ".join(f"{k} {v:g}" for k, v in sorted(self.live.items()) if k in ("CPU", "GPU")) or "nothing"
        if not self.node_types:
            return f"live: {live}; no autoscaler node types known"
        types = "; ".join(f"{t.name} x{t.max_workers if t.max_workers >= 0 else 'any'} "
                          f"({', '.join(f'{k} {v:g}' for k, v in sorted(t.resources.items()) if k in ('CPU', 'GPU'))})"
                          for t in self.node_types)
        cap = f"; at most {self.max_workers} worker node(s) in all" if self.max_workers >= 0 else ""
        return f"live: {live}; may launch: {types}{cap}"


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


def max_workers_from_launcher_config(config: dict) -> int:
    """The cluster-wide cap on worker nodes of a launcher config (its top-level max_workers); -1 where unset."""
    return int(config["max_workers"]) if isinstance(config.get("max_workers"), int) else -1


def _gcs_node_types() -> tuple[NodeType, ...]:
    """The node groups an autoscaler reported to the GCS (the key Ray Train and Ray Data read); () where none
    did, which is every cluster whose autoscaler is Ray 2.60's own (`ray up`, KubeRay)."""
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


def launcher_config() -> dict:
    """The cluster launcher config on this machine (GUNSOUND_AUTOSCALING_CONFIG, else
    ~/ray_bootstrap_config.yaml, where `ray up` puts it on the head); {} when there is none."""
    import yaml

    named = os.environ.get(AUTOSCALING_CONFIG_VAR)
    path = Path(named or LAUNCHER_CONFIG).expanduser()
    if not path.is_file():
        if named:
            raise ResourceError(f"{AUTOSCALING_CONFIG_VAR}={named}: no such file")
        return {}
    try:
        config = yaml.safe_load(path.read_text()) or {}
        node_types_from_launcher_config(config)  # refuses a file that is not a launcher config here, not later
    except (yaml.YAMLError, AttributeError, TypeError, ValueError) as exc:
        raise ResourceError(f"{path}: not a readable autoscaler config ({exc})") from exc
    return config


def launcher_node_types() -> tuple[NodeType, ...]:
    """The worker node types of the cluster launcher config on this machine; () when there is none."""
    return node_types_from_launcher_config(launcher_config())


def capacity_from_nodes(nodes: list[dict[str, Any]], node_types: tuple[NodeType, ...] = (),
                        max_workers: int = -1) -> ClusterCapacity:
    """A cluster's capacity from its nodes as `ray.nodes()` lists them and its autoscaler's node types."""
    shapes, head = [], None
    for node in nodes:
        if not node.get("Alive"):
            continue
        resources = node.get("Resources") or {}
        shape = {k: float(v) for k, v in resources.items() if not k.startswith("node:")}
        shapes.append(shape)
        if HEAD_RESOURCE in resources:
            head = shape
    live: dict[str, float] = {}
    largest: dict[str, float] = {}
    for shape in shapes:
        for k, v in shape.items():
            live[k] = live.get(k, 0.0) + v
            largest[k] = max(largest.get(k, 0.0), v)
    return ClusterCapacity(live, node_types, live_nodes=len(shapes), live_largest=largest, max_workers=max_workers,
                           live_shapes=tuple(shapes), head=head)


def cluster_capacity() -> ClusterCapacity:
    """The connected Ray cluster's live nodes and its autoscaler's node types."""
    import ray

    types, cap = _gcs_node_types(), -1
    if not types:
        config = launcher_config()
        types, cap = node_types_from_launcher_config(config), max_workers_from_launcher_config(config)
    return capacity_from_nodes(ray.nodes(), types, cap)


@dataclass(frozen=True)
class TrainWorkers:
    """The Ray Train workers one fold asks for."""

    workers: int
    gpus_per_worker: float
    cpus_per_worker: float

    def describe(self) -> str:
        each = f"{self.cpus_per_worker:g} CPU" + (f" + {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else "")
        return f"{self.workers} worker(s) of {each}"


def _told_nothing(capacity: ClusterCapacity) -> str:
    return (f"; if an autoscaler adds nodes gunsound was not told of (KubeRay, a cluster not started by `ray up`), "
            f"name a file with its node types in {AUTOSCALING_CONFIG_VAR}" if not capacity.node_types else "")


def uses_gpus(device: str, capacity: ClusterCapacity) -> bool:
    """Whether work asks for GPUs: `device` "cuda" always (an error where the known node types rule GPUs
    out), "cpu" never, "auto" when the cluster has or may launch a GPU."""
    possible = capacity.most("GPU") > 0
    if device == "cuda" and not possible:
        if capacity.node_types:
            raise ResourceError(f"environment.device is cuda but this cluster has no GPU and no GPU node type to "
                                f"launch ({capacity.describe()}); set environment.device: cpu or add a GPU node type")
        # No node types known: only the autoscaler, if there is one, can say whether GPUs come.
        log.warning("environment.device is cuda but no GPU is alive and no autoscaler node types are known (%s): "
                    "asking for GPUs anyway, and the cluster's autoscaler must supply them (the work waits until "
                    "it does). To size against the node types it may launch, name a file with them "
                    "(available_node_types, as in cluster.yaml) in %s", capacity.describe(), AUTOSCALING_CONFIG_VAR)
    return device == "cuda" or (device == "auto" and possible)


def _unsized(gpus: float, cpus: float, capacity: ClusterCapacity) -> bool:
    """Whether a worker is asked for with nothing to size it against: no node types known, and no live node
    with a GPU (for a GPU worker) or with a whole CPU (for a worker of at most one CPU, on a head of CPU 0).
    An autoscaler gunsound was not told of is then the only way it runs."""
    if capacity.node_types:
        return False
    if gpus:
        return capacity.most("GPU") == 0
    return cpus <= 1 and capacity.per_node("CPU") < 1


def train_workers(*, device: str, listed_gpus: int, workers_per_fold: int | None, gpus_per_worker: float | None,
                  cpus_per_worker: float, capacity: ClusterCapacity) -> TrainWorkers:
    """Workers per fold: `workers_per_fold`, else one per listed GPU (`environment.gpus`) when GPUs are used,
    else one CPU worker. A worker no one node holds, or more workers than the cluster can ever place at once,
    is an error naming the key."""
    gpu = uses_gpus(device, capacity)
    per_worker = (gpus_per_worker if gpus_per_worker is not None else 1.0) if gpu else 0.0
    workers = workers_per_fold if workers_per_fold is not None else (max(1, listed_gpus) if gpu else 1)
    sizing = TrainWorkers(workers, per_worker, cpus_per_worker)
    if _unsized(per_worker, cpus_per_worker, capacity):
        return sizing
    if not capacity.holds(per_worker, cpus_per_worker):
        raise ResourceError(f"environment.gpus_per_worker/cpus_per_worker ({per_worker:g} GPU, {cpus_per_worker:g} "
                            f"CPU) do not fit on any one node ({capacity.describe()}){_told_nothing(capacity)}")
    placeable = capacity.workers_at_once(per_worker, cpus_per_worker)
    if workers > placeable:
        gpus = f", {workers * per_worker:g} GPUs per fold" if per_worker else ""
        raise ResourceError(f"environment.workers_per_fold: {sizing.describe()}{gpus}, but this cluster can hold at "
                            f"most {placeable:g} such workers at once ({capacity.describe()}){_told_nothing(capacity)}")
    return sizing


def _groups_at_once(workers: TrainWorkers, capacity: ClusterCapacity) -> float:
    """Whole worker groups the cluster can ever hold side by side (0: not one; inf: no limit); one where the
    group was asked for with nothing to size it against."""
    if _unsized(workers.gpus_per_worker, workers.cpus_per_worker, capacity):
        return 1.0
    return capacity.workers_at_once(workers.gpus_per_worker, workers.cpus_per_worker) / workers.workers


def folds_at_once(workers: TrainWorkers, capacity: ClusterCapacity) -> int:
    """How many folds' worker groups the cluster can ever hold side by side (at least one). A fold beyond
    them would only wait, and waiting is not free: its driver task and Ray Train's controller are processes
    that import torch (about 450 MB each) and sit idle until workers are free."""
    fit = _groups_at_once(workers, capacity)
    return max(1, int(fit)) if math.isfinite(fit) else 1 << 30


def trials_at_once(workers: TrainWorkers, capacity: ClusterCapacity, driver_cpus: float) -> int:
    """How many Tune trials, each a driver of `driver_cpus` CPU beside its trainer's workers, the cluster can
    ever hold side by side. None is an error: a trial started anyway would wait forever for its workers."""
    fit = _groups_at_once(workers, capacity)
    if not _unsized(workers.gpus_per_worker, workers.cpus_per_worker, capacity):
        # The drivers' CPU comes out of the same nodes: a worker group that fills them leaves a driver none.
        fit = min(fit, capacity.most("CPU") / (workers.workers * workers.cpus_per_worker + driver_cpus))
    if fit < 1:
        raise ResourceError(f"no Tune trial fits on this cluster: each asks for {workers.describe()} and "
                            f"{driver_cpus:g} CPU for its driver ({capacity.describe()}); lower "
                            f"environment.workers_per_fold or environment.cpus_per_worker{_told_nothing(capacity)}")
    return int(fit) if math.isfinite(fit) else 1 << 30


def cpu_work_cpus(capacity: ClusterCapacity) -> float:
    """The CPUs that work asking for no GPU can use. Where the autoscaler may launch CPU-only nodes: those and
    the live nodes, since Ray's autoscaler launches a GPU node for such work only once no CPU-only node can
    take it (AUTOSCALER_CONSERVE_GPU_NODES), and a pool sized past them would buy GPU nodes to decode audio.
    Else every node's."""
    if any(not t.resources.get("GPU") and t.resources.get("CPU") for t in capacity.launchable()):
        return capacity.most("CPU", gpu_nodes=False)
    return capacity.most("CPU")


def scorer_actors(*, device: str, actors: int | None, capacity: ClusterCapacity) -> tuple[int, float]:
    """(actor pool's largest size, GPUs per actor) for scoring: one GPU (and one CPU) per actor when GPUs are
    used, as many actors as `scoring.actors` or as the cluster can hold; without GPUs one actor per CPU that
    CPU work can use (`scoring.actors` up to every CPU the cluster can hold)."""
    if uses_gpus(device, capacity):
        if _unsized(1.0, 1.0, capacity):
            return max(1, actors or 1), 1.0  # nothing to size against: uses_gpus said so
        held = int(min(capacity.workers_at_once(1.0, 1.0), 1 << 30))
        if actors and actors > held:
            log.warning("scoring.actors=%d but this cluster can hold %d GPU scorer(s) of 1 GPU: using %d",
                        actors, held, held)
        return max(1, min(actors or min(held, 64), held)), 1.0
    cpus = int(min(capacity.most("CPU"), 4096)) or 1
    if actors and actors > cpus:
        log.warning("scoring.actors=%d but this cluster can hold %d CPUs and no GPU: using %d", actors, cpus, cpus)
    return max(1, min(actors or int(min(cpu_work_cpus(capacity), 4096)), cpus)), 0.0


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
