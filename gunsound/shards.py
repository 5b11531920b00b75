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


def _read_part(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One committed part; one that is cut or not Parquet (a partial copy or sync) names itself and the way
    out, rather than failing every rerun with pyarrow's '<Buffer>'."""
    try:
        return storage.read_arrow_table(uri, columns)
    except ValueError as exc:
        raise ValueError(f"{exc}: a part of an earlier run that cannot be read; remove it (its files are then "
                         "scored again) or rerun with --overwrite") from exc


def _read_parts(uris: list[str]) -> pd.DataFrame:
    frames = [_read_part(u).to_pandas() for u in uris]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _remove(uri: str) -> None:
    fs, path = storage.resolve(uri)
    fs.delete_file(path)


@dataclass(frozen=True)
class InputScope:
    """Which committed rows are this input's: its files (a manifest, one file), or every file under its folder
    (a folder, prefix or zip, listed a page at a time and never held whole). Under a folder, a file committed
    by an earlier run and deleted since still counts as this input's."""

    files: frozenset[str] | None = None
    folder: str | None = None

    def contains(self, column: pa.Array | pa.ChunkedArray) -> pa.Array:
        """A boolean mask over a column of file URIs."""
        if self.folder is not None:
            return pc.starts_with(column, self.folder + "/")
        return pc.is_in(column, value_set=pa.array(sorted(self.files or ()), pa.string()))


@dataclass(frozen=True)
class Resume:
    done: set[str]  # files committed by earlier runs, kept
    retried: set[str]  # files of this input whose committed row is an error: to be scored again


def resume(output: str, scope: InputScope | list[str]) -> Resume:
    """What earlier runs committed into OUTPUT (a shard's files/ part is written last, as its commit). Parts
    of shards that never committed are removed. The error rows of this input (`scope`, or a list of its files)
    are not counted as done: a run that lists such a file again takes its row out (`take_out_errors`) and
    scores it again; the row of a file no longer listed stays."""
    if not isinstance(scope, InputScope):
        scope = InputScope(files=frozenset(scope))
    committed = {u.rsplit("/", 1)[-1] for u in _parts(output, "files")}
    for table in ("windows", "events"):
        for uri in _parts(output, table):
            if uri.rsplit("/", 1)[-1] not in committed:
                _remove(uri)
    done: set[str] = set()
    retried: set[str] = set()
    for uri in _parts(output, "files"):
        part = _read_part(uri, columns=["file", "status"])
        retry = pc.and_(pc.equal(part["status"], "error"), scope.contains(part["file"]))
        retried.update(part.filter(retry)["file"].to_pylist())
        done.update(part.filter(pc.invert(retry))["file"].to_pylist())
    return Resume(done, retried)


def take_out_errors(output: str, files: set[str]) -> None:
    """Take the error rows of `files` out of their files/ parts, each part rewritten whole (an atomic replace),
    before they are scored again: at any point where a run may crash each file is in the tables at most once."""
    if not files:
        return
    scope = InputScope(files=frozenset(files))
    for uri in _parts(output, "files"):
        part = _read_part(uri)
        retry = pc.and_(pc.equal(part["status"], "error"), scope.contains(part["file"]))
        if pc.any(retry).as_py():
            buffer = io.BytesIO()
            pq.write_table(part.filter(pc.invert(retry)), buffer)  # the part's own schema: the parts still agree
            storage.write_bytes(uri, buffer.getvalue())


class ShardCommitter:
    """Takes scored rows as they stream out of the job, in any order, and commits each shard once all of its rows
    are in. Every row names its shard (`shard`) and how many rows the whole shard yields (`shard_rows`: a window
    each, and one row, index -1 with its error, for a file without windows), so the driver holds the shards in
    flight and forgets each once written: nothing per file of the archive. A row delivered twice (a retried
    task) counts once.

    Rows come as columns of WINDOW_COLUMNS plus `shard`, `shard_rows` and `duration` (the file's), as numpy
    arrays: `onsets` holds the shots (seconds in the file, float64) that the window's chunk found, on one
    window of the chunk and an empty array on the others; `probs` is (rows, classes)."""

    def __init__(self, output: str, run_id: str, classes: list[str], *, shards: int, window_seconds: float,
                 method: str, threshold: float):
        self.output, self.run_id, self.classes, self.shards = output, run_id, classes, shards
        self.summary = {"window_seconds": window_seconds, "method": method, "threshold": threshold}
        self.open: dict[int, _OpenShard] = {}
        self.committed: set[int] = set()
        self.disagreeing: dict[int, set[int]] = {}  # shards whose rows named different row counts: never committed
        self.audio_seconds = 0.0  # of the files this run committed ok (a resumed run's own rate)
        self.peak_open = 0  # most shards held at once (the driver's state)

    def add(self, rows: dict[str, np.ndarray]) -> None:
        shard_ids = np.asarray(rows["shard"])
        for k in np.unique(shard_ids):
            k = int(k)
            if k in self.committed:  # delivered again after its shard was written
                continue
            take = np.flatnonzero(shard_ids == k)
            counts = {int(c) for c in np.asarray(rows["shard_rows"])[take]}
            state = self.open.setdefault(k, _OpenShard(min(counts)))
            # Units of one shard planned from different headers (a file that changed or failed to read in
            # between) would commit a file with windows missing: the shard stays uncommitted instead.
            if k in self.disagreeing or counts != {state.expected}:
                self.disagreeing.setdefault(k, {state.expected}).update(counts)
                self.open.pop(k, None)
                continue
            self.peak_open = max(self.peak_open, len(self.open))
            fresh = []
            for i in take:
                key = (rows["path"][i], int(rows["index"][i]))
                if key not in state.seen:
                    state.seen.add(key)
                    fresh.append(i)
            if fresh:
                part = {c: rows[c][fresh] for c in (*WINDOW_COLUMNS, "duration")}
                part["onsets"] = _one_array_per_row(part["onsets"])
                state.parts.append(part)
            if len(state.seen) >= state.expected:
                self._commit(k, self.open.pop(k))

    def finish(self) -> None:
        """A shard still open (or never seen) at the end lost rows on the way: it is not reported as done."""
        missing = sorted(set(range(self.shards)) - self.committed)
        if missing:
            lost = sum(self.open[k].expected - len(self.open[k].seen) for k in missing if k in self.open)
            disagreeing = "".join(f"; shard {k} was planned as {sorted(n)} rows by its units (its files' headers "
                                  "read differently: changed or failed files?)" for k, n in self.disagreeing.items())
            raise RuntimeError(f"scoring ended with shard(s) {missing[:20]}{' ...' if len(missing) > 20 else ''} "
                               f"incomplete ({lost} row(s) missing in the shards that started{disagreeing}); "
                               "their files were not committed and a rerun will score them")

    def _commit(self, k: int, state: _OpenShard) -> None:
        columns = {c: np.concatenate([part[c] for part in state.parts]) for c in (*WINDOW_COLUMNS, "duration")}
        paths, index, errors = columns["path"], columns["index"], columns["error"]
        headers: dict[str, tuple[float, str]] = {}
        for path, duration, i, error in zip(paths, columns["duration"], index, errors, strict=True):
            if path not in headers or i < 0:  # a file's header error rides on its one row, index -1
                headers[path] = (float(duration), str(error) if i < 0 else "")
        windows = index >= 0
        frame = pd.DataFrame({c: columns[c][windows] if c != "probs" else list(columns[c][windows])
                              for c in WINDOW_COLUMNS})
        self.audio_seconds += commit_shard(self.output, f"part-{self.run_id}-{k:05d}.parquet", sorted(headers),
                                           headers, frame, self.classes, **self.summary)
        self.committed.add(k)
        log.info("shard %d: %d files committed", k, len(headers))


def _one_array_per_row(column: np.ndarray) -> np.ndarray:
    """An onsets column as an object array of float64 arrays (a batch whose rows all hold as many onsets may
    arrive as one 2-D array)."""
    if column.dtype == object:
        return column
    out = np.empty(len(column), dtype=object)
    for i, row in enumerate(column):
        out[i] = np.asarray(row, dtype=np.float64)
    return out


@dataclass
class _OpenShard:
    expected: int  # rows the shard yields in all
    seen: set[tuple[str, int]] = field(default_factory=set)  # (file, window index) received
    parts: list[dict[str, np.ndarray]] = field(default_factory=list)


def all_onsets(column: pd.Series) -> np.ndarray:
    """The onsets of a file's windows (an `onsets` column of float arrays) as one array."""
    return np.concatenate([np.zeros(0), *(np.asarray(o, dtype=np.float64) for o in column)])


WINDOW_SCHEMA_FIXED = [("file", pa.string()), ("start", pa.float64()), ("end", pa.float64())]
EVENT_SCHEMA = pa.schema([("file", pa.string()), ("time", pa.float64()), ("class", pa.string()),
                          ("probability", pa.float64()), ("burst", pa.int64()), ("shots_in_burst", pa.int64()),
                          ("rounds_per_minute", pa.float64())])


def commit_shard(output: str, name: str, shard: list[str], headers: dict[str, tuple[float, str]],
                 windows: pd.DataFrame, classes: list[str], *, window_seconds: float, method: str,
                 threshold: float) -> float:
    """Write a shard's windows/, events/ and, last, files/ parts under OUTPUT as `name`. `windows` holds the
    shard's scored windows (WINDOW_COLUMNS, in any order); a file's (duration, error) come from `headers`.
    Returns the audio seconds of its files that are ok."""
    if len(windows):
        windows = windows.sort_values(["path", "index"], kind="stable", ignore_index=True)
    path_of = windows["path"].to_numpy(dtype=object)
    edges = np.flatnonzero(path_of[1:] != path_of[:-1]) + 1 if len(windows) else np.zeros(0, dtype=int)
    bounds = np.r_[0, edges, len(windows)].astype(int)
    span = {path_of[a]: (a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a}
    read_errors = windows["error"].to_numpy(dtype=object)
    kept = np.zeros(len(windows), dtype=bool)  # the windows of files that are ok
    rows, events = [], []
    for path in shard:
        duration, error = headers[path]
        a, b = span.get(path, (0, 0))
        if not error and b > a:
            failed = next((e for e in read_errors[a:b] if e), "")
            error = f"decode failed: {failed}" if failed else ""
        part = windows.iloc[a:b] if not error else windows.iloc[0:0]
        row, file_events = summarize_file(path, duration, part, all_onsets(part["onsets"]), classes, method=method,
                                          threshold=threshold, error=error, window_seconds=window_seconds)
        if error.startswith(SKIPPED):  # listed under the input, not audio this reader takes
            row["status"] = "skipped"
        failed = bool(row["error"])  # its own, or the summary's (non-finite probabilities)
        rows.append(row)
        events.extend(file_events)
        kept[a:b] = not failed
    window_schema = pa.schema([*WINDOW_SCHEMA_FIXED, *[(f"prob_{c}", pa.float64()) for c in classes]])
    ok = windows[kept]
    probs = np.stack(ok["probs"].to_numpy()) if len(ok) else np.zeros((0, len(classes)))
    table = pd.DataFrame({"file": ok["path"].to_numpy(dtype=object), "start": ok["start"].to_numpy(dtype=float),
                          "end": ok["end"].to_numpy(dtype=float),
                          **{f"prob_{c}": probs[:, i].astype(np.float64) for i, c in enumerate(classes)}})
    storage.write_parquet(table, storage.join(output, "windows", name), window_schema)
    storage.write_parquet(pd.DataFrame(events, columns=EVENT_SCHEMA.names), storage.join(output, "events", name),
                          EVENT_SCHEMA)
    files = pd.DataFrame(rows).astype({"file": str, "status": str, "error": str, "top_class": str, "note": str})
    storage.write_parquet(files, storage.join(output, "files", name))  # last: the shard's commit
    return float(files.loc[files["status"] == "ok", "duration"].sum())


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
    calls_per_actor: int = 1  # scoring calls each scorer actor ran side by side (threads, one CPU each)

    def describe(self) -> str:
        return (f"scored {self.files} files ({self.files_ok} ok, {self.errors} errors, "
                f"{self.skipped_as_finished} already finished, {self.retried_errors} earlier errors retried; "
                f"{self.skipped_entries} entries not audio, skipped), "
                f"{self.audio_hours:.2f} h of audio, "
                f"{self.events} shots, {self.wall_seconds:.1f} s wall, "
                f"{self.audio_seconds_per_second:.0f} audio-s/s -> {self.output}")


def write_summary(output: str, scope: InputScope, *, skipped: int, started: float, model_seconds: float,
                  scorer_actors: int, devices: list[str], retried: int = 0, model: dict | None = None,
                  settings: dict | None = None, scorers: list[str] | None = None,
                  skipped_entries: int = 0, calls_per_actor: int = 1,
                  scored_seconds: float | None = None) -> ScoreSummary:
    """summary.json over the committed files of this input (`scope`; entries skipped as not audio are not
    files) (`started`: the job's time.perf_counter()), with the model and the settings that made them. The
    rate is of the audio this run scored (`scored_seconds`; by default all of the input's), not of files an
    earlier run finished."""
    done = _read_parts(_parts(output, "files"))
    if len(done):
        ours = scope.contains(pa.array(done["file"].astype(str), pa.string())).to_numpy(zero_copy_only=False)
        done = done[ours & (done["status"] != "skipped").to_numpy()]
    else:
        done = pd.DataFrame({"file": [], "status": [], "duration": [], "shots": []})
    wall = time.perf_counter() - started
    ok = done["status"] == "ok"
    audio_s = float(done.loc[ok, "duration"].sum())
    # The shots of this input's files (their files/ rows count them): OUTPUT may also hold another input's.
    shots = int(done.loc[ok, "shots"].sum())
    summary = ScoreSummary(len(done), int(ok.sum()), int((~ok).sum()),
                           audio_s / 3600, shots, wall, (audio_s if scored_seconds is None else scored_seconds)
                           / max(wall, 1e-9), skipped, output,
                           model_seconds, scorer_actors, devices, retried, model or {}, settings or {},
                           scorers or [], skipped_entries, calls_per_actor)
    storage.write_text(storage.join(output, "summary.json"), json.dumps(asdict(summary), indent=1))
    return summary
