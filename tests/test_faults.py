"""Faults: the driver of a training job killed, then the same command run again, and a Train worker killed
mid-epoch during that rerun. One training serves both tests (each fault costs a worker group's start-up)."""

import json
import os
import signal
import threading
import time

import pytest

from gunsound.cli import main
from tests.conftest import FAST, LAPTOP_CONFIG, run_then_kill

pytestmark = pytest.mark.ray
EPOCHS = 5


def _train_worker_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    # The session's Ray by its address: with another Ray on the machine, auto-detection refuses to choose.
    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors if a.pid]


@pytest.fixture(scope="module")
def faulted_run(ray_local, synth_dir, tmp_path_factory) -> dict:
    """A job's driver killed once Ray Train registered a checkpoint; the same command run again, and during
    that rerun, once it registered a checkpoint of its own, its Train worker killed into the next epoch."""
    tmp = tmp_path_factory.mktemp("faults")
    out = tmp / "run"
    args = ["--data", str(synth_dir), "--output", str(out), *[a for kv in FAST for a in ("--set", kv)],
            "--set", f"training.epochs={EPOCHS}"]
    live = out / "fold_0" / "metrics.json"
    snapshot = out / "ray" / "fold_0" / "checkpoint_manager_snapshot.json"

    def registered_epochs() -> list[int]:
        # Ray Train's controller lists the checkpoints it has registered here; a rerun resumes from the newest.
        try:
            return [r["metrics"]["epoch"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return []

    run_then_kill(["ray_jobs.train", str(LAPTOP_CONFIG), *args], lambda: bool(registered_epochs()),
                  tmp / "job.log")
    resumed_from = max(registered_epochs())
    before = json.loads(live.read_text())

    killed, errors = [], []
    rerun_ended = threading.Event()

    def kill_after_a_checkpoint_of_the_rerun():
        # Watches for as long as the rerun trains (a loaded machine may take minutes to reach a checkpoint).
        while not rerun_ended.is_set():
            if max(registered_epochs(), default=0) > resumed_from:
                try:
                    pids = _train_worker_pids()
                except Exception as exc:  # noqa: BLE001 - retried; named in the test if it never works
                    errors.append(repr(exc))
                    pids = []
                if pids:
                    time.sleep(0.5)  # into the next epoch
                    for pid in pids:
                        os.kill(pid, signal.SIGKILL)
                    killed.extend(pids)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_a_checkpoint_of_the_rerun, daemon=True)
    killer.start()
    try:
        code = main(["train", str(LAPTOP_CONFIG), *args])
    finally:
        rerun_ended.set()
    killer.join(timeout=5)
    return {"out": out, "live": live, "resumed_from": resumed_from, "before": before, "code": code,
            "killed": killed, "errors": errors}


def test_worker_killed_mid_epoch_resumes_from_checkpoint(faulted_run):
    r = faulted_run
    assert r["killed"], f"no Train worker was killed (errors: {r['errors'][-3:]})"
    assert r["code"] == 0
    epochs = json.loads((r["out"] / "metrics.json").read_text())["folds"]["0"]["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))  # every epoch reported once
    assert [e["epoch"] for e in json.loads(r["live"].read_text())] == list(range(1, EPOCHS + 1))


def test_rerun_after_the_driver_died_resumes_the_fold(faulted_run):
    r = faulted_run
    resumed_from, before = r["resumed_from"], r["before"]
    assert resumed_from < EPOCHS and len(before) < EPOCHS
    assert r["code"] == 0
    after = json.loads((r["out"] / "metrics.json").read_text())["folds"]["0"]["epochs"]
    assert [e["epoch"] for e in after] == list(range(1, EPOCHS + 1))
    # The epochs checkpointed before the kill were not trained again: their records are the same.
    for epoch in range(resumed_from):
        assert after[epoch]["epoch_seconds"] == before[epoch]["epoch_seconds"]
