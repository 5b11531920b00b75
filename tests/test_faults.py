"""Faults: a Train worker killed mid-epoch, and the same command run again after the driver stopped."""

import json
import os
import signal
import threading
import time

import pytest

from gunsound.cli import main
from tests.conftest import FAST, LAPTOP_CONFIG, run_then_kill, train_args

pytestmark = pytest.mark.ray


def _train_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors if a.pid]


def test_worker_killed_mid_epoch_resumes_from_checkpoint(ray_local, synth_dir, tmp_path):
    out = tmp_path / "run"
    live = out / "fold_0" / "metrics.json"
    killed = []

    def kill_after_first_epoch():
        deadline = time.time() + 240
        while time.time() < deadline:
            if live.exists() and len(json.loads(live.read_text() or "[]")) >= 1:
                checkpoints = list((out / "ray" / "fold_0").glob("checkpoint_*"))
                pids = _train_worker_pids()
                if checkpoints and pids:
                    time.sleep(0.5)  # into the second epoch
                    for pid in pids:
                        os.kill(pid, signal.SIGKILL)
                    killed.extend(pids)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_epoch, daemon=True)
    killer.start()
    code = main(train_args(synth_dir, out, "--set", "training.epochs=3"))
    killer.join(timeout=5)
    assert killed, "no Train worker was killed"
    assert code == 0
    epochs = json.loads((out / "metrics.json").read_text())["folds"]["0"]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]  # every epoch reported once
    assert [e["epoch"] for e in json.loads(live.read_text())] == [1, 2, 3]


def test_rerun_after_the_driver_died_resumes_the_fold(ray_local, synth_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(synth_dir), "--output", str(out), *[a for kv in FAST for a in ("--set", kv)],
            "--set", "training.epochs=5"]
    live = out / "fold_0" / "metrics.json"
    snapshot = out / "ray" / "fold_0" / "checkpoint_manager_snapshot.json"

    def registered_epochs() -> list[int]:
        # Ray Train's controller lists the checkpoints it has registered here; a rerun resumes from the newest.
        try:
            return [r["metrics"]["epoch"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return []

    run_then_kill(["ray_jobs.train", str(LAPTOP_CONFIG), *args], lambda: bool(registered_epochs()),
                   tmp_path / "job.log")
    resumed_from = max(registered_epochs())
    before = json.loads(live.read_text())
    assert resumed_from < 5 and len(before) < 5
    assert main(["train", str(LAPTOP_CONFIG), *args]) == 0
    after = json.loads((out / "metrics.json").read_text())["folds"]["0"]["epochs"]
    assert [e["epoch"] for e in after] == [1, 2, 3, 4, 5]
    # The epochs checkpointed before the kill were not trained again: their records are the same.
    for epoch in range(resumed_from):
        assert after[epoch]["epoch_seconds"] == before[epoch]["epoch_seconds"]
