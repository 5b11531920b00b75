"""Augmentation of log-mel batches on the training workers: SpecAugment masks and mixup."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch


def spec_augment(x: torch.Tensor, *, time_mask_frames: int, frequency_mask_bins: int) -> torch.Tensor:
    """Random time and frequency masks (one of each per clip, up to the given widths), filled with the clip's
    mean. Widths of 0 turn a mask off."""
    if not time_mask_frames and not frequency_mask_bins:
        return x
    b, _, mels, frames = x.shape
    fill = x.mean(dim=(-2, -1), keepdim=True)
    mask = torch.zeros_like(x, dtype=torch.bool)
    for size, length, dim in ((frequency_mask_bins, mels, 2), (time_mask_frames, frames, 3)):
        if size <= 0:
            continue
        width = torch.randint(0, size + 1, (b,), device=x.device)
        start = (torch.rand(b, device=x.device) * (length - width).clamp_min(1)).long()
        pos = torch.arange(length, device=x.device)
        hit = (pos[None] >= start[:, None]) & (pos[None] < (start + width)[:, None])
        mask |= hit.view(b, 1, length, 1) if dim == 2 else hit.view(b, 1, 1, length)
    return torch.where(mask, fill, x)


def mixup(x: torch.Tensor, y: torch.Tensor, *, iterations: int, probability: float, concentration: float,
          target: Literal["Ratio", "Max"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix clips in the power domain of the log-mel (the sound of two sources played together), `iterations`
    times, each with the given probability and a Beta(concentration, concentration) ratio; 0 iterations is off.

    Ratio targets are the weighted sum; Max targets are the elementwise maximum (both guns were heard).
    """
    for _ in range(iterations):
        if torch.rand(()) >= probability:
            continue
        lam = float(np.random.beta(concentration, concentration))
        perm = torch.randperm(x.shape[0], device=x.device)
        x = torch.logaddexp(x + math.log(max(lam, 1e-6)), x[perm] + math.log(max(1 - lam, 1e-6)))
        y = torch.maximum(y, y[perm]) if target == "Max" else lam * y + (1 - lam) * y[perm]
    return x, y
