"""Augmentation of log-mel batches on the training workers: mixup and colouring on natural-log power, then
(after normalisation) SpecAugment masks."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from gunsound.features import LOG_FLOOR

# Bins at most this far above the log floor are digital silence or zero padding (natural log; 0.004 dB).
SILENCE_MARGIN = 1e-3


def spec_augment(x: torch.Tensor, *, time_mask_frames: int, frequency_mask_bins: int) -> torch.Tensor:
    """Random time and frequency masks (one of each per clip, up to the given widths), filled with the clip's
    mean. Widths of 0 turn a mask off. A mask is at most its axis less one wide, so that it never hides a whole
    clip, and its start is drawn over every position that fits it, so that it reaches both ends of the axis."""
    if not time_mask_frames and not frequency_mask_bins:
        return x
    b, _, mels, frames = x.shape
    fill = x.mean(dim=(-2, -1), keepdim=True)
    mask = torch.zeros_like(x, dtype=torch.bool)
    for size, length, dim in ((frequency_mask_bins, mels, 2), (time_mask_frames, frames, 3)):
        if size <= 0:
            continue
        widest = min(size, length - 1)
        width = torch.randint(0, widest + 1, (b,), device=x.device)
        starts = length - width + 1  # how many positions a mask of this width can take
        start = (torch.rand(b, device=x.device) * starts).long().minimum(starts - 1)
        pos = torch.arange(length, device=x.device)
        hit = (pos[None] >= start[:, None]) & (pos[None] < (start + width)[:, None])
        mask |= hit.view(b, 1, length, 1) if dim == 2 else hit.view(b, 1, 1, length)
    return torch.where(mask, fill, x)


def mixup(x: torch.Tensor, y: torch.Tensor, *, iterations: int, probability: float, concentration: float,
          target: Literal["Ratio", "Max"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix clips as two sources played together, `iterations` times, each with the given probability and a
    Beta(concentration, concentration) ratio; 0 iterations is off. `x` holds natural-log mel power (the
    features before normalisation), so a pair mixes in power; the second clip is first brought to the first
    one's peak level, so that the ratio, and not how loud each was recorded, decides how much of each is heard,
    as its share of the target says.

    Ratio targets are the weighted sum; Max targets are the elementwise maximum (both guns were heard).
    """
    for _ in range(iterations):
        if torch.rand(()) >= probability:
            continue
        lam = float(np.random.beta(concentration, concentration))
        perm = torch.randperm(x.shape[0], device=x.device)
        peak = x.amax(dim=(-2, -1), keepdim=True)
        other = x[perm] - peak[perm] + peak
        x = torch.logaddexp(x + math.log(max(lam, 1e-6)), other + math.log(max(1 - lam, 1e-6)))
        y = torch.maximum(y, y[perm]) if target == "Max" else lam * y + (1 - lam) * y[perm]
    return x, y


COLOURING_SHAPES = 3  # cosines over the mel bands: a tilt, a bump, and one more bend


def colour(x: torch.Tensor, *, max_db: float) -> torch.Tensor:
    """A random smooth equaliser per clip of natural-log mel power (batch, 1, mels, frames): a sum of the
    first cosines over the mel bands (the higher ones weaker), scaled so that its largest gain or cut is drawn
    from 0 to `max_db` dB. A recorder, a room and the distance colour a shot's sound this way; a model should
    not tell guns apart by it. 0 turns it off.

    Bins at the log floor (digital silence, zero padding) keep their value: validation and scoring see them
    flat, and a silent clip, standardised, would turn the curve into a pattern of unit variance."""
    if max_db <= 0:
        return x
    b, _, mels, _ = x.shape
    order = torch.arange(1, COLOURING_SHAPES + 1, device=x.device, dtype=x.dtype)
    shapes = torch.cos(math.pi * order[:, None] * torch.linspace(0, 1, mels, device=x.device, dtype=x.dtype))
    curve = ((torch.rand(b, COLOURING_SHAPES, device=x.device, dtype=x.dtype) * 2 - 1) / order) @ shapes
    curve = curve / curve.abs().amax(dim=1, keepdim=True).clamp_min(1e-6)
    gain_db = curve * torch.rand(b, 1, device=x.device, dtype=x.dtype) * max_db
    sound = x > math.log(LOG_FLOOR) + SILENCE_MARGIN
    return torch.where(sound, x + (gain_db * math.log(10) / 10).view(b, 1, mels, 1), x)
