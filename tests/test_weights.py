"""Pretrained weights settled once by the driver: from a local file, from S3 (moto), from a gunsound model.pt,
and the hub path failing in seconds with one message when the hub cannot be reached."""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import boto3
import pytest
import timm
import torch

from gunsound import storage
from gunsound.config import ArchitectureConfig, load_config
from gunsound.features import FeatureParams
from gunsound.model import ModelArtifact, build_model
from gunsound.weights import PretrainedWeightsError, copy_location, resolve_pretrained
from tests.conftest import REPO, SEED_CONFIG


@pytest.fixture(scope="module")
def imagenet_resnet18():
    """An ImageNet-shaped resnet18 (RGB stem, 1000-class head), randomly initialised: what the hub serves."""
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=1000).eval()


def _same_backbone(model, imagenet):
    torch.testing.assert_close(model.backbone.conv1.weight, imagenet.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    torch.testing.assert_close(model.backbone.bn1.running_var, imagenet.bn1.running_var)


def test_a_local_file_is_copied_into_the_run_and_every_worker_builds_from_the_copy(tmp_path, imagenet_resnet18):
    source = tmp_path / "resnet18.pth"
    torch.save(imagenet_resnet18.state_dict(), source)
    out = str(tmp_path / "run")
    arch = ArchitectureConfig(backbone="resnet18", pretrained=True, pretrained_weights=str(source))
    resolved = resolve_pretrained(arch, out)
    assert resolved.pretrained_weights == copy_location(out, "resnet18") == f"{out}/pretrained/resnet18.pt"
    assert replace(resolved, pretrained_weights=arch.pretrained_weights) == arch  # nothing else changes
    info = json.loads((tmp_path / "run" / "pretrained" / "resnet18.json").read_text())
    assert info["source"] == str(source) and len(info["sha256"]) == 64
    source.unlink()  # workers read the run's copy only
    copy = storage.read_torch(resolved.pretrained_weights)  # plain tensors: loads with weights_only=True
    assert copy["conv1.weight"].shape == (64, 1, 7, 7) and "fc.weight" not in copy
    _same_backbone(build_model(resolved, 9), imagenet_resnet18)


def test_weights_on_s3_are_copied_to_an_s3_run(s3_server, tmp_path, imagenet_resnet18):
    storage.configure_s3(s3_server)
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="gunsound-weights")
    torch.save(imagenet_resnet18.state_dict(), tmp_path / "resnet18.pth")
    client.upload_file(str(tmp_path / "resnet18.pth"), "gunsound-weights", "hub/resnet18.pth")
    arch = ArchitectureConfig(backbone="resnet18", pretrained_weights="s3://gunsound-weights/hub/resnet18.pth")
    resolved = resolve_pretrained(arch, "s3://gunsound-weights/runs/r1")
    assert resolved.pretrained_weights == "s3://gunsound-weights/runs/r1/pretrained/resnet18.pt"
    client.delete_object(Bucket="gunsound-weights", Key="hub/resnet18.pth")
    _same_backbone(build_model(resolved, 9), imagenet_resnet18)


def test_the_backbone_of_a_gunsound_model_file_is_accepted(tmp_path):
    arch = ArchitectureConfig(backbone="resnet18", pretrained=False)
    trained = build_model(arch, 3)
    ModelArtifact(classes=["a", "b", "c"], features=FeatureParams(32000, 1024, 320, 64, 50.0, 14000.0, False),
                  chunk_seconds=2.0, architecture=arch, loss_function="BCE",
                  state_dict=trained.state_dict()).save(str(tmp_path / "model.pt"))
    resolved = resolve_pretrained(replace(arch, pretrained=True, pretrained_weights=str(tmp_path / "model.pt")),
                                  str(tmp_path / "run"))
    model = build_model(resolved, 5)
    for name, tensor in trained.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[name], tensor)


def test_weights_of_another_backbone_are_refused_not_silently_skipped(tmp_path, imagenet_resnet18):
    torch.save(imagenet_resnet18.state_dict(), tmp_path / "resnet18.pth")
    arch = ArchitectureConfig(backbone="resnet34", pretrained_weights=str(tmp_path / "resnet18.pth"))
    with pytest.raises(PretrainedWeightsError, match=r"not weights of resnet34.*architecture\.pretrained: false"):
        resolve_pretrained(arch, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", [b"not a torch file", None])
def test_a_missing_or_foreign_file_is_one_clear_error(tmp_path, content):
    path = tmp_path / "weights.pt"
    if content is not None:
        path.write_bytes(content)
    arch = ArchitectureConfig(backbone="resnet18", pretrained_weights=str(path))
    with pytest.raises(PretrainedWeightsError,
                       match=rf"architecture\.pretrained_weights {path}.*architecture\.pretrained: false"):
        resolve_pretrained(arch, str(tmp_path / "run"))


def test_no_pretraining_settles_nothing(tmp_path):
    arch = ArchitectureConfig(backbone="resnet18", pretrained=False)
    assert resolve_pretrained(arch, str(tmp_path / "run")) is arch
    assert not (tmp_path / "run").exists()


def test_hub_offline_without_a_cached_copy_fails_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    started = time.monotonic()
    with pytest.raises(PretrainedWeightsError, match=r"HF_HUB_OFFLINE.*architecture\.pretrained_weights"):
        resolve_pretrained(ArchitectureConfig(backbone="resnet18"), str(tmp_path / "run"))
    assert time.monotonic() - started < 5


def test_the_seed_config_without_the_hub_fails_in_seconds_with_one_message(tmp_path):
    """A fresh process, an empty hub cache, and a hub endpoint where nothing listens."""
    code = ("import sys; from gunsound.config import load_config; from gunsound.weights import resolve_pretrained;"
            f"resolve_pretrained(load_config({str(SEED_CONFIG)!r}).architecture, {str(tmp_path / 'run')!r})")
    closed = "http://127.0.0.1:9"  # the discard port: connection refused
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": closed}
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gunsound.weights.PretrainedWeightsError: architecture.backbone resnet50")
    assert "timm/resnet50" in last and closed in last
    assert "architecture.pretrained_weights" in last and "architecture.pretrained: false" in last
    assert elapsed < 30, f"took {elapsed:.0f} s"
    assert load_config(SEED_CONFIG).architecture.pretrained is True
