"""The classifier (any timm backbone on one-channel log-mel images, with the seed's pooling and dropout) and
its file: a `ModelArtifact` holds the weights and the arguments that rebuild the model and its front end."""

from __future__ import annotations

import io
import logging
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from gunsound import storage
from gunsound.config import ArchitectureConfig
from gunsound.features import FeatureParams
from gunsound.model_files import (
    ARTIFACT_FORMAT,
    ModelFileError,
    check_saved_model,
    feature_values,
    hub_backbone,
)

log = logging.getLogger(__name__)


class GeM(nn.Module):
    """Generalised mean pooling (learned exponent)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class Pool(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.gem = GeM() if kind == "GeM" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C or 2C)
        if self.kind == "Average":
            return x.mean(dim=(-2, -1))
        if self.kind == "Max":
            return x.amax(dim=(-2, -1))
        if self.kind == "Average + Max":
            return torch.cat([x.mean(dim=(-2, -1)), x.amax(dim=(-2, -1))], dim=1)
        return self.gem(x)


def _normed_head(backbone: nn.Module) -> nn.Module | None:
    """The backbone's head when it holds layers of the network proper, timm's NormMlpClassifierHead: ConvNeXt's
    final LayerNorm (and, in some variants, an MLP) sits there, after timm's pool and before the classifier."""
    from timm.layers import NormMlpClassifierHead

    head = getattr(backbone, "head", None)
    return head if isinstance(head, NormMlpClassifierHead) else None


class GunClassifier(nn.Module):
    """log-mel (B, 1, mels, frames) -> logits (B, classes).

    The feature map is pooled by `pool`; a backbone whose head is a NormMlpClassifierHead then has each pooled
    vector go through that head's norm and pre-logits layers, as timm's own forward_head does after its pool,
    so that its pretrained final norm is used and every parameter gets a gradient (DDP requires it)."""

    def __init__(self, backbone: nn.Module, num_classes: int, pool: str, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.pool = Pool(pool)
        normed = _normed_head(backbone)
        self.normed_head = normed is not None  # a flag, not the module: its weights stay under `backbone.head`
        per_pool = normed.num_features if normed is not None else backbone.num_features
        width = per_pool * (2 if pool == "Average + Max" else 1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map (B, C, H, W) -> the vector the classifier reads (B, width)."""
        pooled = self.pool(features)
        if not self.normed_head:
            return pooled
        # "Average + Max" gives two vectors of the backbone's width side by side: each is normed on its own.
        return torch.cat([self._through_head(self.backbone.head, part)
                          for part in pooled.split(self.backbone.num_features, dim=1)], dim=1)

    @staticmethod
    def _through_head(head: nn.Module, vector: torch.Tensor) -> torch.Tensor:
        """One pooled vector (B, C) through a NormMlpClassifierHead's norm and pre-logits: the head of a
        backbone built without a pool takes (B, C, 1, 1) maps and has 1x1 convolutions for its MLP."""
        x = head.norm(vector[:, :, None, None])
        x = head.pre_logits(x if head.use_conv else x.flatten(1))
        return x.flatten(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map -> logits: everything after `backbone.forward_features`."""
        return self.head(self.dropout(self.pooled(features)))

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self.classify(self.backbone.forward_features(spec))


def read_backbone_weights(uri: str) -> dict[str, torch.Tensor]:
    """The backbone weights in a local or s3:// file: a timm state dict (torch.save or .safetensors), a
    checkpoint holding one under "state_dict" or "model", or the backbone of a gunsound classifier's weights
    (model.pt, a fold's best_state.pt, a Ray Train state.pt: `_backbone_of_classifier`). Read through
    storage and loaded without running code (safetensors, or torch.load with weights_only=True)."""
    key = "architecture.pretrained_weights"
    if not storage.exists(uri):
        raise FileNotFoundError(f"{key} {uri} not found")
    try:
        if uri.endswith(".safetensors"):
            from safetensors.torch import load

            saved = load(storage.read_bytes(uri))
        else:
            saved = storage.read_torch(uri)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{key} {uri}: not a file of tensors only (refused: loading it could run code)") from exc
    except Exception as exc:  # truncation, foreign formats: all mean "not a weights file"; unless a read failed
        raise storage.refusal(f"{key} {uri}", exc, "not a weights file") from exc
    state = saved
    if isinstance(saved, dict):
        state = next((saved[k] for k in ("state_dict", "model") if isinstance(saved.get(k), dict)), saved)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{key} {uri}: holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return _backbone_of_classifier(state) or state


def _backbone_of_classifier(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The backbone's tensors, when `state` is a whole GunClassifier's (its backbone under `backbone.`, then
    the linear `head` and the GeM exponent): what model.pt holds under "state_dict", a fold's best_state.pt
    holds as it is, and a Ray Train state.pt holds under "model"; else None."""
    own = {"head.weight", "head.bias", "pool.gem.p"}
    if "head.weight" not in state or not all(k.startswith("backbone.") or k in own for k in state):
        return None
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return backbone or None


def _create_backbone(name: str, pretrained: bool, **kwargs) -> nn.Module:
    import timm  # here: timm (and the torchvision it imports) takes seconds, and reading a model file needs neither

    try:
        return timm.create_model(name, pretrained=pretrained, in_chans=1, num_classes=0, global_pool="", **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"architecture.backbone: unknown timm model {name!r}") from exc
        raise


def _first_convs(backbone: nn.Module) -> tuple[str, ...]:
    """The stem convolutions whose RGB weights timm's loader folds into the one input channel."""
    from timm.models import get_model_traits

    convs = get_model_traits(backbone).get("first_conv", backbone.pretrained_cfg.get("first_conv"))
    return (convs,) if isinstance(convs, str) else tuple(convs or ())


def check_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], name: str, uri: str) -> None:
    """Refuse weights that are not the backbone's: timm loads non-strictly once it has dropped the classifier,
    so a file of another model would leave tensors at their random initialisation (a name missing), or be
    taken in part (resnet34's file holds every resnet18 name with resnet18's shapes), with only a log line;
    and torch's refusal of other shapes names neither the setting nor the file. What timm's loader adapts is
    allowed: the ImageNet classifier (a fresh head replaces it) and the stem's input channels."""
    cfg = backbone.pretrained_cfg
    # The classifier's module, and where it is one layer of a head module (LeViT's head.linear beside head.bn),
    # that whole head: a backbone without classes has none of it, and a fresh head replaces it.
    classifiers = cfg.get("classifier")
    heads = tuple(c.rsplit(".", 1)[0] if "." in c else c
                  for c in ((classifiers,) if isinstance(classifiers, str) else classifiers or ()))
    source_channels = (cfg.get("input_size") or (3,))[0]
    stems = {f"{conv}.weight" for conv in _first_convs(backbone)}
    own = backbone.state_dict()
    # BatchNorm's step counter is left out of many published checkpoints, and a missing one stays at 0 harmlessly
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not any(k.startswith(h + ".") for h in heads)]
    reshaped = []
    for k, tensor in state.items():
        if k not in own or tensor.shape == own[k].shape:
            continue
        want = own[k].shape
        folds = (k in stems and tensor.ndim == 4 and tensor.shape[:1] + tensor.shape[2:] == want[:1] + want[2:]
                 and tensor.shape[1] == source_channels * want[1])
        if not folds:
            reshaped.append(f"{k} {tuple(tensor.shape)} in the file, {tuple(want)} in {name}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} of its {len(own)} tensors missing, first {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} of the file's {len(state)} tensors not in it, first {unexpected[0]}")
    if reshaped:
        problems.append(f"{len(reshaped)} tensors of another shape, first {reshaped[0]}")
    if problems:
        raise ValueError(f"architecture.pretrained_weights {uri}: not weights of {name} ({'; '.join(problems)})")


def build_backbone(arch: ArchitectureConfig, pretrained: bool | None = None) -> nn.Module:
    """The timm backbone (one input channel, no classifier). Pretrained weights come from the timm model hub,
    or from `architecture.pretrained_weights`, checked against the backbone (`check_backbone_weights`) before
    timm's own loader folds an RGB stem into one channel and drops the ImageNet classifier."""
    pretrained = arch.pretrained if pretrained is None else pretrained
    if not (pretrained and arch.pretrained_weights):
        if pretrained:
            log.info("backbone %s: weights from the timm model hub", arch.backbone)
        return _create_backbone(arch.backbone, pretrained)
    from timm.models import load_pretrained

    uri = arch.pretrained_weights
    state = read_backbone_weights(uri)
    backbone = _create_backbone(arch.backbone, False)
    check_backbone_weights(backbone, state, arch.backbone, uri)
    # The file's tensors only: an hf-hub: backbone's config names the hub as its source, which timm prefers.
    cfg = {k: v for k, v in backbone.pretrained_cfg.items() if k != "source"}
    try:
        load_pretrained(backbone, {**cfg, "state_dict": state}, num_classes=0, in_chans=1)
    except RuntimeError as exc:  # what the check above does not foresee: a stem timm cannot fold, say
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"architecture.pretrained_weights {uri}: cannot be loaded into {arch.backbone} "
                         f"({type(exc).__name__}: {first})") from exc
    log.info("backbone %s: weights from %s", arch.backbone, uri)
    return backbone


def build_model(arch: ArchitectureConfig, num_classes: int, pretrained: bool | None = None) -> GunClassifier:
    """Create the classifier (see `build_backbone` for where pretrained weights come from)."""
    return GunClassifier(build_backbone(arch, pretrained), num_classes, arch.pool, arch.dropout)



# Arguments gunsound gives every backbone itself; a Hub config's own values for them are not used.
_OWN_BACKBONE_ARGS = ("pretrained", "in_chans", "num_classes", "global_pool")


def resolve_backbone(backbone: str) -> dict[str, Any] | None:
    """The plain timm architecture and arguments that a backbone name with a source (hf-hub:, local-dir:) stands
    for, read as timm reads them (the Hub's config.json, or the folder's): recorded in model.pt when it is saved,
    so that scoring builds the backbone without the Hub. None for a plain timm name."""
    if ":" not in backbone:  # no source prefix; timm not imported for it
        return None
    from timm.models import parse_model_name
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

    source, model_id = parse_model_name(backbone)
    if source is None:
        return None
    load = load_model_config_from_hf if source == "hf-hub" else load_model_config_from_path
    _, architecture, model_args = load(model_id)
    return {"architecture": str(architecture), "model_args": dict(model_args or {})}


@dataclass
class ModelArtifact:
    """One trained fold as `model.pt`: the weights, the classes they score, and everything that rebuilds the
    model and its front end. Written by training; read by scoring, export and the report.

    The file holds only tensors and plain values, so it loads with `torch.load(weights_only=True)`: a planted
    file cannot run code. Reading it never contacts the network: a backbone named by its Hugging Face Hub
    name is rebuilt from the timm architecture recorded beside it (`backbone_timm`)."""

    classes: list[str]
    features: FeatureParams
    chunk_seconds: float  # the training clip length: the window the model learned to see
    architecture: ArchitectureConfig
    loss_function: str
    state_dict: dict[str, torch.Tensor]
    fold: int | None = None
    best_epoch: int | None = None
    # What an hf-hub: or local-dir: backbone resolves to ({"architecture", "model_args"}); found when saved.
    backbone_timm: dict[str, Any] | None = None
    source: str | None = field(default=None, compare=False, repr=False)  # the file it was loaded from

    def build(self) -> GunClassifier:
        """The classifier with these weights, in eval mode, built offline (no pretrained download, no Hub
        config). Weights that do not fit the model its fields describe are refused naming the file."""
        where = self.source or "model"
        try:
            backbone = self._backbone()
        except ValueError as exc:
            raise ModelFileError(f"{where}: {exc}") from exc
        arch = self.architecture
        model = GunClassifier(backbone, len(self.classes), arch.pool, arch.dropout)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:4] if line.strip())
            raise ModelFileError(f"{where}: its weights do not fit the model it describes (backbone "
                                 f"{arch.backbone!r}, pool {arch.pool!r}, {len(self.classes)} classes): "
                                 f"{detail or exc}") from exc
        return model.eval()

    def _backbone(self) -> nn.Module:
        """The backbone without weights, from its plain timm name: the recorded one of a Hub name."""
        name = self.architecture.backbone
        if self.backbone_timm is not None:
            args = {k: v for k, v in (self.backbone_timm.get("model_args") or {}).items()
                    if k not in _OWN_BACKBONE_ARGS}
            return _create_backbone(self.backbone_timm["architecture"], False, **args)
        if hub_backbone(name):
            raise ModelFileError(f"architecture.backbone {name!r} is a Hugging Face Hub name and the timm "
                                 "architecture it resolves to is not recorded; scoring does not contact the Hub")
        return _create_backbone(name, False)

    def _resolved_backbone(self) -> dict[str, Any] | None:
        """`backbone_timm`, or, where the backbone has a source and it is not known yet, read from that source
        (training's time to read the Hub). If it cannot be read the file is saved without it, and scoring will
        refuse it by name."""
        if self.backbone_timm is not None:
            return self.backbone_timm
        try:
            return resolve_backbone(self.architecture.backbone)
        except Exception as exc:  # noqa: BLE001 - the weights are still worth saving
            log.warning("architecture.backbone %s: cannot read the timm architecture it stands for (%s: %s); "
                        "the model file will not be scorable", self.architecture.backbone, type(exc).__name__, exc)
            return None

    def to_bytes(self) -> bytes:
        saved = {"format": ARTIFACT_FORMAT, "classes": list(self.classes), "features": asdict(self.features),
                 "chunk_seconds": float(self.chunk_seconds), "architecture": asdict(self.architecture),
                 "loss_function": self.loss_function, "state_dict": self.state_dict,
                 "fold": self.fold, "best_epoch": self.best_epoch}
        resolved = self._resolved_backbone()
        if resolved is not None:  # a plain timm name's file stays as it was
            saved["backbone_timm"] = resolved
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        return buffer.getvalue()

    def save(self, uri: str) -> None:
        storage.write_bytes(uri, self.to_bytes())

    @classmethod
    def load(cls, uri: str) -> ModelArtifact:
        """The model file at `uri`, checked as the scoring driver checks it (`model_files.describe_model`), and
        its archive's CRCs before its tensors are read: torch.load does not check them, so a file changed in
        place would give wrong probabilities without an error."""
        try:
            data = storage.read_bytes(uri)
            damaged = zipfile.ZipFile(io.BytesIO(data)).testzip()
        except Exception as exc:  # not a zip, truncation: not our model file; unless a read failed
            raise storage.refusal(uri, exc, "not a gunsound model file") from exc
        if damaged is not None:
            raise ModelFileError(f"{uri}: damaged: the CRC of its entry {damaged} does not match its data (the "
                                 "file was changed after it was written)")
        try:
            saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle refusals, versions: not our model file
            raise storage.refusal(uri, exc, "not a gunsound model file") from exc
        if not isinstance(saved, dict) or saved.get("format") != ARTIFACT_FORMAT:
            raise ModelFileError(f"{uri}: not a gunsound model file of format {ARTIFACT_FORMAT}")
        try:
            check_saved_model(uri, saved)
            features = FeatureParams(**feature_values(uri, saved["features"]))
            return cls(classes=list(saved["classes"]), features=features,
                       chunk_seconds=float(saved["chunk_seconds"]),
                       architecture=ArchitectureConfig(**saved["architecture"]),
                       loss_function=saved["loss_function"], state_dict=saved["state_dict"],
                       fold=saved.get("fold"), best_epoch=saved.get("best_epoch"),
                       backbone_timm=saved.get("backbone_timm"), source=uri)
        except ModelFileError:
            raise
        except (KeyError, TypeError, AttributeError) as exc:
            raise ModelFileError(f"{uri}: model file lacks or misnames a field ({exc})") from exc
