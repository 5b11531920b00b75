"""The classifier (any timm backbone on one-channel log-mel images, with the seed's pooling and dropout) and
its file: a `ModelArtifact` holds the weights and the arguments that rebuild the model and its front end."""

from __future__ import annotations

import contextlib
import io
import logging
import posixpath
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from gunsound import storage
from gunsound.config import ArchitectureConfig
from gunsound.features import FeatureParams

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


class GunClassifier(nn.Module):
    """log-mel (B, 1, mels, frames) -> logits (B, classes)."""

    def __init__(self, backbone: nn.Module, num_classes: int, pool: str, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.pool = Pool(pool)
        width = backbone.num_features * (2 if pool == "Average + Max" else 1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pool(self.backbone.forward_features(spec))))


def _local_weights(uri: str, scratch: contextlib.ExitStack) -> str:
    """A local file of the weights; a remote one is downloaded to a temporary folder that `scratch` removes
    (every Train worker and tuning trial builds a model: the copies must not pile up)."""
    if not storage.is_local(uri):
        folder = scratch.enter_context(tempfile.TemporaryDirectory(prefix="gunsound-weights-"))
        return str(storage.copy_to_local(uri, Path(folder) / posixpath.basename(uri)))
    if not Path(uri).exists():
        raise FileNotFoundError(f"architecture.pretrained_weights {uri} not found")
    return uri


def build_model(arch: ArchitectureConfig, num_classes: int, pretrained: bool | None = None) -> GunClassifier:
    """Create the classifier. Pretrained weights come from the timm model hub, or from
    `architecture.pretrained_weights` (a local or s3:// file of the backbone's ImageNet state dict); timm
    folds the RGB stem into one channel and drops the ImageNet classifier either way.
    """
    pretrained = arch.pretrained if pretrained is None else pretrained
    kwargs: dict = {"in_chans": 1, "num_classes": 0, "global_pool": ""}
    with contextlib.ExitStack() as scratch:
        if pretrained and arch.pretrained_weights:
            kwargs["pretrained_cfg_overlay"] = {"file": _local_weights(arch.pretrained_weights, scratch)}
            log.info("backbone %s: weights from %s", arch.backbone, arch.pretrained_weights)
        elif pretrained:
            log.info("backbone %s: weights from the timm model hub", arch.backbone)
        try:
            backbone = timm.create_model(arch.backbone, pretrained=pretrained, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise ValueError(f"architecture.backbone: unknown timm model {arch.backbone!r}") from exc
            raise
    return GunClassifier(backbone, num_classes, arch.pool, arch.dropout)


ARTIFACT_FORMAT = 1


@dataclass
class ModelArtifact:
    """One trained fold as `model.pt`: the weights, the classes they score, and everything that rebuilds the
    model and its front end. Written by training; read by scoring, export and the report.

    The file holds only tensors and plain values, so it loads with `torch.load(weights_only=True)`: a planted
    file cannot run code."""

    classes: list[str]
    features: FeatureParams
    chunk_seconds: float  # the training clip length: the window the model learned to see
    architecture: ArchitectureConfig
    loss_function: str
    state_dict: dict[str, torch.Tensor]
    fold: int | None = None
    best_epoch: int | None = None

    def build(self) -> GunClassifier:
        """The classifier with these weights, in eval mode (no pretrained download)."""
        model = build_model(self.architecture, len(self.classes), pretrained=False)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"format": ARTIFACT_FORMAT, "classes": list(self.classes), "features": asdict(self.features),
                    "chunk_seconds": float(self.chunk_seconds), "architecture": asdict(self.architecture),
                    "loss_function": self.loss_function, "state_dict": self.state_dict,
                    "fold": self.fold, "best_epoch": self.best_epoch}, buffer)
        return buffer.getvalue()

    def save(self, uri: str) -> None:
        storage.write_bytes(uri, self.to_bytes())

    @classmethod
    def load(cls, uri: str) -> ModelArtifact:
        try:
            saved = storage.read_torch(uri)
        except Exception as exc:  # pickle refusals, truncation and version errors all mean: not our model file
            raise ValueError(f"{uri}: not a gunsound model file ({type(exc).__name__}: {exc})") from exc
        if not isinstance(saved, dict) or saved.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"{uri}: not a gunsound model file of format {ARTIFACT_FORMAT}")
        try:
            return cls(classes=list(saved["classes"]), features=FeatureParams(**saved["features"]),
                       chunk_seconds=float(saved["chunk_seconds"]),
                       architecture=ArchitectureConfig(**saved["architecture"]),
                       loss_function=saved["loss_function"], state_dict=saved["state_dict"],
                       fold=saved.get("fold"), best_epoch=saved.get("best_epoch"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{uri}: model file lacks or misnames a field ({exc})") from exc
