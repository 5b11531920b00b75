"""The scoring job's output: files committed in shards as their windows arrive, resume, and summary.json.

A shard's windows/ and events/ parts are written first and its files/ part last, as its commit: a job killed
and started again with the same OUTPUT skips the files committed before and removes the parts of shards that
never committed, so every file ends in the tables exactly once.

A file whose committed row is an error (unreadable, a failed read) is scored again by the next run: before
scoring, its row is taken out of its files/ part, by rewriting that part whole (an atomic replace), so at any
point where a run may crash each file is in the tables at most once, and after a run that ends exactly once.
An error row has no windows or events, so its shard's other parts need no rewrite.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gunsound import storage
from gunsound.events import summarize_file

log = logging.getLogger(__name__)

WINDOW_COLUMNS = ["path", "index", "start", "end", "error", "onsets", "probs"]
SKIPPED = "skipped: "  # how the error of a files/ row with status "skipped" begins


def _parts(output: str, table: str) -> list[str]:
    folder = storage.join(output, table)
    return [u for u in storage.list_files(folder) if u.endswith(".parquet")] if storage.exists(folder) else []


def _read_parts(uris: list[str]) -> pd.DataFrame:
    frames = [storage.read_parquet(u) for u in uris]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _remove(uri: str) -> None:
    fs, path = storage.resolve(uri)
    fs.delete_file(path)


@dataclass(frozen=True)
class Resume:
    done: set[str]  # files committed by earlier runs, kept
    retried: set[str]  # files of this input whose committed row was an error: taken out, to be scored again


def resume(output: str, files: list[str]) -> Resume:
    """What earlier runs committed into OUTPUT (a shard's files/ part is written last, as its commit). Parts
    of shards that never committed are removed, and the error rows of `files` are taken out of their parts
    so that this run scores those files again."""
    committed = {u.rsplit("/", 1)[-1] for u in _parts(output, "files")}
    for table in ("windows", "events"):
        for uri in _parts(output, table):
            if uri.rsplit("/", 1)[-1] not in committed:
                _remove(uri)
    wanted = pa.array(sorted(set(files)), pa.string())
    done: set[str] = set()
    retried: set[str] = set()
    for uri in _parts(output, "files"):
        part = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        retry = pc.and_(pc.equal(part["status"], "error"), pc.is_in(part["file"], value_set=wanted))
        if pc.any(retry).as_py():
            retried.update(part.filter(retry)["file"].to_pylist())
            part = part.filter(pc.invert(retry))
            buffer = io.BytesIO()
            pq.write_table(part, buffer)  # the part's own schema, so the dataset's parts still agree
            storage.write_bytes(uri, buffer.getvalue())
        done.update(part["file"].to_pylist())
    return Resume(done, retried)


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
        if error.startswith(SKIPPED):  # listed under the input, not audio this reader takes
            row["status"] = "skipped"
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
    retried_errors: int = 0  # files whose earlier row was an error, scored again by this run
    model: dict = field(default_factory=dict)  # location, sha256 of the model files (as in fingerprint.json)
    settings: dict = field(default_factory=dict)  # the scoring settings the rows were made with
    scorers: list[str] = field(default_factory=list)  # where the scorer actors ran: device, node, node type, GPU
    skipped_entries: int = 0  # entries under the input that are not audio gunsound reads (rows "skipped")

    def describe(self) -> str:
        return (f"scored {self.files} files ({self.files_ok} ok, {self.errors} errors, "
                f"{self.skipped_as_finished} already finished, {self.retried_errors} earlier errors retried; "
                f"{self.skipped_entries} entries not audio, skipped), "
                f"{self.audio_hours:.2f} h of audio, "
                f"{self.events} shots, {self.wall_seconds:.1f} s wall, "
                f"{self.audio_seconds_per_second:.0f} audio-s/s -> {self.output}")


def write_summary(output: str, files: list[str], *, skipped: int, started: float, model_seconds: float,
                  scorer_actors: int, devices: list[str], retried: int = 0, model: dict | None = None,
                  settings: dict | None = None, scorers: list[str] | None = None,
                  skipped_entries: int = 0) -> ScoreSummary:
    """summary.json over the committed files of this input (`started`: the job's time.perf_counter()), with
    the model and the settings that made them."""
    done = _read_parts(_parts(output, "files"))
    events = _read_parts(_parts(output, "events"))
    done = done[done["file"].isin(files)]
    wall = time.perf_counter() - started
    audio_s = float(done.loc[done["status"] == "ok", "duration"].sum())
    summary = ScoreSummary(len(done), int((done["status"] == "ok").sum()), int((done["status"] != "ok").sum()),
                           audio_s / 3600, len(events), wall, audio_s / max(wall, 1e-9), skipped, output,
                           model_seconds, scorer_actors, devices, retried, model or {}, settings or {},
                           scorers or [], skipped_entries)
    storage.write_text(storage.join(output, "summary.json"), json.dumps(asdict(summary), indent=1))
    return summary
