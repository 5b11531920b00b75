"""What a Train worker trains and validates on: its dataset shard, held in memory when it fits or streamed."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ray.data import DataIterator

    from gunsound.train_loop import LoopSettings

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


def load_shard(shard: DataIterator, columns: list[str]) -> dict[str, np.ndarray]:
    """A worker's whole dataset shard as NumPy arrays (one pass over its blocks)."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        for c in columns:
            parts[c].append(np.asarray(batch[c]))
    if not parts[columns[0]]:
        raise RuntimeError("this worker's dataset shard is empty")
    return {c: np.concatenate(v) for c, v in parts.items()}


def shuffled_batches(arrays: dict[str, np.ndarray], batch_size: int, drop_last: bool, seed: int) -> Iterator[Batch]:
    """Batches of in-memory arrays in a fresh random order (a full shuffle, unlike a streaming buffer)."""
    n = len(next(iter(arrays.values())))
    order = np.random.default_rng(seed).permutation(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = np.sort(order[i:i + batch_size])  # sorted indices gather faster; the batch's order does not matter
        yield {c: torch.from_numpy(a[idx]) for c, a in arrays.items()}


class WorkerData:
    """This worker's training shard and, on rank 0, the validation set. A shard that fits (`cache_shards`) is
    read once and reshuffled in memory each epoch: streaming it again costs a Ray Data execution per epoch,
    which dominates short epochs."""

    def __init__(self, s: LoopSettings, rank: int, device: torch.device) -> None:
        import ray.train

        self.s, self.device = s, device
        self.train_shard = ray.train.get_dataset_shard("train")
        self.valid_shard = ray.train.get_dataset_shard("valid")
        self.load_seconds: float | None = None
        if s.cache_shards:
            loading = time.perf_counter()
            self.train_arrays = load_shard(self.train_shard, ["row", "features", "target"])
            self.valid_arrays = load_shard(self.valid_shard, ["row", "features", "target"]) if rank == 0 else None
            self.load_seconds = time.perf_counter() - loading
            log.info("worker %d holds its shard in memory: %d training clips, read in %.1f s",
                     rank, len(self.train_arrays["target"]), self.load_seconds)

    def train_batches(self, seed: int) -> Iterable[Batch]:
        """An epoch's batches. A streamed shard arrives in blocks of consecutive featurized rows, in an order
        drawn anew every epoch (`training.fold_datasets`); the local buffer mixes rows across many blocks, so a
        batch is not a block's few clips."""
        s = self.s
        if s.cache_shards:
            return shuffled_batches(self.train_arrays, s.batch_size, s.drop_last_batch, seed)
        return self.train_shard.iter_torch_batches(batch_size=s.batch_size, drop_last=s.drop_last_batch,
                                                   device=self.device,
                                                   local_shuffle_buffer_size=max(s.shuffle_buffer_clips,
                                                                                 4 * s.batch_size),
                                                   local_shuffle_seed=seed)

    def valid_batches(self) -> Iterable[Batch]:
        if self.s.cache_shards:
            return shuffled_batches(self.valid_arrays, 64, False, 0)
        return self.valid_shard.iter_torch_batches(batch_size=64, device=self.device)
