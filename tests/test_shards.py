"""Shard commits: a shard is written once all of its windows are in, in any order, each window once."""

import numpy as np
import pandas as pd
import pytest

from gunsound.shards import Resume, ShardCommitter, resume
from gunsound.windows import plan_chunks


def _chunks(path: str, duration: float, window: float, read: float) -> list[dict]:
    return plan_chunks(path, duration, window_seconds=window, hop_seconds=window, read_seconds=read)


def _scored_windows(path: str, chunk: dict, indices: list[int]) -> pd.DataFrame:
    starts = np.asarray(chunk["starts"])[[i - chunk["first_window"] for i in indices]]
    return pd.DataFrame({"path": path, "index": indices, "start": starts, "end": starts + 2.0, "error": "",
                         "onsets": [np.array([float(t) + 0.5]) for t in starts],
                         "probs": [np.array([0.9, 0.1]) for _ in indices]})


def _committer(out: str, files: list[str], headers: dict, chunks: list[dict], shard_files: int) -> ShardCommitter:
    return ShardCommitter(out, "r1", files, headers, chunks, ["x", "y"], shard_files=shard_files,
                          window_seconds=2.0, method="Fix", threshold=0.5)


def test_shards_commit_when_complete_in_any_order_and_count_each_window_once(tmp_path):
    files = ["a.wav", "b.wav", "c.wav", "bad.wav"]
    headers = {"a.wav": (10.0, ""), "b.wav": (2.0, ""), "c.wav": (6.0, ""), "bad.wav": (float("nan"), "unreadable")}
    chunks = {f: _chunks(f, headers[f][0], 2.0, 4.0) for f in files[:3]}
    committer = _committer(str(tmp_path / "out"), files, headers, [c for f in files[:3] for c in chunks[f]], 2)

    def committed_files() -> list[str]:
        return sorted(pd.read_parquet(tmp_path / "out" / "files")["file"]) if (tmp_path / "out" / "files").exists() \
            else []

    # Shard 1 (c.wav, bad.wav) completes first; shard 0 (a.wav, b.wav) waits for a.wav's last window.
    committer.add(pd.concat([_scored_windows("a.wav", chunks["a.wav"][0], [0, 1]),
                             _scored_windows("c.wav", chunks["c.wav"][0], [0, 1])]))
    assert committed_files() == []
    committer.add(_scored_windows("c.wav", chunks["c.wav"][1], [2]))
    assert committed_files() == ["bad.wav", "c.wav"]
    committer.add(_scored_windows("a.wav", chunks["a.wav"][0], [1]))  # delivered again: counts once
    committer.add(_scored_windows("b.wav", chunks["b.wav"][0], [0]))
    committer.add(_scored_windows("a.wav", chunks["a.wav"][1], [2, 3]))
    assert committed_files() == ["bad.wav", "c.wav"]  # a.wav's window 4 is still out
    committer.add(pd.concat([_scored_windows("a.wav", chunks["a.wav"][2], [4]),
                             _scored_windows("c.wav", chunks["c.wav"][1], [2])]))  # late repeat: ignored
    committer.finish()
    assert committed_files() == sorted(files)
    windows = pd.read_parquet(tmp_path / "out" / "windows")
    assert windows.groupby("file").size().to_dict() == {"a.wav": 5, "b.wav": 1, "c.wav": 3}
    assert not windows.duplicated(["file", "start"]).any()
    files_table = pd.read_parquet(tmp_path / "out" / "files").set_index("file")
    assert files_table.loc["a.wav", "shots"] == 5 and files_table.loc["bad.wav", "status"] == "error"
    events = pd.read_parquet(tmp_path / "out" / "events")
    assert sorted(events.loc[events["file"] == "a.wav", "time"]) == [0.5, 2.5, 4.5, 6.5, 8.5]


def test_a_shard_missing_a_window_is_never_committed(tmp_path):
    headers = {"a.wav": (4.0, ""), "b.wav": (2.0, "")}
    chunks = [c for f in headers for c in _chunks(f, headers[f][0], 2.0, 60.0)]
    committer = _committer(str(tmp_path), list(headers), headers, chunks, 1)
    committer.add(_scored_windows("a.wav", chunks[0], [0]))
    committer.add(_scored_windows("b.wav", chunks[1], [0]))
    with pytest.raises(RuntimeError, match=r"shard\(s\) \[0\] missing 1 window"):
        committer.finish()
    assert list(pd.read_parquet(tmp_path / "files")["file"]) == ["b.wav"]


def test_a_rerun_takes_the_error_rows_of_its_input_out_to_score_them_again(tmp_path):
    out = str(tmp_path)
    headers = {"a.wav": (2.0, ""), "bad.wav": (float("nan"), "unreadable: not audio"),
               "other.wav": (float("nan"), "unreadable: not audio")}
    chunks = _chunks("a.wav", 2.0, 2.0, 60.0)
    committer = _committer(out, list(headers), headers, chunks, 2)
    committer.add(_scored_windows("a.wav", chunks[0], [0]))
    committer.finish()
    before = pd.read_parquet(tmp_path / "files")
    assert sorted(before.loc[before["status"] == "error", "file"]) == ["bad.wav", "other.wav"]

    # other.wav belongs to another input scored into the same OUTPUT: its row stays.
    earlier = resume(out, ["a.wav", "bad.wav"])
    assert earlier.done == {"a.wav", "other.wav"} and earlier.retried == {"bad.wav"}
    after = pd.read_parquet(tmp_path / "files")
    assert sorted(after["file"]) == ["a.wav", "other.wav"]  # bad.wav is out until its new row is committed
    assert after.dtypes.to_dict() == before.dtypes.to_dict()

    # Killed before bad.wav was scored again: the next run still scores it, and it is never in twice.
    assert resume(out, ["a.wav", "bad.wav"]) == Resume({"a.wav", "other.wav"}, set())
    headers["bad.wav"] = (2.0, "")
    chunks = _chunks("bad.wav", 2.0, 2.0, 60.0)
    committer = ShardCommitter(out, "r2", ["bad.wav"], headers, chunks, ["x", "y"], shard_files=2,
                               window_seconds=2.0, method="Fix", threshold=0.5)
    committer.add(_scored_windows("bad.wav", chunks[0], [0]))
    committer.finish()
    files = pd.read_parquet(tmp_path / "files").set_index("file")
    assert sorted(files.index) == ["a.wav", "bad.wav", "other.wav"] and files.loc["bad.wav", "status"] == "ok"
