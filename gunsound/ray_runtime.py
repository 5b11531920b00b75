"""Ray start-up: connect to a cluster or start a local Ray, warm its workers, and read its size."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import sys

import psutil
import ray

log = logging.getLogger(__name__)

# Ray refuses a smaller object store (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES).
MIN_OBJECT_STORE_BYTES = 75 * 2**20
# A local Ray's object store unless the caller sizes it: Ray's default is 30% of RAM. Its pages are taken
# as objects are written, not when Ray starts, so the size is a ceiling on what Ray may hold in memory
# (beyond it, objects spill to disk), not a cost: featurizing the 851 reference clips touched about 80 MB.
DEFAULT_OBJECT_STORE_BYTES = 512 * 2**20


def init_ray(address: str | None = None, num_cpus: int | None = None, feature_tasks: bool = True, *,
             dashboard: bool | None = None, object_store_bytes: int | None = None) -> None:
    """Connect to a cluster (address, RAY_ADDRESS as set by `ray job submit`, or one `ray start` started on
    this machine) or start a local Ray.

    A local Ray starts Ray Data's helper actors at once and, when `feature_tasks` says that feature tasks
    follow (training, tuning), has its pooled workers import the feature stack; scoring runs in actors
    that import it themselves, so there the warm-up would only hold the CPUs the actors wait for.

    `dashboard` (default: `feature_tasks`, i.e. training and tuning) starts Ray's dashboard, whose State API
    Ray Train uses to clean up after stopped trials and folds; without Ray Train (scoring, featurizing alone)
    it is a dozen processes of some 300 MB that the work never uses. `object_store_bytes` sizes a local
    Ray's object store (`object_store_bytes_for` from what the work keeps in it; default 512 MiB)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or running_here()
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(address="local", num_cpus=num_cpus, log_to_driver=True,
             include_dashboard=feature_tasks if dashboard is None else dashboard,
             object_store_memory=local_object_store_bytes(object_store_bytes or DEFAULT_OBJECT_STORE_BYTES))
    if feature_tasks:
        warm_up_workers()
    else:
        start_ray_data_helpers()


def running_here() -> str | None:
    """The address of a Ray cluster that `ray start` started on this machine (the head node after `ray attach`),
    which Ray's own `ray.init()` would join: a job run there uses that cluster, and a local Ray is sized only
    where there is none. None where there is none (or this Ray cannot tell)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        # None, not "auto": only a cluster that `ray start` recorded, not any local Ray (another job's own)
        return canonicalize_bootstrap_address(None)
    except (ImportError, AttributeError, ConnectionError):
        return None


# A local object store never takes more of the machine's memory than Ray's own default does.
OBJECT_STORE_MEMORY_SHARE = 0.3


def local_object_store_bytes(wanted: int) -> int:
    """A local Ray's object store: what the work keeps in it (`wanted`), but at most Ray's default share of
    memory and, on Linux, what /dev/shm has free (Ray refuses to start a larger store there: Docker gives
    64 MB by default). Beyond it, Ray spills objects to disk; never under Ray's minimum."""
    ceiling = int(OBJECT_STORE_MEMORY_SHARE * psutil.virtual_memory().total)
    if sys.platform.startswith("linux") and os.path.isdir("/dev/shm"):
        ceiling = min(ceiling, int(0.9 * shutil.disk_usage("/dev/shm").free))
    size = max(MIN_OBJECT_STORE_BYTES, min(wanted, ceiling))
    if size < wanted:
        log.info("object store %.2f GiB (the work keeps %.2f GiB in it; the rest spills to disk)",
                 size / 2**30, wanted / 2**30)
    return size


def object_store_bytes_for(resident_bytes: int, in_flight_bytes: int = 64 * 2**20) -> int:
    """An object store for work that keeps `resident_bytes` in it (a materialized dataset) while
    `in_flight_bytes` of blocks pass through, with half again for the store's own fragmentation and Ray
    Data's budget (it lets operators use half of the store); never under Ray's minimum."""
    return max(MIN_OBJECT_STORE_BYTES, int(1.5 * (resident_bytes + 2 * in_flight_bytes)))


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


def return_freed_memory() -> None:
    """Give the memory that a long-lived worker has freed back to the system (glibc's `malloc_trim`).

    glibc keeps freed heap pages in its arenas (one per thread that allocated) for later allocations, so
    without this a worker's resident memory climbs with every batch it has seen and stays at its highest. A
    no-op where the C library has no `malloc_trim`."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
