"""DDP: each fold on two Ray Train workers (gloo on CPU) stays in step, each rank trains on its own shard, and
the validation set is scored once, whole; and the check that would catch ranks drifting apart does catch it."""

import json
import os
import socket

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gunsound.ddp import RanksDiverged, check_ranks


@pytest.mark.ray
def test_each_fold_on_two_workers_keeps_ranks_in_step_on_disjoint_shards(trained_run):
    # The session's shared run (tests/conftest.py): `main(train_args(synth_dir, out, *TRAINED_RUN_EXTRA))`, two
    # folds of FAST (2 epochs: the ranks stay in step past the first), each on two one-CPU workers.
    manifest = pd.read_parquet(trained_run / "manifest.parquet")
    for fold in (0, 1):
        epochs = json.loads((trained_run / f"fold_{fold}" / "metrics.json").read_text())
        train_rows, valid_rows = (manifest["fold"] != fold).sum(), (manifest["fold"] == fold).sum()
        assert [e["epoch"] for e in epochs] == [1, 2]
        for e in epochs:
            assert e["ranks"] == 2 and e["ranks_in_sync"] is True
            assert [w["rank"] for w in e["workers"]] == [0, 1] and all(w["device"] == "cpu" for w in e["workers"])
            assert all(w["threads"] == 1 for w in e["workers"])  # one CPU each: one thread, not the machine's
            assert e["rows_trained_on_several_ranks"] == 0  # each rank its own shard
            # Both shards together cover the training rows but for what the last partial batch of each drops.
            assert train_rows - 2 * 16 < e["rows_trained_by_all_ranks"] <= train_rows
            assert e["train_clips"] == e["rows_trained_by_all_ranks"] // 2  # rank 0's share: one half
        valid = pd.read_parquet(trained_run / f"fold_{fold}" / "valid_predictions.parquet")
        assert len(valid) == valid_rows and valid["row"].is_unique  # scored once, whole


def _rank(rank: int, port: int, results) -> None:
    """Both checks in one process group: the ranks in step, then rank 1's bias moved by 1e-6."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    try:
        for drift in (False, True):
            if drift and rank == 1:
                with torch.no_grad():
                    model.bias[0] += 1e-6
            try:
                report = check_ranks(model, np.arange(rank * 10, rank * 10 + 10), {"node": "here", "device": "cpu"})
                results[(drift, rank)] = ("ok", report["ranks"], report["rows_trained_on_several_ranks"])
            except RanksDiverged as exc:
                results[(drift, rank)] = ("diverged", str(exc))
    finally:
        dist.destroy_process_group()


def test_ranks_that_drift_apart_are_caught():
    # One pair of processes for both cases: each start imports torch, the most of this test's time.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(port, results), nprocs=2, join=True)
    assert results[(False, 0)] == results[(False, 1)] == ("ok", 2, 0)
    assert results[(True, 0)][0] == results[(True, 1)][0] == "diverged" and "rank(s) [1]" in results[(True, 0)][1]
