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

from gunsound import cli, storage, weights
from gunsound.config import ArchitectureConfig, load_config
from gunsound.features import FeatureParams
from gunsound.model import ModelArtifact, build_model
from gunsound.weights import PretrainedWeightsError, copy_location, resolve_pretrained
from tests.conftest import REPO, SEED_CONFIG, train_args


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


def test_weights_of_a_deeper_backbone_holding_all_its_tensors_are_refused(tmp_path):
    """resnet34's file holds every resnet18 name with resnet18's shapes: taken, it would half-load another
    network with only timm's 'may be expected' log line."""
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet34", pretrained=False, num_classes=1000).state_dict(), tmp_path / "r34.pth")
    arch = ArchitectureConfig(backbone="resnet18", pretrained_weights=str(tmp_path / "r34.pth"))
    with pytest.raises(PretrainedWeightsError, match=(
            rf"^architecture\.pretrained_weights {tmp_path / 'r34.pth'}: not weights of resnet18 \(96 of the "
            r"file's 218 tensors not in it, first layer1\.2\.conv1\.weight\);.*architecture\.pretrained: false")):
        resolve_pretrained(arch, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_weights_with_the_backbones_names_but_other_shapes_are_refused_by_name(tmp_path):
    """mobilenetv3_small_075's tensors bear mobilenetv3_small_050's names: torch's refusal (a line per tensor)
    names neither the setting nor the file. The backbone's own ImageNet weights (RGB stem, a classifier named
    `classifier`) still load."""
    torch.manual_seed(0)
    torch.save(timm.create_model("mobilenetv3_small_075", pretrained=False).state_dict(), tmp_path / "075.pth")
    own = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    torch.save(own.state_dict(), tmp_path / "050.pth")
    arch = ArchitectureConfig(backbone="mobilenetv3_small_050", pretrained_weights=str(tmp_path / "075.pth"))
    with pytest.raises(PretrainedWeightsError) as refused:
        resolve_pretrained(arch, str(tmp_path / "run"))
    message = str(refused.value)
    assert message.startswith(
        f"architecture.pretrained_weights {tmp_path / '075.pth'}: not weights of mobilenetv3_small_050 (192 tensors "
        "of another shape, first blocks.0.0.conv_pw.weight (16, 16, 1, 1) in the file, (8, 16, 1, 1) in "
        "mobilenetv3_small_050);"), message
    assert "size mismatch" not in message and "\n" not in message
    resolved = resolve_pretrained(replace(arch, pretrained_weights=str(tmp_path / "050.pth")), str(tmp_path / "run"))
    backbone = build_model(resolved, 2).backbone
    torch.testing.assert_close(backbone.conv_stem.weight, own.conv_stem.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(backbone.conv_head.weight, own.conv_head.weight)


@pytest.mark.parametrize("backbone", ["levit_128s", "efficientnet_b0"])
def test_a_backbones_own_file_with_a_head_of_several_layers_loads(tmp_path, backbone):
    """LeViT's head holds a BatchNorm beside its `head.linear` classifier: a backbone without classes has none
    of it, and the whole head is what a fresh one replaces, not tensors of another model."""
    from gunsound.model import build_backbone

    torch.manual_seed(0)
    torch.save(timm.create_model(backbone, pretrained=False).state_dict(), tmp_path / "own.pth")
    build_backbone(ArchitectureConfig(backbone=backbone, pretrained=True, pretrained_weights=str(tmp_path / "own.pth")))


@pytest.mark.parametrize("where", ["timm's loader", "the backbone build"])
def test_a_load_that_fails_anyway_is_the_same_one_line_error(tmp_path, imagenet_resnet18, monkeypatch, where):
    """Past the check, torch or timm may still refuse the tensors (a RuntimeError of many lines): still a bad
    `architecture.pretrained_weights`, named with its file."""
    torch.save(imagenet_resnet18.state_dict(), tmp_path / "resnet18.pth")

    def refuse(*_args, **_kwargs):
        raise RuntimeError("Error(s) in loading state_dict for ResNet:\n\tsize mismatch for conv1.weight: ...")

    monkeypatch.setattr(*(("timm.models.load_pretrained", refuse) if where == "timm's loader"
                          else (weights, "build_backbone", refuse)))
    arch = ArchitectureConfig(backbone="resnet18", pretrained_weights=str(tmp_path / "resnet18.pth"))
    with pytest.raises(PretrainedWeightsError, match=(
            rf"^architecture\.pretrained_weights {tmp_path / 'resnet18.pth'}: cannot be loaded into resnet18 "
            r"\(RuntimeError: Error\(s\) in loading state_dict for ResNet:\);.*pretrained: false")) as refused:
        resolve_pretrained(arch, str(tmp_path / "run"))
    assert "size mismatch" not in str(refused.value)


def test_train_with_weights_of_another_backbone_exits_as_bad_config(tmp_path, synth_dir, capsys):
    """A weights file that is not the backbone's is a bad setting: exit 2, one line, before Ray starts."""
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), tmp_path / "r34.pth")
    code = cli.main(train_args(synth_dir, tmp_path / "run", "--set", "dataset.validation_size=0.5",
                               "--set", "architecture.backbone=resnet18", "--set", "architecture.pretrained=true",
                               "--set", f"architecture.pretrained_weights={tmp_path / 'r34.pth'}"))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == cli.EXIT_USAGE
    assert len(errors) == 1 and errors[0].startswith(
        f"error: architecture.pretrained_weights {tmp_path / 'r34.pth'}: not weights of resnet18"), errors


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


@pytest.mark.parametrize("saved", ["best_state.pt", "state.pt", "state.pt of a DDP-wrapped model"])
def test_a_folds_best_state_or_train_checkpoint_gives_its_backbone(tmp_path, saved):
    """A fold's best_state.pt (the classifier's state dict) and a Ray Train state.pt (it under "model") hold
    the same backbone as model.pt, under the classifier's `backbone.` prefix."""
    from gunsound.train_loop import save_bytes

    torch.manual_seed(0)
    arch = ArchitectureConfig(backbone="resnet10t", pretrained=False)
    trained = build_model(arch, 3)
    state = trained.state_dict()
    if saved.endswith("DDP-wrapped model"):
        state = {f"module.{k}": v for k, v in state.items()}
    content = state if saved == "best_state.pt" else {"model": state, "epoch": 0, "history": [], "best_model": None}
    (tmp_path / "weights.pt").write_bytes(save_bytes(content))
    model = build_model(replace(arch, pretrained=True, pretrained_weights=str(tmp_path / "weights.pt")), 5)
    for name, tensor in trained.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[name], tensor)


def test_a_folds_best_state_of_another_backbone_is_still_refused(tmp_path):
    from gunsound.train_loop import save_bytes

    (tmp_path / "best_state.pt").write_bytes(save_bytes(
        build_model(ArchitectureConfig(backbone="resnet18", pretrained=False), 3).state_dict()))
    arch = ArchitectureConfig(backbone="resnet34", pretrained_weights=str(tmp_path / "best_state.pt"))
    with pytest.raises(PretrainedWeightsError, match=r"not weights of resnet34 \(\d+ of its \d+ tensors missing"):
        resolve_pretrained(arch, str(tmp_path / "run"))
