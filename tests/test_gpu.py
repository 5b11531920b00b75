"""The CUDA paths: the front end on the GPU, mixed precision, and the train and score jobs on a local Ray that
has a GPU. They run where CUDA is (`pytest -m gpu`); a CPU-only machine skips them, and says so."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gunsound import train_loop
from gunsound.config import AudioConfig, load_config
from gunsound.features import FeatureParams, LogMelSpectrogram
from gunsound.inference import ScoringModel, WindowScorer
from gunsound.model import ModelArtifact, build_model
from gunsound.synthesis import generate_dataset
from tests.conftest import LAPTOP_CONFIG, REPO, reference_log_mel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("autocast", [False, True])
def test_log_mel_on_cuda_matches_float64_reference(autocast):
    params = FeatureParams.from_config(AudioConfig(sample_rate=48000, stft_window_size=2048, hop_size=512,
                                                   mel_frequency_bins=128, minimum_frequency=50,
                                                   maximum_frequency=16000))
    rng = np.random.default_rng(0)
    t = np.arange(48000) / 48000
    waves = np.stack([(0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(48000)).astype(np.float32)
                      for f in (440, 1234, 5000)])
    frontend = LogMelSpectrogram(params).cuda()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
        got = frontend(torch.from_numpy(waves).cuda())
    assert got.dtype == torch.float32  # the STFT stays in fp32 under autocast
    for i, wave in enumerate(waves):
        np.testing.assert_allclose(got[i, 0].double().cpu().numpy(), reference_log_mel(wave, params),
                                   atol=2e-3, rtol=0)


def test_training_precision_is_bf16_autocast_on_cuda_and_off_on_cpu():
    assert train_loop.training_precision(torch.device("cpu"), True) == (False, torch.float16)
    amp, dtype = train_loop.training_precision(torch.device("cuda"), True)
    assert amp and dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert not train_loop.training_precision(torch.device("cuda"), False)[0]


def test_window_scorer_with_amp_on_cuda_agrees_with_fp32_on_cpu(monkeypatch):
    cfg = load_config(LAPTOP_CONFIG)
    classes = [f"c{i}" for i in range(9)]
    torch.manual_seed(0)
    weights = build_model(cfg.architecture, len(classes), pretrained=False).state_dict()
    model = ScoringModel([ModelArtifact(classes=classes, features=FeatureParams.from_config(cfg.audio),
                                        chunk_seconds=2.0, architecture=cfg.architecture, loss_function="BCE",
                                        state_dict=weights)])
    rng = np.random.default_rng(1)
    waves = (0.1 * rng.standard_normal((70, 96000))).astype(np.float32)

    on_gpu = WindowScorer(model, mixed_precision=True, batch_size=32)
    assert on_gpu.device.type == "cuda" and on_gpu.amp
    gpu = on_gpu({"wave": waves.copy()})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = WindowScorer(model, mixed_precision=True, batch_size=32)({"wave": waves.copy()})
    assert set(gpu["device"]) == {"cuda"} and set(cpu["device"]) == {"cpu"}
    assert gpu["probs"].shape == cpu["probs"].shape == (70, 9)
    np.testing.assert_allclose(gpu["probs"], cpu["probs"], atol=0.02)


def _job(module: str, *args: str) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
    except subprocess.TimeoutExpired as exc:  # show where it stood, not only that it timed out
        pytest.fail(f"{module} ran past {exc.timeout} s:\n{(exc.stderr or b'')[-6000:]!r}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def test_train_and_score_jobs_use_the_gpu(tmp_path):
    """A local Ray that finds the GPU: feature actors take GPU shares, the fold trains on CUDA with bf16
    autocast (or fp16 with loss scaling), and the scoring actors score on CUDA."""
    data = tmp_path / "data"
    generate_dataset(data, clips_per_class=12, background=4, seed=5)
    run = tmp_path / "run"
    _job("ray_jobs.train", str(LAPTOP_CONFIG), "--data", str(data), "--output", str(run),
         "--set", "training.epochs=2")
    history = json.loads((run / "fold_0" / "metrics.json").read_text())
    assert [h["device"].split(":")[0] for h in history] == ["cuda", "cuda"]
    assert {h["precision"] for h in history} <= {"bfloat16", "float16"}
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["valid_loss"]) for h in history)

    scored = tmp_path / "scored"
    _job("ray_jobs.score", str(run), str(data / "Gun_Classifier"), str(scored))
    summary = json.loads((scored / "summary.json").read_text())
    assert summary["devices"] == ["cuda"]
    assert summary["files_ok"] == summary["files"] == 9 * 12 + 4


SCORER_DEVICES = """
import json, ray
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, address="local")

@ray.remote(num_cpus=0)
class Scorer:
    def device(self):
        import torch
        from gunsound.accelerator import compute_device
        return [str(compute_device("a scorer")), torch.cuda.is_available()]

print("REPORT" + json.dumps({"granted": ray.get(Scorer.options(num_gpus=1).remote().device.remote()),
                             "not granted": ray.get(Scorer.remote().device.remote())}))
"""


def test_a_scorer_actor_granted_no_gpu_computes_on_the_cpu_though_it_sees_cuda():
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for an actor that asked for no GPU: CPU scorer actors on a GPU
    node see CUDA, and must not load their model onto the GPU another actor was granted."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")}
    done = subprocess.run([sys.executable, "-c", SCORER_DEVICES], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT", 1)[1])
    assert report["granted"] == ["cuda", True]
    assert report["not granted"][0] == "cpu"
