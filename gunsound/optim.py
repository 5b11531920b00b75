"""The optimizer (with a differential learning rate for listed layers) and the per-step learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch


def make_optimizer(model: torch.nn.Module, *, kind: Literal["AdamW", "Adam", "SGD"], learning_rate: float,
                   weight_decay: float = 0.0, differential_layers: Sequence[str] = (),
                   differential_learning_rate: float = 0.001) -> torch.optim.Optimizer:
    """Parameters whose names start with one of `differential_layers` get `differential_learning_rate`, the rest
    `learning_rate`. An entry that names no parameter is refused: a typo would otherwise train every layer at
    `learning_rate` without a word."""
    named = list(model.named_parameters())
    unmatched = [layer for layer in differential_layers if not any(name.startswith(layer) for name, _ in named)]
    if unmatched:
        prefixes = sorted({name.split(".")[0] for name, _ in named})
        raise ValueError(f"training.differential_learning_rate_layers: {unmatched} match no parameter of the "
                         f"model; its parameter names start with {prefixes}")
    special, base = [], []
    for name, p in named:
        (special if any(name.startswith(layer) for layer in differential_layers) else base).append(p)
    groups = [{"params": base, "lr": learning_rate}]
    if special:
        groups.append({"params": special, "lr": differential_learning_rate})
    if kind == "SGD":
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    cls = torch.optim.AdamW if kind == "AdamW" else torch.optim.Adam
    return cls(groups, weight_decay=weight_decay)


def lr_lambda(*, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0,
              schedule: Literal["Cosine", "Linear", "Constant"] = "Cosine") -> Callable[[int], float]:
    """Linear warmup over warmup_epochs, then cosine (or linear, or constant) decay, per optimizer step: the
    factor `torch.optim.lr_scheduler.LambdaLR` applies to each group's rate."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "Cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "Linear":
            return 1 - progress
        return 1.0

    return factor
