"""The classifier: any timm backbone on one-channel log-mel images, with the seed's pooling and dropout."""

from __future__ import annotations

import contextlib
import logging
import posixpath
import tempfile
from pathlib import Path

import timm
import torch
from torch import nn

from gunsound import storage
from gunsound.config import ArchitectureConfig

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
