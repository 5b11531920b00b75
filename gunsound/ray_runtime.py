"""Ray start-up: connect to a cluster or start a local Ray, warm its workers, and read its size."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, feature_tasks: bool = True) -> None:
    """Connect to a cluster (address, or RAY_ADDRESS as set by `ray job submit`) or start a local Ray.

    A local Ray starts Ray Data's helper actors at once and, when `feature_tasks` says that feature tasks
    follow (training, tuning), has its pooled workers import the feature stack; scoring runs in actors
    that import it themselves, so there the warm-up would only hold the CPUs the actors wait for."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A laptop: a local Ray with a modest object store (Ray's default is 30% of RAM).
    # The dashboard serves the State API, which Ray Train uses to clean up after stopped trials and folds.
    ray.init(num_cpus=num_cpus, object_store_memory=1 << 30, include_dashboard=True, log_to_driver=True)
    if feature_tasks:
        warm_up_workers()
    else:
        start_ray_data_helpers()


@ray.remote(num_cpus=1)
def _load_feature_stack() -> None:
    """Import what a first feature batch would wait for: this module (torch, torchaudio, soundfile) and
    Ray Data's map-task machinery. The imports are explicit because a remote function is pickled by value
    (the module attribute is Ray's wrapper), so unpickling it imports nothing of gunsound by itself."""
    import ray.data._internal.execution.operators.map_operator  # noqa: F401

    import gunsound.ray_features  # noqa: F401


def warm_up_workers() -> list[ray.ObjectRef]:
    """Import the feature stack in one pooled worker per CPU, without waiting for it.

    Importing torch takes a worker about two seconds; done here it overlaps the driver's own start-up
    instead of delaying the first batches of the first pipeline. Later CPU tasks reuse these workers.
    """
    start_ray_data_helpers()
    return [_load_feature_stack.remote() for _ in range(cluster_cpus())]


def start_ray_data_helpers() -> bool:
    """Ray Data starts two detached helper actors (execution stats, resource coordination) in its first
    pipeline, which then waits about a second for them; started here, with Ray, they are up by then.
    Both calls are Ray Data's own get-or-create and return at once. False where this Ray lacks them."""
    try:
        from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:  # internal names of Ray 2.60; elsewhere the first pipeline just starts them itself
        log.debug("Ray Data helper actors not pre-started: internal API not found")
        return False
    get_or_create_stats_actor()
    get_or_create_autoscaling_coordinator()
    return True


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
