from dataclasses import asdict, replace

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


def _pooled_input_of_the_head(model, x: torch.Tensor) -> torch.Tensor:
    """What the classifier's linear layer receives: the pooled (and, for a normed head, normed) features."""
    seen = []
    handle = model.head.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("pool", ["Average", "Max", "GeM", "Average + Max"])
def test_resnet_output_is_its_pooled_features_through_dropout_and_head(pool):
    """Backbones without a normed head keep the plain path: pool, dropout, linear; nothing else in between."""
    torch.manual_seed(0)
    model = build_model(ArchitectureConfig(backbone="resnet18", pretrained=False, pool=pool), 5).eval()
    x = torch.randn(2, 1, 64, 80)
    with torch.no_grad():
        expected = model.head(model.dropout(model.pool(model.backbone.forward_features(x))))
        assert torch.equal(model(x), expected)


def test_convnext_features_go_through_its_pretrained_head_norm_as_in_timm():
    """ConvNeXt's final LayerNorm lives in its classifier head (timm's NormMlpClassifierHead), after the pool:
    with the Average pool the features are what timm's own forward_head gives before its classifier."""
    import timm

    torch.manual_seed(0)
    model = build_model(ArchitectureConfig(backbone="convnext_atto", pretrained=False), 3).eval()
    with torch.no_grad():
        model.backbone.head.norm.weight.uniform_(0.5, 2.0)
        model.backbone.head.norm.bias.uniform_(-1.0, 1.0)
    timm_own = timm.create_model("convnext_atto", pretrained=False, in_chans=1, num_classes=0).eval()
    timm_own.load_state_dict(model.backbone.state_dict())
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected = timm_own.forward_head(timm_own.forward_features(x), pre_logits=True)
        torch.testing.assert_close(_pooled_input_of_the_head(model, x), expected)


@pytest.mark.parametrize("pool", ["Average", "Max", "GeM", "Average + Max"])
def test_every_parameter_of_a_normed_head_backbone_gets_a_gradient(pool):
    """DDP (find_unused_parameters=False) fails at its second step on a parameter the forward never uses: ConvNeXt's
    head norm, and the MLP of a head with a hidden layer, must be on the path to the logits."""
    from timm.models.convnext import ConvNeXt

    from gunsound.model import GunClassifier

    torch.manual_seed(0)
    backbones = [build_model(ArchitectureConfig(backbone="convnext_atto", pretrained=False), 3).backbone,
                 ConvNeXt(in_chans=1, num_classes=0, global_pool="", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                          head_hidden_size=20)]
    for backbone in backbones:
        model = GunClassifier(backbone, 3, pool, dropout=0.1)
        model(torch.randn(2, 1, 64, 64)).sum().backward()
        unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, unused


HUB_NAME = "hf-hub:timm/resnet18.a1_in1k"


def _no_hub(*_args, **_kwargs):
    raise AssertionError("the Hugging Face Hub was contacted")


def test_an_hf_hub_backbone_is_rebuilt_for_scoring_without_the_hub(tmp_path, monkeypatch):
    """Saving (at training, where the Hub is read) records the timm architecture the Hub's config names; a
    scorer builds it from that, offline, and gets the model of the plain timm name."""
    import json

    import timm.models._hub as hub

    config = tmp_path / "config.json"  # what the Hub serves for the name
    config.write_text(json.dumps({"architecture": "resnet18", "num_classes": 1000, "pretrained_cfg": {}}))
    asked = []
    monkeypatch.setattr(hub, "download_from_hf", lambda model_id, filename, **_: asked.append(model_id) or str(config))
    plain = _artifact()
    on_hub = replace(plain, architecture=replace(plain.architecture, backbone=HUB_NAME))
    on_hub.save(str(tmp_path / "model.pt"))
    assert asked == ["timm/resnet18.a1_in1k"]

    monkeypatch.setattr(hub, "download_from_hf", _no_hub)
    loaded = ModelArtifact.load(str(tmp_path / "model.pt"))
    assert loaded.architecture.backbone == HUB_NAME
    x = torch.randn(2, 1, 64, 100)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.build()(x), plain.build()(x))


def test_an_hf_hub_model_file_without_its_timm_architecture_is_refused_by_name_without_the_hub(tmp_path,
                                                                                               monkeypatch):
    """A file saved before the architecture was recorded: scoring would fetch the Hub's config (offline, some
    24 s of retries and an error naming neither the file nor the setting); it is refused at once."""
    import timm.models._hub as hub

    from gunsound.model_files import describe_model

    artifact = _artifact()
    artifact = replace(artifact, architecture=replace(artifact.architecture, backbone=HUB_NAME))
    torch.save({"format": 1, "classes": artifact.classes, "features": asdict(artifact.features),
                "chunk_seconds": 2.0, "architecture": asdict(artifact.architecture), "loss_function": "BCE",
                "state_dict": artifact.state_dict}, tmp_path / "model.pt")
    monkeypatch.setattr(hub, "download_from_hf", _no_hub)
    shown = f"^{tmp_path}/model.pt: architecture.backbone '{HUB_NAME}' is a Hugging Face Hub name"
    for read in (lambda: ModelArtifact.load(str(tmp_path / "model.pt")).build(),
                 lambda: describe_model([str(tmp_path / "model.pt")])):
        with pytest.raises(ValueError, match=shown) as refused:
            read()
        assert type(refused.value).__module__.startswith("gunsound.")  # bad input: `predict` exits 2
    with pytest.raises(ValueError, match=f"^model: architecture.backbone '{HUB_NAME}'"):
        artifact.build()


def test_a_model_file_changed_in_place_is_refused_naming_the_damaged_entry(tmp_path):
    """torch.load does not check the archive's CRCs: a few flipped bits in a weight gave wrong probabilities."""
    import struct
    import zipfile

    _artifact().save(str(tmp_path / "model.pt"))
    data = bytearray((tmp_path / "model.pt").read_bytes())
    entry = max(zipfile.ZipFile(tmp_path / "model.pt").infolist(), key=lambda i: i.file_size)
    name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26:entry.header_offset + 30])
    data[entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2 + 3] ^= 0x40
    (tmp_path / "model.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"^{tmp_path}/model.pt: damaged: the CRC of its entry {entry.filename} "):
        ModelArtifact.load(str(tmp_path / "model.pt"))
