"""On a cluster whose GPU workers scale from zero (Ray's fake multi-node provider: a head with no CPU, a worker
type with a fake GPU), jobs ask for GPUs and the autoscaler launches that worker type. A fake GPU cannot run
CUDA, so the work itself runs through the CPU path of the same code on the launched node."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from gunsound.accelerator import ALLOW_CPU_VAR
from gunsound.synthesis import generate_archive
from tests.conftest import FAST, LAPTOP_CONFIG

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"


def _launcher_config(gcs_address: str) -> dict:
    """Ray's fake multi-node provider config (its example.yaml, which the wheel does not ship)."""
    return {
        "cluster_name": "fake", "max_workers": 2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0,
                           "max_workers": 1}},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": []}


@pytest.fixture(scope="module")
def gpu_from_zero():
    """A head with CPU 0 and a `gpu_worker` type (2 CPU, 1 fake GPU) scaling from zero. Unlike Ray's
    AutoscalingCluster it never runs `ray stop --force`: it stops only its own processes (those under its
    temp folder), so the session's other Ray is left alone."""
    temp = tempfile.mkdtemp(prefix="/tmp/gsas")  # short: Ray's sockets live under it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = Path(temp) / "autoscaling.json"
    config.write_text(json.dumps(_launcher_config(f"127.0.0.1:{port}")))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_AUTH_MODE": "disabled",  # a loopback-only test cluster
           ALLOW_CPU_VAR: "1"}  # its GPUs are fake: the workers it launches compute on their CPU
    subprocess.run([str(RAY), "start", "--head", f"--port={port}", f"--autoscaling-config={config}",
                    "--num-cpus=0", f"--temp-dir={temp}", "--include-dashboard=false"],
                   env=env, check=True, capture_output=True)
    job_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "GUNSOUND_AUTOSCALING_CONFIG": str(config)}
    try:
        yield job_env, Path(temp)
    finally:
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(temp in arg for arg in p.info["cmdline"] or []):
                    p.kill()
            except psutil.Error:
                pass


def _launched(temp: Path) -> list[str]:
    """The node types the autoscaler says it launched (its monitor log)."""
    logs = "".join(p.read_text(errors="replace") for p in temp.glob("session_*/logs/monitor*.log"))
    return [line for line in logs.splitlines() if "gpu_worker" in line and ("Adding" in line or "launch" in line)]


@pytest.mark.ray
def test_training_and_scoring_jobs_ask_for_gpus_and_the_autoscaler_launches_the_gpu_worker(gpu_from_zero, synth_dir,
                                                                                          tmp_path):
    env, temp = gpu_from_zero
    out = tmp_path / "run"
    started = time.monotonic()
    job = subprocess.run([sys.executable, "-m", "ray_jobs.train", str(LAPTOP_CONFIG), "--data", str(synth_dir),
                          "--output", str(out), *[a for kv in FAST for a in ("--set", kv)],
                          "--set", "dataset.folds=[0]", "--set", "training.epochs=1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "each fold asks for 1 worker(s) of 2 CPU + 1 GPU" in job.stderr  # laptop.yaml: 2 CPUs a worker
    assert "may launch: gpu_worker x1 (CPU 2, GPU 1)" in job.stderr
    assert _launched(temp), "the autoscaler launched no gpu_worker"
    workers = json.loads((out / "fold_0" / "metrics.json").read_text())[-1]["workers"]
    # The Train worker held the GPU it asked for, on the launched node type, and ran the CPU path there.
    assert [(w["node_type"], w["gpus"], w["device"]) for w in workers] == [("gpu_worker", ["0"], "cpu")]
    assert "fold 0 ran on rank 0: cpu (2 threads) on" in job.stderr and "(gpu_worker), GPU 0" in job.stderr

    audio = tmp_path / "audio"
    generate_archive(audio / "a.wav", minutes=0.1, bursts_per_minute=10, seed=1)
    generate_archive(audio / "b.wav", minutes=0.05, bursts_per_minute=10, seed=2)
    job = subprocess.run([sys.executable, "-m", "ray_jobs.score", str(out), str(audio), str(tmp_path / "scores")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "scoring asks for up to 1 scorer(s) of 1 GPU" in job.stderr
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert summary["files_ok"] == 2 and summary["devices"] == ["cpu"]
    assert len(summary["scorers"]) == 1 and summary["scorers"][0].endswith("(gpu_worker), GPU 0")
    assert time.monotonic() - started < 900
