"""Shared fixtures: a synthetic dataset made by the code, a moto S3 server on loopback, one local Ray."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from gunsound.synthesis import generate_dataset

REPO = Path(__file__).resolve().parents[1]
SEED_CONFIG = REPO / "configs" / "gun_sound_resnet50.yaml"
LAPTOP_CONFIG = REPO / "configs" / "laptop.yaml"


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset in the Hydrogen Torch layout (9 classes x 10 clips + 5 background)."""
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, clips_per_class=10, background=5, seed=7)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback; credentials are fake and live only in this process's environment."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"})
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One small local Ray for the whole session (started after the S3 credentials are in the environment)."""
    import ray

    ray.init(num_cpus=2, object_store_memory=400 * 1024 * 1024, include_dashboard=True,
             log_to_driver=False, configure_logging=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
