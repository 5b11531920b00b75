"""`ray job submit` against a real two-node Ray cluster on loopback, with Ray 2.60's token authentication."""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from tests.conftest import FAST, LAPTOP_CONFIG, REPO

pytestmark = pytest.mark.ray
RAY = str(Path(sys.executable).with_name("ray"))


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _node_ports(ports: list[int]) -> list[str]:
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
             "--ray-client-server-port"]
    return [f"{name}={port}" for name, port in zip(names, ports, strict=True)]


def _ray_start(args: list[str], env: dict) -> None:
    done = subprocess.run([RAY, "start", *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"ray start {' '.join(args)} failed:\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and a worker node started with `ray start`; token auth on, with a token of the cluster's own
    (RAY_AUTH_TOKEN_PATH): `ray start` refuses to start without one, and ~/.ray/auth_token is the user's."""
    tempfile_dir = str(tmp_path_factory.mktemp("rc"))
    temp = Path(tempfile_dir)
    token = temp / "auth_token"
    with os.fdopen(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, *rest = _ports(2 + 14)
    common = ["--node-ip-address=127.0.0.1", "--object-store-memory=200000000", "--disable-usage-stats"]
    try:
        _ray_start(["--head", f"--port={gcs}", "--num-cpus=1", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", f"--temp-dir={temp}", *common, *_node_ports(rest[:7])], env)
        _ray_start([f"--address=127.0.0.1:{gcs}", "--num-cpus=2", *common, *_node_ports(rest[7:])], env)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:  # also when a start failed: stop only this cluster's processes, the session's own Ray keeps running
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if tempfile_dir in cmd or f"127.0.0.1:{gcs}" in cmd or f"--gcs-address=127.0.0.1:{gcs}" in cmd:
                try:
                    proc.kill()
                except psutil.Error:
                    pass


def _submit(address: str, env: dict, args: list[str], timeout: float = 400) -> str:
    runtime_env = json.dumps({"excludes": [".venv", ".git", "outputs", "data", "*.pt"]})
    deadline = time.time() + timeout
    while True:  # the job agent takes a few seconds to come up after `ray start`
        result = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(REPO),
                                 "--runtime-env-json", runtime_env, "--", *args],
                                env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if "No available agent" not in result.stdout + result.stderr or time.time() > deadline - 60:
            break
        time.sleep(3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_train_and_score_jobs_on_a_two_node_cluster(cluster, synth_dir, tmp_path):
    address, env = cluster
    from tests.conftest import zip_folder

    run = tmp_path / "run"
    dataset = zip_folder(synth_dir, tmp_path / "Gun_sound_detection.zip")   # as the README's cluster example
    out = _submit(address, env, [sys.executable, "-m", "ray_jobs.train", str(LAPTOP_CONFIG), "--data", str(dataset),
                                 "--output", str(run), *[a for kv in FAST for a in ("--set", kv)],
                                 "--set", "training.epochs=1"])
    assert "fold 0:" in out and (run / "fold_0" / "model.pt").exists()
    assert pd.read_parquet(run / "manifest.parquet")["path"].str.startswith(f"zip://{dataset}!/").all()
    scored = tmp_path / "scored"
    audio = synth_dir / "Gun_Classifier" / "MG-42"
    out = _submit(address, env, [sys.executable, "-m", "ray_jobs.score", str(run), str(audio), str(scored)])
    assert "scored 10 files (10 ok, 0 errors" in out
    assert len(pd.read_parquet(scored / "files")) == 10
