"""The scoring job's output: files committed in shards as their windows arrive, resume, and summary.json.

A shard's windows/ and events/ parts are written first and its files/ part last, as its commit: a job killed
and started again with the same OUTPUT skips the files committed before and removes the parts of shards that
never committed, so every file ends in the tables exactly once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from gunsound import storage
from gunsound.events import summarize_file

log = logging.getLogger(__name__)

WINDOW_COLUMNS = ["path", "index", "start", "end", "error", "onsets", "probs"]


def _parts(output: str, table: str) -> list[str]:
    folder = storage.join(output, table)
    return [u for u in storage.list_files(folder) if u.endswith(".parquet")] if storage.exists(folder) else []


def _read_parts(uris: list[str]) -> pd.DataFrame:
    frames = [storage.read_parquet(u) for u in uris]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _remove(uri: str) -> None:
    fs, path = storage.resolve(uri)
    fs.delete_file(path)


def finished_files(output: str) -> set[str]:
    """Files committed by earlier runs into OUTPUT (a shard's files/ part is written last, as its commit);
    parts of shards that never committed are removed."""
    committed = {u.rsplit("/", 1)[-1] for u in _parts(output, "files")}
    for table in ("windows", "events"):
        for uri in _parts(output, table):
            if uri.rsplit("/", 1)[-1] not in committed:
                _remove(uri)
    done = _read_parts(_parts(output, "files"))
    return set(done["file"]) if len(done) else set()


class ShardCommitter:
    """Takes scored windows as they stream out of the job, in any order, and commits each shard of
    `shard_files` files once all of its windows are in. A window delivered twice (a retried task) counts
    once; a shard whose files all failed their header read is committed at once.

    Windows come as rows of WINDOW_COLUMNS: `onsets` holds the shots (seconds in the file, float64) that the
    window's chunk found, on one window of the chunk, and an empty array on the others."""

    def __init__(self, output: str, run_id: str, files: list[str], headers: dict[str, tuple[float, str]],
                 chunks: list[dict], classes: list[str], *, shard_files: int, window_seconds: float, method: str,
                 threshold: float):
        self.output, self.run_id, self.headers, self.classes = output, run_id, headers, classes
        self.summary = {"window_seconds": window_seconds, "method": method, "threshold": threshold}
        self.shards = [files[i:i + shard_files] for i in range(0, len(files), shard_files)]
        self.shard_of = {f: k for k, shard in enumerate(self.shards) for f in shard}
        self.waiting = [0] * len(self.shards)  # windows each shard still expects
        for c in chunks:
            self.waiting[self.shard_of[c["path"]]] += len(c["starts"])
        self.received: list[list[pd.DataFrame]] = [[] for _ in self.shards]
        self.seen: dict[str, set[int]] = {f: set() for f in files}
        self.committed = [False] * len(self.shards)
        self._commit_ready()

    def add(self, windows: pd.DataFrame) -> None:
        for path, rows in windows.groupby("path", sort=False):
            k = self.shard_of[path]
            if self.committed[k]:  # delivered again after its shard was written
                continue
            fresh = np.array([i not in self.seen[path] for i in rows["index"]], dtype=bool)
            self.seen[path].update(rows["index"])
            self.received[k].append(rows[fresh])
            self.waiting[k] -= int(fresh.sum())
        self._commit_ready()

    def finish(self) -> None:
        """A shard still open at the end lost a window on the way: it is not reported as done."""
        missing = [k for k, done in enumerate(self.committed) if not done]
        if missing:
            raise RuntimeError(f"scoring ended with shard(s) {missing} missing "
                               f"{sum(self.waiting[k] for k in missing)} window(s); their files were not "
                               "committed and a rerun will score them")

    def _commit_ready(self) -> None:
        for k, shard in enumerate(self.shards):
            if self.waiting[k] or self.committed[k]:
                continue
            parts = self.received[k]
            windows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=WINDOW_COLUMNS)
            commit_shard(self.output, f"part-{self.run_id}-{k:05d}.parquet", shard, self.headers, windows,
                         self.classes, **self.summary)
            self.committed[k], self.received[k] = True, []
            for f in shard:
                del self.seen[f]
            log.info("shard %d: %d files committed", k, len(shard))


def all_onsets(column: pd.Series) -> np.ndarray:
    """The onsets of a file's windows (an `onsets` column of float arrays) as one array."""
    return np.concatenate([np.zeros(0), *(np.asarray(o, dtype=np.float64) for o in column)])


WINDOW_SCHEMA_FIXED = [("file", pa.string()), ("start", pa.float64()), ("end", pa.float64())]
EVENT_SCHEMA = pa.schema([("file", pa.string()), ("time", pa.float64()), ("class", pa.string()),
                          ("probability", pa.float64()), ("burst", pa.int64()), ("shots_in_burst", pa.int64()),
                          ("rounds_per_minute", pa.float64())])


def commit_shard(output: str, name: str, shard: list[str], headers: dict[str, tuple[float, str]],
                 windows: pd.DataFrame, classes: list[str], *, window_seconds: float, method: str,
                 threshold: float) -> None:
    """Write a shard's windows/, events/ and, last, files/ parts under OUTPUT as `name`."""
    rows, events, window_rows = [], [], []
    grouped = dict(tuple(windows.groupby("path"))) if len(windows) else {}
    for path in shard:
        duration, error = headers[path]
        part = grouped.get(path, pd.DataFrame(columns=windows.columns))
        if not error and len(part):
            read_errors = [e for e in part["error"] if e]
            error = f"decode failed: {read_errors[0]}" if read_errors else ""
        part = part.sort_values("index")
        row, file_events = summarize_file(path, duration, part if not error else part.iloc[0:0],
                                          all_onsets(part["onsets"]), classes, method=method, threshold=threshold,
                                          error=error)
        if not error and duration < window_seconds:
            row["note"] = f"shorter than a window ({duration:.2f} s < {window_seconds:g} s): zero-padded"
        rows.append(row)
        events.extend(file_events)
        if not error:
            probs = np.stack(part["probs"].to_numpy()) if len(part) else np.zeros((0, len(classes)))
            frame = pd.DataFrame({"file": path, "start": part["start"].to_numpy(), "end": part["end"].to_numpy()})
            for i, c in enumerate(classes):
                frame[f"prob_{c}"] = probs[:, i]
            window_rows.append(frame)
    window_schema = pa.schema([*WINDOW_SCHEMA_FIXED, *[(f"prob_{c}", pa.float64()) for c in classes]])
    storage.write_parquet(pd.concat(window_rows, ignore_index=True) if window_rows else
                          pd.DataFrame(columns=window_schema.names), storage.join(output, "windows", name),
                          window_schema)
    storage.write_parquet(pd.DataFrame(events, columns=EVENT_SCHEMA.names), storage.join(output, "events", name),
                          EVENT_SCHEMA)
    files = pd.DataFrame(rows).astype({"file": str, "status": str, "error": str, "top_class": str, "note": str})
    storage.write_parquet(files, storage.join(output, "files", name))  # last: the shard's commit


@dataclass
class ScoreSummary:
    files: int
    files_ok: int
    errors: int
    audio_hours: float
    events: int
    wall_seconds: float
    audio_seconds_per_second: float
    skipped_as_finished: int
    output: str
    model_seconds: float = 0.0  # time inside the model stage (this run's windows, summed over actors)
    scorer_actors: int = 0  # scorer actors started (at most one per chunk)
    devices: list[str] = field(default_factory=list)  # where this run's windows were scored: cpu, cuda

    def describe(self) -> str:
        return (f"scored {self.files} files ({self.files_ok} ok, {self.errors} errors, "
                f"{self.skipped_as_finished} already finished), {self.audio_hours:.2f} h of audio, "
                f"{self.events} shots, {self.wall_seconds:.1f} s wall, "
                f"{self.audio_seconds_per_second:.0f} audio-s/s -> {self.output}")


def write_summary(output: str, files: list[str], *, skipped: int, started: float, model_seconds: float,
                  scorer_actors: int, devices: list[str]) -> ScoreSummary:
    """summary.json over the committed files of this input (`started`: the job's time.perf_counter())."""
    done = _read_parts(_parts(output, "files"))
    events = _read_parts(_parts(output, "events"))
    done = done[done["file"].isin(files)]
    wall = time.perf_counter() - started
    audio_s = float(done.loc[done["status"] == "ok", "duration"].sum())
    summary = ScoreSummary(len(done), int((done["status"] == "ok").sum()), int((done["status"] != "ok").sum()),
                           audio_s / 3600, len(events), wall, audio_s / max(wall, 1e-9), skipped, output,
                           model_seconds, scorer_actors, devices)
    storage.write_text(storage.join(output, "summary.json"), json.dumps(asdict(summary), indent=1))
    return summary
