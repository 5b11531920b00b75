"""Shard commits: a shard is written once all of its windows are in, in any order, each window once."""

import re
import time

import numpy as np
import pandas as pd
import pytest

from gunsound.shards import Resume, ShardCommitter, resume, take_out_errors
from gunsound.windows import plan_chunks


def _chunks(path: str, duration: float, window: float, read: float) -> list[dict]:
    return plan_chunks(path, duration, window_seconds=window, hop_seconds=window, read_seconds=read)


def _rows(path: str, chunk: dict, indices: list[int], shard: int, shard_rows: int) -> dict[str, np.ndarray]:
    """Scored rows as they come out of the job (numpy columns), for windows `indices` of a chunk."""
    starts = np.asarray(chunk["starts"])[[i - chunk["first_window"] for i in indices]]
    onsets = np.empty(len(indices), dtype=object)
    for j, t in enumerate(starts):
        onsets[j] = np.array([float(t) + 0.5])
    n = len(indices)
    return {"path": np.array([path] * n, dtype=object), "index": np.array(indices), "start": starts,
            "end": starts + 2.0, "error": np.array([""] * n, dtype=object), "onsets": onsets,
            "probs": np.tile([0.9, 0.1], (n, 1)), "shard": np.full(n, shard), "shard_rows": np.full(n, shard_rows),
            "duration": np.full(n, chunk["duration"])}


def _marker(path: str, error: str, shard: int, shard_rows: int) -> dict[str, np.ndarray]:
    """The one row of a file without windows."""
    onsets = np.empty(1, dtype=object)
    onsets[0] = np.zeros(0)
    return {"path": np.array([path], dtype=object), "index": np.array([-1]), "start": np.array([np.nan]),
            "end": np.array([np.nan]), "error": np.array([error], dtype=object), "onsets": onsets,
            "probs": np.full((1, 2), np.nan), "shard": np.array([shard]), "shard_rows": np.array([shard_rows]),
            "duration": np.array([np.nan])}


def _join(*batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _committer(out: str, shards: int) -> ShardCommitter:
    return ShardCommitter(out, "r1", ["x", "y"], shards=shards, window_seconds=2.0, method="Fix", threshold=0.5)


def test_shards_commit_when_complete_in_any_order_and_count_each_window_once(tmp_path):
    chunks = {f: _chunks(f, d, 2.0, 4.0) for f, d in (("a.wav", 10.0), ("b.wav", 2.0), ("c.wav", 6.0))}
    committer = _committer(str(tmp_path / "out"), 2)
    # Shard 0: a.wav (5 windows) and b.wav (1); shard 1: c.wav (3) and bad.wav (no windows: its one row).

    def committed_files() -> list[str]:
        return sorted(pd.read_parquet(tmp_path / "out" / "files")["file"]) if (tmp_path / "out" / "files").exists() \
            else []

    # Shard 1 completes first; shard 0 waits for a.wav's last window. Rows of both shards share a batch.
    committer.add(_join(_rows("a.wav", chunks["a.wav"][0], [0, 1], 0, 6), _rows("c.wav", chunks["c.wav"][0], [0, 1], 1, 4),
                        _marker("bad.wav", "unreadable audio: not audio", 1, 4)))
    assert committed_files() == [] and sorted(committer.open) == [0, 1]
    committer.add(_rows("c.wav", chunks["c.wav"][1], [2], 1, 4))
    assert committed_files() == ["bad.wav", "c.wav"] and sorted(committer.open) == [0]  # shard 1 forgotten
    committer.add(_rows("a.wav", chunks["a.wav"][0], [1], 0, 6))  # delivered again: counts once
    committer.add(_rows("b.wav", chunks["b.wav"][0], [0], 0, 6))
    committer.add(_rows("a.wav", chunks["a.wav"][1], [2, 3], 0, 6))
    assert committed_files() == ["bad.wav", "c.wav"]  # a.wav's window 4 is still out
    committer.add(_join(_rows("a.wav", chunks["a.wav"][2], [4], 0, 6),
                        _rows("c.wav", chunks["c.wav"][1], [2], 1, 4)))  # late repeat: ignored
    committer.finish()
    assert committed_files() == ["a.wav", "b.wav", "bad.wav", "c.wav"] and committer.open == {}
    assert committer.peak_open == 2

    one_batch = _committer(str(tmp_path / "out2"), 1)  # a shard whose rows all come in one batch is held too
    one_batch.add(_rows("b.wav", chunks["b.wav"][0], [0], 0, 1))
    assert one_batch.committed == {0} and one_batch.peak_open == 1
    windows = pd.read_parquet(tmp_path / "out" / "windows")
    assert windows.groupby("file").size().to_dict() == {"a.wav": 5, "b.wav": 1, "c.wav": 3}
    assert not windows.duplicated(["file", "start"]).any()
    files_table = pd.read_parquet(tmp_path / "out" / "files").set_index("file")
    assert files_table.loc["a.wav", "shots"] == 5 and files_table.loc["a.wav", "windows"] == 5
    assert files_table.loc["bad.wav", "status"] == "error"
    assert files_table.loc["bad.wav", "error"] == "unreadable audio: not audio"
    events = pd.read_parquet(tmp_path / "out" / "events")
    assert sorted(events.loc[events["file"] == "a.wav", "time"]) == [0.5, 2.5, 4.5, 6.5, 8.5]


def test_a_shard_missing_a_window_is_never_committed(tmp_path):
    a, b = _chunks("a.wav", 4.0, 2.0, 60.0), _chunks("b.wav", 2.0, 2.0, 60.0)
    committer = _committer(str(tmp_path), 3)
    committer.add(_rows("a.wav", a[0], [0], 0, 2))
    committer.add(_rows("b.wav", b[0], [0], 1, 1))
    with pytest.raises(RuntimeError, match=r"shard\(s\) \[0, 2\] incomplete \(1 row\(s\) missing"):
        committer.finish()
    assert list(pd.read_parquet(tmp_path / "files")["file"]) == ["b.wav"]


def test_a_read_error_in_any_chunk_makes_the_file_an_error_row_without_windows(tmp_path):
    chunks = _chunks("a.wav", 8.0, 2.0, 4.0)
    committer = _committer(str(tmp_path), 1)
    failed = _rows("a.wav", chunks[1], [2, 3], 0, 4)
    failed["error"][:] = "a.wav: truncated: 3 of 4 s"
    committer.add(_join(_rows("a.wav", chunks[0], [0, 1], 0, 4), failed))
    committer.finish()
    row = pd.read_parquet(tmp_path / "files").iloc[0]
    assert row["status"] == "error" and row["error"] == "decode failed: a.wav: truncated: 3 of 4 s"
    assert len(pd.read_parquet(tmp_path / "windows")) == 0 and len(pd.read_parquet(tmp_path / "events")) == 0


@pytest.mark.parametrize("damage", ["cut", "zeroed"])
@pytest.mark.parametrize("read", ["resume", "take_out_errors", "summary"])
def test_a_committed_part_cut_short_names_itself_and_the_way_out(tmp_path, read, damage):
    """A files/ part cut by a partial copy or sync, or of its size with zeros where a preallocating copy had
    not written yet: every rerun failed with pyarrow's '<Buffer>' (or called the corrupt data a failed read),
    naming no part among thousands."""
    from gunsound.shards import InputScope, write_summary

    chunks = _chunks("a.wav", 2.0, 2.0, 60.0)
    committer = _committer(str(tmp_path), 1)
    committer.add(_join(_rows("a.wav", chunks[0], [0], 0, 2), _marker("bad.wav", "unreadable: not audio", 0, 2)))
    committer.finish()
    (part,) = (tmp_path / "files").glob("*.parquet")
    data = part.read_bytes()
    half = len(data) // 2
    part.write_bytes(data[:half] if damage == "cut" else data[:8] + bytes(len(data) - 16) + data[-8:])
    calls = {"resume": lambda: resume(str(tmp_path), ["a.wav"]),
             "take_out_errors": lambda: take_out_errors(str(tmp_path), {"bad.wav"}),
             "summary": lambda: write_summary(str(tmp_path), InputScope(files=frozenset({"a.wav"})), skipped=0,
                                              started=0.0, model_seconds=0.0, scorer_actors=1, devices=["cpu"])}
    with pytest.raises(ValueError, match=re.escape(str(part)) + r": not a readable Parquet file.* remove it .*--overwrite"):
        calls[read]()


def test_a_rerun_takes_the_error_rows_of_its_input_out_to_score_them_again(tmp_path):
    out = str(tmp_path)
    chunks = _chunks("a.wav", 2.0, 2.0, 60.0)
    committer = _committer(out, 1)
    committer.add(_join(_rows("a.wav", chunks[0], [0], 0, 3), _marker("bad.wav", "unreadable: not audio", 0, 3),
                        _marker("other.wav", "unreadable: not audio", 0, 3)))
    committer.finish()
    before = pd.read_parquet(tmp_path / "files")
    assert sorted(before.loc[before["status"] == "error", "file"]) == ["bad.wav", "other.wav"]

    # other.wav belongs to another input scored into the same OUTPUT: its row stays.
    earlier = resume(out, ["a.wav", "bad.wav"])
    assert earlier.done == {"a.wav", "other.wav"} and earlier.retried == {"bad.wav"}
    assert len(pd.read_parquet(tmp_path / "files")) == 3  # taken out only once the run lists it again
    take_out_errors(out, earlier.retried)
    after = pd.read_parquet(tmp_path / "files")
    assert sorted(after["file"]) == ["a.wav", "other.wav"]  # bad.wav is out until its new row is committed
    assert after.dtypes.to_dict() == before.dtypes.to_dict()

    # Killed before bad.wav was scored again: the next run still scores it, and it is never in twice.
    assert resume(out, ["a.wav", "bad.wav"]) == Resume({"a.wav", "other.wav"}, set())
    chunks = _chunks("bad.wav", 2.0, 2.0, 60.0)
    committer = ShardCommitter(out, "r2", ["x", "y"], shards=1, window_seconds=2.0, method="Fix", threshold=0.5)
    committer.add(_rows("bad.wav", chunks[0], [0], 0, 1))
    committer.finish()
    files = pd.read_parquet(tmp_path / "files").set_index("file")
    assert sorted(files.index) == ["a.wav", "bad.wav", "other.wav"] and files.loc["bad.wav", "status"] == "ok"


@pytest.mark.parametrize("order", [[2, 0, 3, 1], [2, 3, 0, 1], [0, 2, 1, 3]])
def test_a_shard_whose_units_planned_different_rows_is_never_committed(tmp_path, order):
    """Two units of one shard that read c.wav's header differently (the file changed in between): one planned
    its 4 windows (a shard of 6 rows), the other 2 (4 rows). Committing when 4 rows were in would keep c.wav
    with 2 windows; the shard stays out, and finish() says why. (The driver now gives a shard's units the
    headers it read, so they agree; this is what a disagreement would still meet, once seen.)"""
    chunks = {f: _chunks(f, d, 2.0, 4.0) for f, d in (("b.wav", 4.0), ("c.wav", 8.0))}
    committer = _committer(str(tmp_path / "out"), 1)
    batches = [_rows("b.wav", chunks["b.wav"][0], [0, 1], 0, 4), _rows("c.wav", chunks["c.wav"][0], [0, 1], 0, 4),
               _rows("c.wav", chunks["c.wav"][0], [0, 1], 0, 6), _rows("c.wav", chunks["c.wav"][1], [2, 3], 0, 6)]
    for k in order:
        committer.add(batches[k])
    assert not (tmp_path / "out" / "files").exists()
    with pytest.raises(RuntimeError, match=r"shard 0 was planned as \[4, 6\] rows by its units"):
        committer.finish()


def test_the_summary_counts_the_shots_of_this_inputs_files_only(tmp_path):
    """Two inputs scored into one OUTPUT: the second run's summary counts its own files' shots, not the
    first input's rows beside them."""
    from gunsound.shards import InputScope, write_summary

    (tmp_path / "files").mkdir()
    (tmp_path / "events").mkdir()
    rows = [("/a/1.wav", "ok", 3), ("/a/2.wav", "ok", 4), ("/b/1.wav", "ok", 2), ("/b/2.wav", "error", 0)]
    for k, (file, status, shots) in enumerate(rows):
        pd.DataFrame({"file": [file], "status": [status], "duration": [5.0], "shots": [shots]}).to_parquet(
            tmp_path / "files" / f"shard-{k:05d}.parquet")
        pd.DataFrame({"file": [file] * shots, "time": np.arange(shots, dtype=float)}).to_parquet(
            tmp_path / "events" / f"shard-{k:05d}.parquet")
    summary = write_summary(str(tmp_path), InputScope(folder="/b"), skipped=0, started=0.0, model_seconds=0.0,
                            scorer_actors=1, devices=["cpu"])
    assert (summary.files, summary.files_ok, summary.errors, summary.events) == (2, 1, 1, 2)
    assert write_summary(str(tmp_path), InputScope(files=frozenset({"/a/1.wav", "/a/2.wav"})), skipped=0,
                         started=0.0, model_seconds=0.0, scorer_actors=1, devices=["cpu"]).events == 7
    # A resumed run's rate is of the audio it scored itself, not of the files an earlier run finished.
    started = time.perf_counter() - 2.0
    resumed = write_summary(str(tmp_path), InputScope(folder="/a"), skipped=1, started=started, model_seconds=0.0,
                            scorer_actors=1, devices=["cpu"], scored_seconds=5.0)
    assert resumed.audio_hours * 3600 == 10.0 and 2.0 < 5.0 / resumed.audio_seconds_per_second < 3.0


def test_a_file_whose_windows_the_model_gave_nan_is_an_error_without_windows(tmp_path):
    """The summary makes such a file an error row; its NaN windows are not kept beside it, nor a padding note."""
    chunks = _chunks("a.wav", 1.0, 2.0, 60.0)
    rows = _rows("a.wav", chunks[0], [0], 0, 1)
    rows["probs"] = np.full((1, 2), np.nan)
    committer = _committer(str(tmp_path), 1)
    committer.add(rows)
    committer.finish()
    row = pd.read_parquet(tmp_path / "files").iloc[0]
    assert row["status"] == "error" and "non-finite probabilities" in row["error"] and row["note"] == ""
    assert len(pd.read_parquet(tmp_path / "windows")) == 0 and len(pd.read_parquet(tmp_path / "events")) == 0
