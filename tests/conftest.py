"""Shared fixtures: a synthetic dataset made by the code, a moto S3 server on loopback, one local Ray."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gunsound.features import FeatureParams
from gunsound.synthesis import generate_dataset

REPO = Path(__file__).resolve().parents[1]
SEED_CONFIG = REPO / "configs" / "gun_sound_resnet50.yaml"
LAPTOP_CONFIG = REPO / "configs" / "laptop.yaml"
SMALL_DATA_CONFIG = REPO / "configs" / "small_data.yaml"
# Modules that start Ray clusters of their own: they run first, before the session's Ray is up beside them.
OWN_CLUSTER_MODULES = ("test_jobs.py", "test_autoscaling.py", "test_ray_runtime.py")
# Training settings that keep a fold to seconds on a laptop.
FAST = ["architecture.backbone=resnet10t", "training.epochs=2", "training.batch_size=16",
        "audio.mel_frequency_bins=32", "training.warmup_epochs=0.5", "training.gradient_clip=1.0"]


def pytest_collection_modifyitems(items: list) -> None:
    items.sort(key=lambda item: item.path.name not in OWN_CLUSTER_MODULES)  # stable: file order otherwise


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset in the Hydrogen Torch layout (9 classes x 10 clips + 5 background)."""
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, clips_per_class=10, background=5, seed=7)
    return out


def train_args(data, output, *extra: str) -> list[str]:
    """`gunsound train` with the laptop config and FAST on `data`, into `output`, then `extra` arguments."""
    return ["train", str(LAPTOP_CONFIG), "--data", str(data), "--output", str(output),
            *[arg for kv in FAST for arg in ("--set", kv)], *extra]


# The shared small run: two folds of FAST (2 epochs), half of the clips held out for validation in each, each fold
# on two one-CPU Train workers (DDP; the folds run one after the other on the session's 2 CPUs), its epochs
# tracked with MLflow (rank 0 logs them).
TRAINED_RUN_EXTRA = ("--set", "dataset.validation_size=0.5", "--set", "dataset.folds=[0, 1]",
                     "--set", "environment.workers_per_fold=2", "--set", "environment.cpus_per_worker=1",
                     "--set", "logging.logger=MLflow")


@pytest.fixture(scope="session")
def trained_run_cli(ray_local, synth_dir, tmp_path_factory) -> tuple[Path, int]:
    """One small run trained once per session through the CLI (`main(["train", ...])`): its folder and the
    command's exit status. Tests that only read a finished run share it (test_training its results, test_ddp
    its ranks, test_tracking its MLflow store, test_scoring its models); a test that changes a run copies it."""
    from gunsound.cli import main

    out = tmp_path_factory.mktemp("trained") / "run"
    code = main(train_args(synth_dir, out, *TRAINED_RUN_EXTRA))
    return out, code


@pytest.fixture(scope="session")
def trained_run(trained_run_cli) -> Path:
    """The shared run's folder (see trained_run_cli), once its command succeeded. Read it, never write to it."""
    out, code = trained_run_cli
    assert code == 0, "the shared training run failed"
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


def zip_folder(folder: Path, archive: Path, prefix: str = "Gun_sound_detection/") -> Path:
    """A deflated zip of a folder, its members under `prefix`."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, prefix + f.relative_to(folder).as_posix())
    return archive


def run_then_kill(args: list[str], ready, log_path, timeout: float = 300) -> None:
    """Start `python -m ...args` as a driver of the session's Ray, SIGKILL it once ready() holds."""
    import ray

    # An explicit address: with several Ray instances on one machine, auto-detection refuses to choose.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = open(log_path, "w")  # noqa: SIM115 - closed below, after the process is gone
    proc = subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.3)
        tail = open(log_path).read()[-3000:]
        assert proc.poll() is None, f"the job ended before it could be killed:\n{tail}"
        assert ready(), f"the job never reached the point to kill it at:\n{tail}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; its job's actors die with it
        proc.wait()
        log.close()


def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)


def reference_log_mel(wave: np.ndarray, p: FeatureParams) -> np.ndarray:
    """float64: reflect-padded centred frames, periodic Hann, |rfft|^2, triangular HTK mel filters, log."""
    x = np.pad(wave.astype(np.float64), p.n_fft // 2, mode="reflect")
    n_frames = 1 + (len(x) - p.n_fft) // p.hop_length
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(p.n_fft) / p.n_fft)
    frames = np.stack([x[i * p.hop_length : i * p.hop_length + p.n_fft] * window for i in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (frames, bins)
    bin_hz = np.linspace(0, p.sample_rate / 2, p.n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(p.f_min), hz_to_mel(p.f_max), p.n_mels + 2))
    fb = np.zeros((len(bin_hz), p.n_mels))
    for m in range(p.n_mels):
        lo, centre, hi = edges[m], edges[m + 1], edges[m + 2]
        up = (bin_hz - lo) / (centre - lo)
        down = (hi - bin_hz) / (hi - centre)
        fb[:, m] = np.maximum(0, np.minimum(up, down))
    mel = power @ fb
    return np.log(np.maximum(mel, 1e-10)).T  # (mels, frames)
