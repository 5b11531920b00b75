import pytest
import timm
import torch

from gunsound.config import ArchitectureConfig
from gunsound.features import FeatureParams
from gunsound.model import ModelArtifact, build_model


@pytest.mark.parametrize("pool", ["Average", "Max", "GeM", "Average + Max"])
def test_one_channel_log_mel_in_logits_out(pool):
    model = build_model(ArchitectureConfig(backbone="resnet18", pretrained=False, pool=pool, dropout=0.2), 9)
    logits = model(torch.randn(2, 1, 64, 94))
    assert logits.shape == (2, 9)
    logits.sum().backward()
    assert model.backbone.conv1.weight.grad is not None


def test_default_backbone_is_resnet50_with_the_seed_settings():
    model = build_model(ArchitectureConfig(pretrained=False), 9)
    assert model.backbone.num_features == 2048 and model.backbone.conv1.in_channels == 1
    assert model.dropout.p == 0.0


def test_pretrained_weights_from_a_local_file_fold_rgb_into_one_channel(tmp_path):
    """The same timm loader that reads hub weights, pointed at a file: RGB stem summed, classifier dropped."""
    imagenet = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    weights = tmp_path / "resnet18.pth"
    torch.save(imagenet.state_dict(), weights)
    model = build_model(ArchitectureConfig(backbone="resnet18", pretrained=True, pretrained_weights=str(weights)), 9)
    torch.testing.assert_close(model.backbone.conv1.weight, imagenet.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    assert model.head.out_features == 9


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown timm model 'resnet5000'"):
        build_model(ArchitectureConfig(backbone="resnet5000", pretrained=False), 9)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model(ArchitectureConfig(backbone="resnet18", pretrained_weights=str(tmp_path / "nope.pth")), 9)


def _artifact() -> ModelArtifact:
    arch = ArchitectureConfig(backbone="resnet18", pretrained=False, pool="GeM", dropout=0.1)
    weights = build_model(arch, 3).state_dict()
    return ModelArtifact(classes=["a", "b", "c"], features=FeatureParams(32000, 1024, 320, 64, 50.0, 14000.0, False),
                         chunk_seconds=2.0, architecture=arch, loss_function="BCE", state_dict=weights, fold=1,
                         best_epoch=3)


def test_model_artifact_round_trip_rebuilds_the_same_model(tmp_path):
    artifact = _artifact()
    artifact.save(str(tmp_path / "model.pt"))
    loaded = ModelArtifact.load(str(tmp_path / "model.pt"))
    assert (loaded.classes, loaded.features, loaded.architecture) == (artifact.classes, artifact.features,
                                                                       artifact.architecture)
    assert (loaded.chunk_seconds, loaded.loss_function, loaded.fold, loaded.best_epoch) == (2.0, "BCE", 1, 3)
    x = torch.randn(2, 1, 64, 100)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.build()(x), artifact.build()(x))


class _Planted:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize(("content", "message"), [
    ({"format": 1, "classes": ["a"], "payload": _Planted()}, "not a gunsound model file"),
    ({"format": 99}, "format 1"),
    ({"format": 1, "classes": ["a"]}, "lacks or misnames a field"),
])
def test_a_planted_or_foreign_model_file_is_refused(tmp_path, capsys, content, message):
    torch.save(content, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=message):
        ModelArtifact.load(str(tmp_path / "model.pt"))
    assert "code ran" not in capsys.readouterr().out


def test_planted_pretrained_weights_are_refused_without_running_code(tmp_path, capsys):
    torch.save({"conv1.weight": _Planted()}, tmp_path / "weights.pt")
    arch = ArchitectureConfig(backbone="resnet18", pretrained_weights=str(tmp_path / "weights.pt"))
    with pytest.raises(ValueError, match="architecture.pretrained_weights .*refused: loading it could run code"):
        build_model(arch, 9)
    assert "code ran" not in capsys.readouterr().out
