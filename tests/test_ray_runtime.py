"""The local Ray that init_ray starts: what it runs for a job with and without Ray Train."""

import json
import os
import subprocess
import sys

import pytest

from gunsound.ray_runtime import MIN_OBJECT_STORE_BYTES, object_store_bytes_for

# Run in its own process: the test session's Ray (conftest.ray_local) is already initialized in this one,
# and init_ray returns at once on an initialized Ray.
PROBE = """
import json, sys
import ray
from ray.util.state import list_actors
from gunsound.ray_runtime import init_ray

def state_api():
    try:
        list_actors(timeout=10)
        return True
    except Exception:
        return False

report = {}
for name, kwargs in (("scoring", dict(feature_tasks=False, object_store_bytes=100 * 2**20)),
                     ("training", dict(feature_tasks=True))):
    init_ray(num_cpus=1, **kwargs)
    report[name] = {"store": ray.cluster_resources()["object_store_memory"], "state_api": state_api(),
                    "dashboard": ray._private.worker.get_dashboard_url()}
    ray.shutdown()
print("REPORT" + json.dumps(report))
"""


def test_local_ray_starts_the_dashboard_only_for_ray_train_and_sizes_its_object_store():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT", 1)[1])
    # Scoring and featurizing alone: no dashboard (so no State API), the object store it asked for.
    assert report["scoring"]["state_api"] is False and not report["scoring"]["dashboard"]
    assert abs(report["scoring"]["store"] - 100 * 2**20) < 2**20
    # Training and tuning: Ray Train cleans up through the dashboard's State API; the default store. (Whether
    # the State API answers also depends on another local Ray holding the dashboard agent's port, as the test
    # session's own Ray does: the dashboard having started is what init_ray decides.)
    assert report["training"]["dashboard"]
    assert abs(report["training"]["store"] - 512 * 2**20) < 2**20


def test_object_store_sized_to_what_the_work_keeps_in_it():
    assert object_store_bytes_for(0, 0) == MIN_OBJECT_STORE_BYTES  # Ray refuses less
    small, large = object_store_bytes_for(80 * 2**20), object_store_bytes_for(4 * 2**30)
    assert MIN_OBJECT_STORE_BYTES <= small < 512 * 2**20  # the reference data's features: well under the default
    assert large > 4 * 2**30  # a materialized dataset fits whole, with room for the blocks in flight


def test_a_cluster_that_ray_start_recorded_here_is_joined_and_no_other_local_ray_is(monkeypatch, ray_local):
    """On the head node after `ray attach` (or a laptop with a `ray start`), a job joins that cluster, as Ray's own
    ray.init() would (sizing a local Ray's object store there was refused by Ray); another job's local Ray, such
    as this session's own (`ray_local`), is not joined."""
    import ray._private.services as services

    from gunsound.ray_runtime import running_here

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: "127.0.0.1:6380")
    assert running_here().endswith(":6380")
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    assert running_here() is None


GRANTED = """
import json, ray
ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, address="local")

def device(**options):
    @ray.remote(num_cpus=0, **options)
    def where():
        from gunsound.accelerator import compute_device
        try:
            return str(compute_device("a test task"))
        except RuntimeError as exc:
            return "error: " + str(exc)
    return ray.get(where.remote())

print("REPORT" + json.dumps({"granted": device(num_gpus=1), "not granted": device(),
                             "allowed": device(num_gpus=1, runtime_env={"env_vars": {"GUNSOUND_ALLOW_CPU_ON_GPU": "1"}})}))
"""


def test_a_granted_gpu_that_cuda_cannot_use_is_an_error_not_a_cpu_job_holding_it():
    """A node whose driver cannot run this torch's CUDA build (a GPU Ray grants on a machine without CUDA here):
    the worker says so and fails, rather than holding the GPU while computing on one CPU thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "GUNSOUND_ALLOW_CPU_ON_GPU")}
    done = subprocess.run([sys.executable, "-c", GRANTED], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT", 1)[1])
    if report["granted"] == "cuda":
        pytest.skip("CUDA runs here")
    assert report["granted"].startswith("error: a test task holds GPU(s) 0 but CUDA is not available on this node")
    assert "GUNSOUND_ALLOW_CPU_ON_GPU=1" in report["granted"]
    assert report["not granted"] == "cpu" and report["allowed"] == "cpu"


def test_a_local_object_store_is_capped_by_memory_and_dev_shm(monkeypatch):
    """100,000 four-second clips of the resnet50 configuration keep 27 GiB of features: a store that size made
    ray.init refuse to start (over /dev/shm) where Ray's default share of memory, spilling to disk, runs."""
    import collections

    import psutil

    from gunsound import ray_runtime

    gib = 2**30
    monkeypatch.setattr(psutil, "virtual_memory", lambda: collections.namedtuple("vm", "total")(24 * gib))
    monkeypatch.setattr(ray_runtime.shutil, "disk_usage", lambda path: collections.namedtuple("du", "free")(12 * gib))
    monkeypatch.setattr(ray_runtime.os.path, "isdir", lambda path: True)
    monkeypatch.setattr(ray_runtime.sys, "platform", "linux")
    assert ray_runtime.local_object_store_bytes(27 * gib) == int(0.3 * 24 * gib)  # memory's share
    assert ray_runtime.local_object_store_bytes(gib) == gib  # what the work keeps, where it fits
    monkeypatch.setattr(ray_runtime.shutil, "disk_usage", lambda path: collections.namedtuple("du", "free")(gib))
    assert ray_runtime.local_object_store_bytes(4 * gib) == int(0.9 * gib)  # /dev/shm's free space
    monkeypatch.setattr(ray_runtime.shutil, "disk_usage", lambda path: collections.namedtuple("du", "free")(2**20))
    assert ray_runtime.local_object_store_bytes(4 * gib) == MIN_OBJECT_STORE_BYTES  # never under Ray's minimum
