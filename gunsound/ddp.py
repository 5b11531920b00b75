"""The workers of one fold, checked after every epoch: where each runs (`resources.placement`), that every rank holds the same weights
(DDP keeps them in step; a rank that drifted would train a different model than the one rank 0 saves), and
that their training shards did not overlap.

Works on one worker (no process group: nothing to compare) and on several (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist


class RanksDiverged(RuntimeError):
    """The ranks of a fold hold different weights: DDP is not keeping them in step."""


def weight_signature(model: torch.nn.Module) -> torch.Tensor:
    """Per parameter tensor, its sum and its sum of squares in float64: equal weights give equal signatures,
    and a drift in any tensor shows in its own entries."""
    values = [torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
              for p in model.parameters()]
    return torch.cat(values)


def _gathered(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def check_ranks(model: torch.nn.Module, rows_trained: np.ndarray, where: dict[str, Any]) -> dict[str, Any]:
    """Every rank calls this after an epoch; returns, for the epoch's metrics, the workers' placements and what
    they trained on. Raises RanksDiverged when the ranks' weights differ."""
    signatures = _gathered(weight_signature(model).cpu().numpy())
    rows = _gathered(np.unique(rows_trained))
    places = _gathered(where)
    in_sync = all(np.array_equal(signatures[0], s) for s in signatures[1:])
    if not in_sync:
        drifted = [r for r, s in enumerate(signatures) if not np.array_equal(signatures[0], s)]
        raise RanksDiverged(f"after this epoch, rank(s) {drifted} hold other weights than rank 0")
    seen = np.concatenate(rows) if rows else np.zeros(0)
    return {"workers": [{"rank": r, **p} for r, p in enumerate(places)], "ranks": len(places),
            "ranks_in_sync": in_sync, "rows_trained_by_all_ranks": int(len(seen)),
            "rows_trained_on_several_ranks": int(len(seen) - len(np.unique(seen)))}
