"""Offline scoring of audio archives on Ray: the job (`score`) and one file without Ray (`predict_file`).

The driver lists the input a page at a time (`inputs`) and cuts it into shards of file names as it goes; all
but the first few go into the object store as they are made, so the driver holds a reference per shard, not
the archive's file names. Headers are read and every file planned into chunks of windows (`windows`) inside
the pipeline, a shard at a time (`plan_shards`), so the first shard is scored while later headers are unread.
Chunks are packed into read groups of about a model batch of windows, from as many short files as it takes;
decoding and shot detection (`onsets`) read a group per call (`read_groups`), and the model
(`inference.WindowScorer`) scores it in an actor pool (a GPU each and autocast where GPUs are used,
`resources.scorer_actors`; on CPUs each actor reads what it scores, `GroupScorer`, and on one machine a single
actor scores in a thread per CPU), one pool for the whole run. A CPU scorer searches a chunk for shots only
after scoring it, and only where they could be reported (`detect_where_heard`). The scorers load the model from its files; the
driver reads its classes from the files' pickled values, without their tensors (`model_files.describe_model`),
and never imports torch. Every row names its shard and the shard's row count, so the driver holds only the
shards in flight; a shard's results are committed to OUTPUT as soon as its last row is scored (`shards`), so a
killed job started again with the same OUTPUT skips the files it finished, scores again those whose rows are
errors, and ends with each file exactly once. It resumes only with the same model and settings
(`fingerprint`), and one job at a time writes an OUTPUT (`lease`).

Outputs (Parquet datasets under OUTPUT): windows/ (file, start, end, prob_<class>), files/ (one row per
input file: status, duration, top class, per-class max and mean, shots), events/ (one row per detected shot:
time, class, probability, burst, rate of fire), summary.json (with the model and settings), fingerprint.json,
and lease.json while a job runs.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from gunsound import audio, fingerprint, storage
from gunsound.config import Config, ConfigError
from gunsound.events import summarize_file
from gunsound.inputs import open_inputs
from gunsound.lease import OutputLease
from gunsound.model_files import describe_model, model_files
from gunsound.onsets import SHOT_DETECTOR, chunk_onsets
from gunsound.shards import (
    SKIPPED,
    WINDOW_COLUMNS,
    InputScope,
    ScoreSummary,
    ShardCommitter,
    all_onsets,
    commit_shard,
    resume,
    take_out_errors,
    write_summary,
)
from gunsound.windows import cut_windows, pack_chunks, plan_chunks

if TYPE_CHECKING:
    from gunsound.inference import ScoringModel

log = logging.getLogger(__name__)

__all__ = ["GroupScorer", "ScoringSettings", "plan_shards", "predict_file", "read_chunks", "read_groups", "score",
           "scoring_config"]

# What scoring writes into its OUTPUT: all that --overwrite removes there.
SCORING_OUTPUTS = ("files", "windows", "events", "summary.json")
# Shards are the input blocks, one each up to this many; beyond it a block holds UNITS_PER_BLOCK shards, still
# planned one at a time, so the driver does not track millions of tiny objects.
SMALL_BLOCKS = 2048
UNITS_PER_BLOCK = 8
# Entries under the input that are not audio are committed (status "skipped") in parts of up to this many.
SKIPPED_PART_ENTRIES = 50_000
# A run of at most this many files has its headers read by the driver to size the scorer pool (on S3, a few
# seconds on 8 threads): below it a run may need fewer scorers than the cluster offers.
SIZING_HEADERS = 256


@dataclass(frozen=True, kw_only=True)
class ScoringSettings:
    method: str  # "Fix" (consecutive windows, averaged per file) or "Sliding"
    window_seconds: float
    hop_seconds: float
    read_seconds: float  # audio read as one frame range: one unit of parallel work
    threshold: float
    batch_size: int = 64
    shard_files: int = 256
    onset_detection: bool = True
    mixed_precision: bool = True
    actors: int | None = None
    onset_threshold_db: float = 12.0
    shot_detector: str = SHOT_DETECTOR  # in the fingerprint: a rerun never mixes two detectors' shots

    @classmethod
    def from_config(cls, cfg: Config, *, model_chunk_seconds: float) -> ScoringSettings:
        """The settings of `cfg` for a model trained on clips of `model_chunk_seconds`."""
        p, sc = cfg.prediction, cfg.scoring
        if p.inference_chunk_method == "Fix" and cfg.audio.audio_parameters == "Auto":
            # Auto chose the training chunk from the data: Fix windows are that chunk, the length the model
            # learned to see.
            window = hop = min(model_chunk_seconds, p.max_inference_chunk_seconds)
        elif p.inference_chunk_method == "Fix":
            window = hop = min(p.inference_chunk_seconds, p.max_inference_chunk_seconds)
        else:
            window = sc.window_seconds or model_chunk_seconds
            hop = sc.hop_seconds or window / 2
        if hop <= 0 or window <= 0:
            raise ConfigError("scoring: window_seconds and hop_seconds must be positive")
        if hop > window:  # the audio between windows would go unscored, and a window could start past the end
            raise ConfigError(f"scoring.hop_seconds ({hop:g}) must be at most the window ({window:g} s"
                              f"{'' if sc.window_seconds else ', the model chunk'})")
        return cls(method=p.inference_chunk_method, window_seconds=float(window), hop_seconds=float(hop),
                   read_seconds=max(sc.read_seconds, window), threshold=p.probability_threshold,
                   batch_size=sc.batch_size, shard_files=sc.shard_files, onset_detection=sc.onset_detection,
                   mixed_precision=cfg.environment.mixed_precision_inference, actors=sc.actors,
                   onset_threshold_db=sc.onset_threshold_db)

    def plan(self, path: str, duration: float) -> list[dict]:
        """The chunks of a file under these settings (`windows.plan_chunks`)."""
        return plan_chunks(path, duration, window_seconds=self.window_seconds, hop_seconds=self.hop_seconds,
                           read_seconds=self.read_seconds)


def scoring_config(model_location: str, overrides: list[str]) -> Config:
    """The settings scoring uses: the training run's resolved config.yaml when MODEL is a run, else the
    defaults, with --set overrides on top."""
    from gunsound.config import config_with_overrides, parse_config_yaml

    data: dict = {}
    source = f"the default settings (no config.yaml beside {model_location})"
    # Absolute first: `fold_0` named from inside the run's folder is that run's fold, and its config.yaml one up.
    location = storage.absolute(model_location).rstrip("/")
    for folder in dict.fromkeys([location, location.rsplit("/", 1)[0], location.rsplit("/", 2)[0]]):
        if storage.exists(found := storage.join(folder, "config.yaml")):
            data, source = parse_config_yaml(storage.read_text(found), found), found
            if not data:  # a run writes its resolved settings there: an empty one is cut, not "the defaults"
                raise ConfigError(f"{found}: empty; a run's config.yaml holds the settings it was trained with")
            break
    saved_scoring = data.get("scoring") or {}
    if isinstance(saved_scoring, dict) and "chunk_seconds" in saved_scoring:  # before it was named read_seconds
        saved_scoring.setdefault("read_seconds", saved_scoring.pop("chunk_seconds"))
    log.info("scoring settings: %s", source)
    return config_with_overrides(data, source, overrides)[0]


def read_headers(paths: list[str]) -> dict[str, tuple[float, str]]:
    """Per file: (duration, "") or (duration or NaN, why it cannot be scored), headers read in threads."""

    def one(path: str) -> tuple[str, tuple[float, str]]:
        try:
            info = audio.info(path)
        except Exception as exc:  # whatever one file raises is that file's error row
            reason = exc.reason if isinstance(exc, audio.AudioError) else f"unreadable audio: {_described(exc)}"
            return path, (float("nan"), reason)
        if info.frames <= 0:
            return path, (0.0, "empty: no samples")
        return path, (info.duration, "")

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(pool.map(one, paths))


def _described(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _read_chunk(path: str, chunk: dict, *, sample_rate: int, window: int, onset_detection: bool,
                onset_threshold_db: float) -> tuple[np.ndarray, np.ndarray, str, np.ndarray]:
    """One chunk's windows (zero-padded at the end), the onsets it owns, its error ("" when read) and its wave."""
    starts = np.asarray(chunk["starts"], dtype=float)
    read_start = float(chunk["read_start"])
    try:
        wave, _ = audio.read(path, sample_rate, start=read_start, duration=float(chunk["read_end"]) - read_start)
        error = ""
    except Exception as exc:  # whatever one file raises is that file's error row, never a failed task
        error = str(exc) if isinstance(exc, audio.AudioError) else f"{path}: cannot decode audio: {_described(exc)}"
        wave = np.zeros(0, dtype=np.float32)
    onsets = np.zeros(0)
    if onset_detection and not error:
        onsets = _chunk_shots(wave, chunk, sample_rate=sample_rate, threshold_db=onset_threshold_db)
    return (cut_windows(wave, sample_rate, read_start, starts, window), np.asarray(onsets, dtype=np.float64), error,
            wave)


def _chunk_shots(wave: np.ndarray, chunk: dict, *, sample_rate: int, threshold_db: float) -> np.ndarray:
    """The shots (seconds in the file) that a read chunk owns, from its plan (`onsets.chunk_onsets`)."""
    return chunk_onsets(wave, sample_rate, read_start=float(chunk["read_start"]),
                        owned_start=float(chunk["starts"][0]), owned_end=float(chunk["owned_end"]),
                        threshold_db=threshold_db)


class _WindowRows:
    """Window rows gathered column by column; the chunk's onsets ride on its first window's row."""

    def __init__(self, window: int, extra: tuple[str, ...] = ()):
        self.window = window
        self.columns: dict[str, list] = {k: [] for k in ("path", "index", "start", "end", "error", "onsets",
                                                          *extra)}
        self.waves: list[np.ndarray] = []

    def add(self, path: str, chunk: dict, pieces: np.ndarray, onsets: np.ndarray, error: str, window_seconds: float,
            **extra) -> None:
        duration, first = float(chunk["duration"]), int(chunk["first_window"])
        for j, start in enumerate(chunk["starts"]):
            c = self.columns
            c["path"].append(path)
            c["index"].append(first + j)
            c["start"].append(start)
            c["end"].append(min(start + window_seconds, duration))
            c["error"].append(error)
            c["onsets"].append(onsets if j == 0 else _NO_ONSETS)
            for k, v in extra.items():
                c[k].append(v)
        self.waves.append(pieces)

    def marker(self, path: str, error: str, **extra) -> None:
        """The one row of a file that has no windows: index -1, its header's error."""
        c = self.columns
        for k, v in (("path", path), ("index", -1), ("start", np.nan), ("end", np.nan), ("error", error),
                     ("onsets", _NO_ONSETS), *extra.items()):
            c[k].append(v)
        self.waves.append(np.zeros((1, self.window), dtype=np.float32))

    def batch(self) -> dict[str, np.ndarray]:
        c = self.columns
        onset_column = np.empty(len(c["onsets"]), dtype=object)  # one float64 array per row, of any length
        onset_column[:] = c["onsets"]
        out = {"path": np.array(c["path"], dtype=object), "error": np.array(c["error"], dtype=object),
               "onsets": onset_column,
               "wave": np.concatenate(self.waves) if self.waves else np.zeros((0, self.window), np.float32),
               "start": np.array(c["start"], dtype=np.float64), "end": np.array(c["end"], dtype=np.float64),
               "index": np.array(c["index"], dtype=np.int64)}
        for k in c.keys() - out.keys():
            out[k] = np.array(c[k], dtype=np.float64 if k == "duration" else np.int64)
        return out


_NO_ONSETS = np.zeros(0, dtype=np.float64)


def read_chunks(batch: dict[str, np.ndarray], *, sample_rate: int, window_seconds: float, onset_detection: bool,
                onset_threshold_db: float, s3: storage.S3Settings) -> dict[str, np.ndarray]:
    """Read each chunk's frame range once and cut it into its windows (zero-padded at the end).
    One row per window; the chunk's onsets (float64 seconds in the file) ride on its first window's row."""
    storage.configure_s3(s3.endpoint_url, s3.region)
    window = int(round(window_seconds * sample_rate))
    rows = _WindowRows(window)
    for i, path in enumerate(batch["path"]):
        chunk = {k: batch[k][i] for k in ("starts", "read_start", "read_end", "owned_end", "duration", "hop",
                                          "first_window")}
        pieces, onsets, error, _ = _read_chunk(str(path), chunk, sample_rate=sample_rate, window=window,
                                               onset_detection=onset_detection,
                                               onset_threshold_db=onset_threshold_db)
        rows.add(path, chunk, pieces, onsets, error, window_seconds)
    return rows.batch()


def plan_shards(batch: dict[str, np.ndarray], *, window_seconds: float, hop_seconds: float, read_seconds: float,
                batch_windows: int, s3: storage.S3Settings) -> dict[str, np.ndarray]:
    """The pipeline's first stage: read the headers of a shard's files (threads; or take them from the unit's
    `headers`, JSON, where the driver read them), plan their chunks and pack them into read groups of about
    `batch_windows` windows (`windows.pack_chunks`). A shard is planned by `parts`
    units of work, each keeping every `parts`-th group from its `part` on, so a long file's chunks are shared
    out among as many scorers. One row per group, with its shard and the rows the whole shard yields (a window
    each, one for a file that cannot be scored): the driver tracks shards, not files."""
    storage.configure_s3(s3.endpoint_url, s3.region)
    out: dict[str, list] = {"shard": [], "shard_rows": [], "chunks": []}
    known = batch["headers"] if "headers" in batch else [""] * len(batch["shard"])
    for shard, part, parts, paths, read in zip(batch["shard"], batch["part"], batch["parts"], batch["paths"], known,
                                               strict=True):
        paths = [str(p) for p in paths]
        # A unit may carry the headers the driver read already (a small run: see _pool_size).
        headers = {p: (float(d), str(e)) for p, (d, e) in json.loads(read).items()} if read else read_headers(paths)
        chunks: list[dict] = []
        for path in paths:
            duration, error = headers[path]
            if error:  # the file's one row carries the reason
                chunks.append({"path": path, "duration": duration, "error": error, "starts": []})
            else:
                chunks.extend(plan_chunks(path, duration, window_seconds=window_seconds, hop_seconds=hop_seconds,
                                          read_seconds=read_seconds))
        expected = sum(max(1, len(c["starts"])) for c in chunks)
        for group in pack_chunks(chunks, batch_windows)[int(part)::int(parts)]:
            out["shard"].append(int(shard))
            out["shard_rows"].append(expected)
            out["chunks"].append(json.dumps(group))
    return {"shard": np.array(out["shard"], dtype=np.int64), "shard_rows": np.array(out["shard_rows"], np.int64),
            "chunks": np.array(out["chunks"], dtype=object)}


def read_groups(batch: dict[str, np.ndarray], *, sample_rate: int, window_seconds: float, onset_detection: bool,
                onset_threshold_db: float, s3: storage.S3Settings,
                pending: list[tuple[int, np.ndarray, dict]] | None = None) -> dict[str, np.ndarray]:
    """CPU task: read the chunks of each read group (`plan_shards`), each frame range once, cut into windows.
    One row per window, with its shard, the shard's row count and the file's duration; a file that cannot be
    scored yields one row with index -1 and its error. With `pending` (a list), shots are not detected here:
    each read chunk's first row, wave and plan go into it, for `detect_where_heard` once its windows are scored."""
    storage.configure_s3(s3.endpoint_url, s3.region)
    window = int(round(window_seconds * sample_rate))
    rows = _WindowRows(window, extra=("shard", "shard_rows", "duration"))
    for shard, expected, group in zip(batch["shard"], batch["shard_rows"], batch["chunks"], strict=True):
        where = {"shard": int(shard), "shard_rows": int(expected)}
        for chunk in json.loads(group):
            path, duration = chunk["path"], float(chunk["duration"])
            if chunk.get("error"):
                rows.marker(path, chunk["error"], duration=duration, **where)
                continue
            pieces, onsets, error, wave = _read_chunk(path, chunk, sample_rate=sample_rate, window=window,
                                                      onset_detection=onset_detection and pending is None,
                                                      onset_threshold_db=onset_threshold_db)
            if pending is not None and onset_detection and not error:
                pending.append((len(rows.columns["path"]), wave, chunk))
            rows.add(path, chunk, pieces, onsets, error, window_seconds, duration=duration, **where)
    return rows.batch()


def detect_where_heard(scored: dict[str, np.ndarray], pending: list[tuple[int, np.ndarray, dict]], *,
                       sample_rate: int, window_seconds: float, threshold: float, onset_threshold_db: float) -> None:
    """The shots of each pending chunk (`read_groups`) onto its first row of `scored`, in place, where they can be
    reported. A shot is reported only where the windows covering it reach `threshold` on average, so only where
    one of them does: a chunk none of whose windows does is not searched, and the outputs are the same. That
    holds unless another chunk's window covers its shots too (a file's later chunk with windows longer than
    their hop); such a chunk is always searched."""
    probs = scored["probs"]
    for row, wave, chunk in pending:
        shared = int(chunk["first_window"]) > 0 and float(chunk["hop"]) < window_seconds
        if shared or np.max(probs[row:row + len(chunk["starts"])]) >= threshold:
            scored["onsets"][row] = _chunk_shots(wave, chunk, sample_rate=sample_rate, threshold_db=onset_threshold_db)


class GroupScorer:
    """A CPU scorer actor that plans, reads and scores its own work: each call takes one unit of a shard,
    plans it into read groups (`plan_shards`), then reads each group (`read_groups`), scores its windows
    (`inference.WindowScorer`) and finds the shots of the chunks where the model heard a gunshot
    (`detect_where_heard`: the others' shots would not be reported), yielding the rows of a group at a time
    without their waveforms. Calls may run
    side by side in threads, one core each: one model and one torch in memory for all of a machine's cores.
    Planning inside the call, not as a stage of its own, means no task ever waits for CPUs the actor holds."""

    def __init__(self, *, plan: dict, read: dict, model_files: list[str], mixed_precision: bool, batch_size: int,
                 threshold: float):
        import torch

        from gunsound.inference import WindowScorer

        torch.set_num_threads(1)
        self.plan, self.read, self.threshold = plan, read, threshold
        self.scorer = WindowScorer(model_files, mixed_precision=mixed_precision, batch_size=batch_size,
                                   s3=read["s3"])

    def __call__(self, unit: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        from gunsound.ray_runtime import return_freed_memory

        groups = plan_shards(unit, **self.plan)
        for i in range(len(groups["chunks"])):
            pending: list[tuple[int, np.ndarray, dict]] = []
            scored = self.scorer(read_groups({k: v[i : i + 1] for k, v in groups.items()}, **self.read,
                                             pending=pending))
            detect_where_heard(scored, pending, sample_rate=self.read["sample_rate"],
                               window_seconds=self.read["window_seconds"], threshold=self.threshold,
                               onset_threshold_db=self.read["onset_threshold_db"])
            yield scored
        return_freed_memory()


def score(model_location: str, input_location: str, output: str, cfg: Config, *,
          overwrite: bool = False, allow_outside: bool = False) -> ScoreSummary:
    """Score every audio file under INPUT with the model and write windows/, files/, events/ to OUTPUT.
    One job at a time writes OUTPUT (`lease`); a rerun resumes only with the same model and settings
    (`fingerprint`), or starts afresh with `overwrite`. A manifest's paths outside its folder are refused
    unless `allow_outside`; entries under INPUT that are not audio get files/ rows with status "skipped"."""
    output = storage.absolute(output)
    storage.configure_s3(cfg.storage.endpoint_url, cfg.storage.region)
    storage.makedirs(output)
    with OutputLease(output, "gunsound score"):
        return _score(model_location, input_location, output, cfg, overwrite, allow_outside)


def _score(model_location: str, input_location: str, output: str, cfg: Config, overwrite: bool,
           allow_outside: bool) -> ScoreSummary:
    import ray

    from gunsound.ray_runtime import init_ray
    from gunsound.resources import calls_per_cpu_scorer, cluster_capacity, scorer_actors

    started = time.perf_counter()
    input_location = storage.absolute(input_location)
    files = model_files(storage.absolute(model_location))
    listing = open_inputs(input_location, allow_outside=allow_outside)
    # Read ahead to the first audio file before OUTPUT is claimed, so that an input without any is refused
    # untouched; the rest of the listing is read as the shards are made.
    head: list[list[tuple[str, str]]] = []
    for page in listing.pages:
        head.append(page)
        if any(not reason for _, reason in page):
            break
    else:
        skipped = sum(len(page) for page in head)
        raise FileNotFoundError(f"input {input_location}: no audio files found"
                                + (f" ({skipped} other entries skipped)" if skipped else ""))
    scope = InputScope(folder=listing.folder) if listing.folder is not None else \
        InputScope(files=frozenset(uri for page in head for uri, reason in page if not reason))
    model = describe_model(files)
    s = ScoringSettings.from_config(cfg, model_chunk_seconds=model.chunk_seconds)
    made = fingerprint.scoring_fingerprint(asdict(s), model_location, model.files)
    fingerprint.claim(output, made, overwrite=overwrite, owned=SCORING_OUTPUTS)
    init_ray(cfg.environment.ray_address, feature_tasks=False)
    ray.data.DataContext.get_current().enable_progress_bars = True
    earlier = resume(output, scope)
    run_id = uuid.uuid4().hex[:8]
    # Sized against what the cluster may hold (its autoscaler's node types), so a cluster whose GPU workers
    # scale from zero still gets GPU scorers. Without GPUs planning fuses into the scorer actors (both take the
    # same CPUs): a scoring call per CPU keeps every core scoring and leaves no task waiting for a CPU.
    capacity = cluster_capacity()
    actors, gpus_per_actor = scorer_actors(device=cfg.environment.device, actors=s.actors, capacity=capacity)
    gpus = gpus_per_actor > 0
    log.info("scoring asks for up to %d scorer(s) of %s (environment.device %s; cluster %s)", actors,
             f"{gpus_per_actor:g} GPU" if gpus else "1 CPU", cfg.environment.device, capacity.describe())
    # The input is cut into shards of file names as it is listed, a page at a time. The first shards stay here
    # until the pool is sized (a small run reads their headers to size it); every later
    # one goes into the object store as it is made, so the driver holds a reference per shard, not the files.
    pages = itertools.chain(head, listing.pages)
    if listing.folder is not None and output.startswith(listing.folder + "/"):
        # OUTPUT inside the input folder: its own parts are not inputs (nor skipped entries).
        pages = ([entry for entry in page if not entry[0].startswith(output + "/")] for page in pages)
    listed = _list_shards(pages, done=earlier.done, retry=earlier.retried,
                          shard_files=s.shard_files, hold=actors, skipped=lambda entries, part: _commit_skipped(
                              output, f"{run_id}-skipped-{part:05d}", entries, model.classes, s))
    del head
    take_out_errors(output, listed.retried)
    log.info("scoring %d file(s) (%d already finished) with %d model(s); %s windows of %gs, hop %gs",
             listed.files - listed.finished, listed.finished, len(model.files), s.method, s.window_seconds,
             s.hop_seconds)
    # One dataset for the whole run, so the scorer actors load the model (and start CUDA) once. Headers are
    # read and chunks planned inside the pipeline, a shard at a time, so the first windows are scored while
    # later headers are still unread. Each row carries its shard and the shard's row count; the driver holds
    # the shards in flight and commits each as its last row comes out.
    committer = ShardCommitter(output, run_id, model.classes, shards=listed.shards, window_seconds=s.window_seconds,
                               method=s.method, threshold=s.threshold)
    model_seconds, pool, calls, scorer_actors, devices, scorers = 0.0, 0, 1, 0, set(), set()
    if listed.shards:
        held = [p for paths in listed.held for p in paths]
        pool, known = _pool_size(held, actors, s) if not listed.blocks else (actors, {})
        if pool < actors:
            log.info("a small run: %d scorer(s), one per read group, instead of %d", pool, actors)
        s3 = storage.current_settings()
        # A run of fewer shards than scorers (a few long files) plans each shard in several units (at most 8),
        # each keeping its share of the read groups, so a long file is scored by every actor; a larger archive
        # keeps its scorers busy with whole shards. Either way each header is read once: by the driver where
        # it sized the pool from the files' chunks (a small run) or where a shard has several units (so that
        # they plan from the same headers), else by the shard's planner.
        parts = _planning_parts(pool, listed.shards)
        if parts > 1 and not known:  # every unit of a shard plans from the same headers, read once
            known = read_headers(held)
        held_units = [_unit_block([(k, j, parts, paths, json.dumps({p: known[p] for p in paths}) if known else "")])
                      for k, paths in enumerate(listed.held) for j in range(parts)]
        ds = ray.data.from_arrow_refs(held_units + listed.blocks)
        del held, held_units
        plan = {"window_seconds": s.window_seconds, "hop_seconds": s.hop_seconds, "read_seconds": s.read_seconds,
                "batch_windows": s.batch_size, "s3": s3}
        read = {"sample_rate": model.sample_rate, "window_seconds": s.window_seconds,
                "onset_detection": s.onset_detection, "onset_threshold_db": s.onset_threshold_db, "s3": s3}
        scorer = {"mixed_precision": s.mixed_precision, "batch_size": s.batch_size}
        if gpus:
            from gunsound.inference import WindowScorer

            scorer_actors = pool
            # Planning and read tasks on the CPUs feed GPU scorers model batches; the pool grows with the
            # backlog, and its requests bring GPU nodes up. Each actor loads the model from its files.
            ds = ds.map_batches(plan_shards, batch_size=1, batch_format="numpy", num_cpus=1, fn_kwargs=plan)
            ds = ds.map_batches(read_groups, batch_size=1, batch_format="numpy", num_cpus=1, fn_kwargs=read)
            ds = ds.map_batches(WindowScorer, batch_size=s.batch_size, batch_format="numpy",
                                fn_constructor_kwargs={"model": model.files, "s3": s3, **scorer},
                                num_gpus=gpus_per_actor, num_cpus=1,
                                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool))
        else:
            # On CPUs each scorer plans and reads its units itself, one per call: no task waits for a CPU that
            # the actors hold, and a group's waveforms never leave the call that scores them. A unit is handed
            # to a scoring call only when one is free: queued behind a busy one, a long file's half would wait
            # while another call idles. On one machine, one actor takes every CPU and scores in as many threads.
            calls = calls_per_cpu_scorer(pool, capacity)
            scorer_actors = pool // calls
            ds = ds.map_batches(GroupScorer, batch_size=1, batch_format="numpy",
                                fn_constructor_kwargs={"plan": plan, "read": read, "model_files": model.files,
                                                       "threshold": s.threshold, **scorer},
                                num_cpus=calls,
                                compute=ray.data.ActorPoolStrategy(size=scorer_actors,
                                                                   max_tasks_in_flight_per_actor=calls,
                                                                   max_concurrent_calls_per_actor=calls,
                                                                   enable_true_multi_threading=calls > 1))
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            model_seconds += float(batch.pop("model_seconds").sum())
            devices.update(batch.pop("device"))
            scorers.update(batch.pop("scorer"))
            committer.add(batch)
    committer.finish()
    log.info("%d shard(s) committed; the driver held at most %d at once", len(committer.committed),
             committer.peak_open)
    return write_summary(output, scope, skipped=listed.finished, started=started, model_seconds=model_seconds,
                         scorer_actors=scorer_actors, calls_per_actor=calls, devices=sorted(devices), retried=len(listed.retried),
                         model=made.model, settings=made.settings, scorers=sorted(scorers),
                         skipped_entries=listed.skipped, scored_seconds=committer.audio_seconds)


@dataclass
class _Listed:
    """An input cut into shards as it was listed."""

    held: list[list[str]] = field(default_factory=list)  # the first shards' files (at most `hold` shards)
    blocks: list = field(default_factory=list)  # the later shards' units, in the object store
    shards: int = 0
    files: int = 0  # audio files listed
    finished: int = 0  # of them, committed by earlier runs
    retried: set[str] = field(default_factory=set)  # of them, with an error row from an earlier run: again
    skipped: int = 0  # other entries (not audio)


def _unit_block(units: list[tuple[int, int, int, list[str], str]]):
    """Planning units (shard, part, parts, paths, headers JSON) as one Arrow block in the object store."""
    import pyarrow as pa
    import ray

    shard, part, parts, paths, headers = zip(*units, strict=True)
    return ray.put(pa.table({"shard": pa.array(shard, pa.int64()), "part": pa.array(part, pa.int64()),
                             "parts": pa.array(parts, pa.int64()), "paths": pa.array(paths, pa.list_(pa.string())),
                             "headers": pa.array(headers, pa.string())}))


def _list_shards(pages: Iterable[list[tuple[str, str]]], *, done: set[str], retry: set[str], shard_files: int,
                 hold: int, skipped: Callable[[dict[str, str], int], None]) -> _Listed:
    """Cut listed entries (`inputs.open_inputs`) into shards of `shard_files` audio files not in `done`, page
    by page. The first `hold` shards are kept; each later one goes into the object store at once, as one
    planning unit per block (several per block past SMALL_BLOCKS, so a huge archive is not millions of tiny
    objects). Listed files in `retry` are noted. Entries that are not audio and not in `done` are handed to
    `skipped` with a part number, SKIPPED_PART_ENTRIES at a time and the rest at the end."""
    listed = _Listed()
    pending: list[tuple[int, int, int, list[str], str]] = []
    files: list[str] = []
    others: dict[str, str] = {}
    parts = 0

    def close(paths: list[str]) -> None:
        if len(listed.held) < hold:
            listed.held.append(paths)
        else:
            pending.append((listed.shards, 0, 1, paths, ""))
            if len(pending) >= (1 if len(listed.blocks) < SMALL_BLOCKS else UNITS_PER_BLOCK):
                listed.blocks.append(_unit_block(pending))
                pending.clear()
        listed.shards += 1

    for page in pages:
        for uri, reason in page:
            if reason:
                listed.skipped += 1
                if uri not in done:
                    others[uri] = reason
                continue
            listed.files += 1
            if uri in done:
                listed.finished += 1
                continue
            if uri in retry:
                listed.retried.add(uri)
            files.append(uri)
            if len(files) == shard_files:
                close(files)
                files = []
        if len(others) >= SKIPPED_PART_ENTRIES:
            skipped(others, parts)
            others, parts = {}, parts + 1
    if files:
        close(files)
    if pending:
        listed.blocks.append(_unit_block(pending))
    if others:
        skipped(others, parts)
    return listed


def _planning_parts(scorers: int, shards: int) -> int:
    """Units of work per shard: enough for every scorer to have one, at most 8 (each reads the shard's headers)."""
    return max(1, min(8, -(-scorers // max(shards, 1))))


def _pool_size(todo: list[str], actors: int, s: ScoringSettings) -> tuple[int, dict[str, tuple[float, str]]]:
    """Scorer actors for this run (the whole of it, listed): `actors`, or as many as it has read groups where
    that is fewer (one long file still gets every actor; a few dozen short files get one, not an actor start
    and on a cluster a node each for a second of work); with the headers read to size it. A run too large to
    have fewer groups than actors, or with more than SIZING_HEADERS files, gets `actors` without a read."""
    if len(todo) > min(actors * s.batch_size, SIZING_HEADERS):
        return actors, {}
    headers = read_headers(todo)
    chunks = [c for f in todo if not headers[f][1] for c in s.plan(f, headers[f][0])]
    return max(1, min(actors, len(pack_chunks(chunks, s.batch_size)))), headers


def _commit_skipped(output: str, name: str, skipped: dict[str, str], classes: list[str],
                    s: ScoringSettings) -> None:
    """One files/ row per entry that is not scored (status "skipped", the reason in `error`), committed at once
    as the part `part-NAME.parquet`."""
    if not skipped:
        return
    log.info("%d entries under the input are not audio this reader takes: skipped (see files/)", len(skipped))
    commit_shard(output, f"part-{name}.parquet", list(skipped),
                 {p: (float("nan"), f"{SKIPPED}{why}") for p, why in skipped.items()},
                 pd.DataFrame(columns=WINDOW_COLUMNS), classes, window_seconds=s.window_seconds, method=s.method,
                 threshold=s.threshold)


def predict_file(model: ScoringModel, path: str, cfg: Config) -> tuple[dict, list[dict], pd.DataFrame]:
    """Score one file in this process (no Ray): the same header read, chunk plan, reader, scorer and summary as
    the job, and the row it commits (`shards.commit_shard`): a file it cannot plan (no samples, an unreadable
    header) or read is an error row without windows, a file shorter than a window gets its note."""
    from gunsound.inference import WindowScorer

    s = ScoringSettings.from_config(cfg, model_chunk_seconds=model.chunk_seconds)
    summary = {"method": s.method, "threshold": s.threshold, "window_seconds": s.window_seconds}
    duration, error = read_headers([path])[path]
    if error:
        none = pd.DataFrame(columns=WINDOW_COLUMNS)
        row, _ = summarize_file(path, duration, none, np.zeros(0), model.classes, **summary, error=error)
        return row, [], none
    scorer = WindowScorer(model, mixed_precision=s.mixed_precision, batch_size=s.batch_size,
                          device=cfg.environment.device)
    rows = []
    for chunk in s.plan(path, duration):
        batch = {k: np.array([v], dtype=object) for k, v in chunk.items()}
        cut = read_chunks(batch, sample_rate=model.features.sample_rate, window_seconds=s.window_seconds,
                          onset_detection=s.onset_detection, onset_threshold_db=s.onset_threshold_db,
                          s3=storage.current_settings())
        probs = scorer(cut)["probs"]
        for j in range(len(probs)):
            rows.append({"path": path, "index": int(cut["index"][j]), "start": float(cut["start"][j]),
                         "end": float(cut["end"][j]), "error": cut["error"][j], "onsets": cut["onsets"][j],
                         "probs": probs[j]})
    windows = pd.DataFrame(rows)
    failed = next((e for e in windows["error"] if e), "")
    if failed:  # no windows in its row, as the job commits it
        row, _ = summarize_file(path, duration, windows.iloc[0:0], np.zeros(0), model.classes, **summary,
                                error=f"decode failed: {failed}")
        return row, [], windows
    row, events = summarize_file(path, duration, windows, all_onsets(windows["onsets"]), model.classes, **summary)
    return row, events, windows
