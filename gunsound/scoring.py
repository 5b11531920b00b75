"""Offline scoring of audio archives on Ray: the job (`score`) and one file without Ray (`predict_file`).

The driver lists the input and hands the pipeline shards of file names; headers are read and every file
planned into chunks of windows (`windows`) inside the pipeline, a shard at a time (`plan_shards`), so the
first shard is scored while later headers are unread. Chunks are packed into read groups of about a model
batch of windows, from as many short files as it takes; decoding and onset detection (`events`) read a group
per call (`read_groups`), and the model (`inference.WindowScorer`) scores it in an actor pool (a GPU each and
autocast where GPUs are used, `resources.scorer_actors`; on CPUs each actor reads what it scores,
`GroupScorer`), one pool for the whole run. Every row names its shard and the shard's row count, so the driver
holds only the shards in flight; a shard's results are committed to OUTPUT as soon as its last row is scored
(`shards`), so a killed job started again with the same OUTPUT skips the files it finished, scores again those
whose rows are errors, and ends with each file exactly once. It resumes only with the same model and settings
(`fingerprint`), and one job at a time writes an OUTPUT (`lease`).

Outputs (Parquet datasets under OUTPUT): windows/ (file, start, end, prob_<class>), files/ (one row per
input file: status, duration, top class, per-class max and mean, shots), events/ (one row per detected shot:
time, class, probability, burst, rate of fire), summary.json (with the model and settings), fingerprint.json,
and lease.json while a job runs.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from gunsound import audio, fingerprint, storage
from gunsound.config import Config, ConfigError
from gunsound.events import chunk_onsets, summarize_file
from gunsound.inference import ScoringModel, WindowScorer, load_scoring_model
from gunsound.lease import OutputLease
from gunsound.shards import (
    SKIPPED,
    WINDOW_COLUMNS,
    ScoreSummary,
    ShardCommitter,
    all_onsets,
    commit_shard,
    resume,
    write_summary,
)
from gunsound.windows import cut_windows, pack_chunks, plan_chunks

log = logging.getLogger(__name__)

__all__ = ["GroupScorer", "InputManifestError", "Inputs", "ScoringSettings", "list_inputs", "plan_shards",
           "predict_file", "read_chunks", "read_groups", "score", "scoring_config"]

# What scoring writes into its OUTPUT: all that --overwrite removes there.
SCORING_OUTPUTS = ("files", "windows", "events", "summary.json")
# Shards are the input blocks, one each up to this many; beyond it a block holds several shards, still planned
# one at a time, and the driver does not track millions of tiny objects.
MAX_INPUT_BLOCKS = 20_000


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
    import yaml

    from gunsound.config import apply_overrides, config_from_dict

    data: dict = {}
    location = model_location.rstrip("/")
    for folder in dict.fromkeys([location, location.rsplit("/", 1)[0], location.rsplit("/", 2)[0]]):
        if storage.exists(storage.join(folder, "config.yaml")):
            data = yaml.safe_load(storage.read_text(storage.join(folder, "config.yaml")))
            break
    saved_scoring = data.get("scoring") or {}
    if "chunk_seconds" in saved_scoring:  # a run resolved before the key was renamed scoring.read_seconds
        saved_scoring.setdefault("read_seconds", saved_scoring.pop("chunk_seconds"))
    return config_from_dict(apply_overrides(data, overrides), f"{model_location}/config.yaml")


@dataclass(frozen=True)
class Inputs:
    """What an input location holds: the audio files to score, and every other entry under it with the reason
    it is not scored (another format, a folder named like audio, a broken link)."""

    files: list[str]
    skipped: dict[str, str] = field(default_factory=dict)


class InputManifestError(ValueError):
    """A scoring manifest with bad rows; the message names the manifest and every bad row."""


def _is_audio_name(uri: str) -> bool:
    """Named with an extension libsndfile reads, or with none (S3 keys often have none)."""
    name = uri.rsplit("/", 1)[-1].lower()
    return name.endswith(audio.AUDIO_EXTENSIONS) or "." not in name


def _not_audio(uri: str) -> str:
    return f"not an audio format libsndfile reads (.{uri.rsplit('/', 1)[-1].rsplit('.', 1)[-1]})"


def _manifest_location(base: str, text: str) -> str:
    """A manifest's path cell as a location: relative ones under the manifest's folder, others as they are."""
    if "://" in text or text.startswith(("/", "\\")):
        return text
    rel = text.replace("\\", "/")
    if storage.is_s3(base):
        return "s3://" + posixpath.normpath(posixpath.join(base[len("s3://"):], rel))
    if storage.is_local(base):
        return os.path.normpath(os.path.join(base, rel))
    return storage.join(base, posixpath.normpath(rel))


def _manifest_inputs(location: str, allow_outside: bool) -> Inputs:
    with storage.open_input(location) as f:
        if location.lower().endswith(".csv"):  # as text (NA and 0012 are names), a blank line an empty row
            frame = pd.read_csv(f, dtype=str, keep_default_na=False, skip_blank_lines=False)
        else:
            frame = pd.read_parquet(f)
    if "path" not in frame.columns:
        raise InputManifestError(f"{location}: a scoring manifest needs a 'path' column; its columns are "
                                 f"{list(frame.columns)}")
    base = location.rsplit("/", 1)[0] if "/" in location else "."
    files, seen, problems = [], {}, []
    for row, cell in enumerate(frame["path"]):
        text = cell.strip() if isinstance(cell, str) else "" if pd.api.types.is_scalar(cell) and pd.isna(cell) \
            else str(cell).strip()
        if not text:
            problems.append(f"row {row}: empty path")
            continue
        if storage.escapes_folder(text) and not allow_outside:
            problems.append(f"row {row}: {text!r} is outside the manifest's folder (absolute, a URI or ../); "
                            "allow locations outside it to score it (--allow-outside)")
            continue
        path = _manifest_location(base, text)
        if path in seen:
            problems.append(f"row {row}: {text!r} is listed again (first in row {seen[path]})")
            continue
        seen[path] = row
        files.append(path)
    if problems:
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise InputManifestError(f"{location}: {len(problems)} bad row(s) (rows count from 0):\n  "
                                 + "\n  ".join(problems[:50]) + more)
    return Inputs(files)


def list_inputs(location: str, *, allow_outside: bool = False) -> Inputs:
    """Audio files under a folder or prefix, inside a zip, in a manifest's `path` column, or one file; with
    everything else under a folder as skipped, with the reason.

    A manifest's (CSV or Parquet) paths are relative to its folder, as training's are; absolute paths, URIs
    and ../ are refused unless `allow_outside`.
    """
    lower = location.lower()
    if lower.endswith(".zip"):
        location, lower = storage.zip_location(location), ""
    if lower.endswith((".csv", ".pq", ".parquet")):
        return _manifest_inputs(location, allow_outside)
    entry = storage.file_info(location)
    if entry.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {location} does not exist")
    if entry.type == pafs.FileType.File:
        return Inputs([location]) if _is_audio_name(location) else Inputs([], {location: _not_audio(location)})
    files, skipped = [], {}
    for uri, info in storage.list_entries(location):
        if info.type == pafs.FileType.File:
            if _is_audio_name(uri):
                files.append(uri)
            else:
                skipped[uri] = _not_audio(uri)
        elif info.type == pafs.FileType.Directory:
            if uri.lower().endswith(audio.AUDIO_EXTENSIONS):
                skipped[uri] = "a folder named like an audio file (the files in it are listed on their own)"
        else:
            skipped[uri] = "not a readable file (a broken link?)"
    return Inputs(files, skipped)


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
                onset_threshold_db: float) -> tuple[np.ndarray, np.ndarray, str]:
    """One chunk's windows (zero-padded at the end), the onsets it owns and its error ("" when read)."""
    starts = np.asarray(chunk["starts"], dtype=float)
    read_start, duration = float(chunk["read_start"]), float(chunk["duration"])
    try:
        wave, _ = audio.read(path, sample_rate, start=read_start, duration=float(chunk["read_end"]) - read_start)
        error = ""
    except Exception as exc:  # whatever one file raises is that file's error row, never a failed task
        error = str(exc) if isinstance(exc, audio.AudioError) else f"{path}: cannot decode audio: {_described(exc)}"
        wave = np.zeros(0, dtype=np.float32)
    onsets = np.zeros(0)
    if onset_detection and not error:
        onsets = chunk_onsets(wave, sample_rate, read_start=read_start, starts=starts, hop=float(chunk["hop"]),
                              duration=duration, threshold_db=onset_threshold_db)
    return cut_windows(wave, sample_rate, read_start, starts, window), np.asarray(onsets, dtype=np.float64), error


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
        chunk = {k: batch[k][i] for k in ("starts", "read_start", "read_end", "duration", "hop", "first_window")}
        pieces, onsets, error = _read_chunk(str(path), chunk, sample_rate=sample_rate, window=window,
                                            onset_detection=onset_detection, onset_threshold_db=onset_threshold_db)
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
        # A unit may carry the headers the driver read already (a run of fewer files than scorers).
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
                onset_threshold_db: float, s3: storage.S3Settings) -> dict[str, np.ndarray]:
    """CPU task: read the chunks of each read group (`plan_shards`), each frame range once, cut into windows.
    One row per window, with its shard, the shard's row count and the file's duration; a file that cannot be
    scored yields one row with index -1 and its error."""
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
            pieces, onsets, error = _read_chunk(path, chunk, sample_rate=sample_rate, window=window,
                                                onset_detection=onset_detection,
                                                onset_threshold_db=onset_threshold_db)
            rows.add(path, chunk, pieces, onsets, error, window_seconds, duration=duration, **where)
    return rows.batch()


class GroupScorer:
    """A CPU scorer actor that reads what it scores: each call reads one read group (`read_groups`) and scores
    its windows (`inference.WindowScorer`), returning the rows without their waveforms."""

    def __init__(self, *, read: dict, model: ScoringModel, mixed_precision: bool, batch_size: int):
        self.read = read
        self.scorer = WindowScorer(model, mixed_precision=mixed_precision, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.scorer(read_groups(batch, **self.read))


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
    from gunsound.resources import cluster_capacity, scorer_actors

    started = time.perf_counter()
    input_location = storage.absolute(input_location)
    model = load_scoring_model(model_location)
    s = ScoringSettings.from_config(cfg, model_chunk_seconds=model.chunk_seconds)
    inputs = list_inputs(input_location, allow_outside=allow_outside)
    files = inputs.files
    if not files:
        raise FileNotFoundError(f"input {input_location}: no audio files found"
                                + (f" ({len(inputs.skipped)} other entries skipped)" if inputs.skipped else ""))
    if len(set(files)) != len(files):
        raise ValueError(f"input {input_location}: a file is listed twice")
    made = fingerprint.scoring_fingerprint(asdict(s), model_location, model.sources)
    fingerprint.claim(output, made, overwrite=overwrite, owned=SCORING_OUTPUTS)
    init_ray(cfg.environment.ray_address, feature_tasks=False)
    ray.data.DataContext.get_current().enable_progress_bars = True
    earlier = resume(output, files)
    todo = [f for f in files if f not in earlier.done]
    run_id = uuid.uuid4().hex[:8]
    _commit_skipped(output, run_id, {p: r for p, r in inputs.skipped.items() if p not in earlier.done},
                    model.classes, s)
    log.info("scoring %d file(s) (%d already finished) with %d model(s); %s windows of %gs, hop %gs",
             len(todo), len(files) - len(todo), len(model.artifacts), s.method, s.window_seconds, s.hop_seconds)
    # Sized against what the cluster may hold (its autoscaler's node types), so a cluster whose GPU workers
    # scale from zero still gets GPU scorers. Without GPUs the read stage fuses into the scorer actors (both
    # take one CPU): one actor per CPU keeps every core scoring and leaves no read task waiting.
    capacity = cluster_capacity()
    actors, gpus_per_actor = scorer_actors(device=cfg.environment.device, actors=s.actors, capacity=capacity)
    gpus = gpus_per_actor > 0
    log.info("scoring asks for up to %d scorer actor(s) of %s (environment.device %s; cluster %s)", actors,
             f"{gpus_per_actor:g} GPU" if gpus else "1 CPU", cfg.environment.device, capacity.describe())
    # One dataset for the whole run, so the scorer actors load the model (and start CUDA) once. It starts from
    # shards of file names: headers are read and chunks planned inside the pipeline, a shard at a time, so the
    # first windows are scored while later headers are still unread. Each row carries its shard and the
    # shard's row count; the driver holds the shards in flight and commits each as its last row comes out.
    shards = [todo[i:i + s.shard_files] for i in range(0, len(todo), s.shard_files)]
    committer = ShardCommitter(output, run_id, model.classes, shards=len(shards), window_seconds=s.window_seconds,
                               method=s.method, threshold=s.threshold)
    model_seconds, pool, devices, scorers = 0.0, 0, set(), set()
    if shards:
        pool, known = _pool_size(todo, actors, s)
        s3 = storage.current_settings()
        # A run of fewer shards than scorers (a few long files) plans each shard in several units (at most 8),
        # each keeping its share of the read groups, so a long file is scored by every actor; a larger archive
        # keeps its scorers busy with whole shards. Either way each header is read once: by the driver where
        # it sized the pool from the files' chunks (fewer files than scorers), else by the shard's planner.
        parts = _planning_parts(pool, len(shards))
        units = [{"shard": k, "part": j, "parts": parts, "paths": paths,
                  "headers": json.dumps({p: known[p] for p in paths}) if known else ""}
                 for k, paths in enumerate(shards) for j in range(parts)]
        ds = ray.data.from_items(units, override_num_blocks=min(len(units), MAX_INPUT_BLOCKS))
        # Planning fuses into the next stage: one task (or actor call) per unit.
        ds = ds.map_batches(plan_shards, batch_size=1, batch_format="numpy", num_cpus=1,
                            fn_kwargs={"window_seconds": s.window_seconds, "hop_seconds": s.hop_seconds,
                                       "read_seconds": s.read_seconds, "batch_windows": s.batch_size, "s3": s3})
        read = {"sample_rate": model.features.sample_rate, "window_seconds": s.window_seconds,
                "onset_detection": s.onset_detection, "onset_threshold_db": s.onset_threshold_db, "s3": s3}
        scorer = {"model": model, "mixed_precision": s.mixed_precision, "batch_size": s.batch_size}
        if gpus:
            # Read tasks on the CPUs feed GPU scorers model batches; the pool grows with the backlog, and its
            # requests bring GPU nodes up.
            ds = ds.map_batches(read_groups, batch_size=1, batch_format="numpy", num_cpus=1, fn_kwargs=read)
            ds = ds.map_batches(WindowScorer, batch_size=s.batch_size, batch_format="numpy",
                                fn_constructor_kwargs=scorer, num_gpus=gpus_per_actor, num_cpus=1,
                                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool))
        else:
            # On CPUs each scorer reads its groups itself, one per call: no read task waits for a CPU that the
            # actors hold, and a group's waveforms never leave the call that scores them. A unit is handed to
            # an actor only when it is free: queued behind a busy one, a long file's half would wait while
            # another actor idles.
            ds = ds.map_batches(GroupScorer, batch_size=1, batch_format="numpy",
                                fn_constructor_kwargs={"read": read, **scorer}, num_cpus=1,
                                compute=ray.data.ActorPoolStrategy(size=pool, max_tasks_in_flight_per_actor=1))
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            model_seconds += float(batch.pop("model_seconds").sum())
            devices.update(batch.pop("device"))
            scorers.update(batch.pop("scorer"))
            committer.add(batch)
    committer.finish()
    log.info("%d shard(s) committed; the driver held at most %d at once", len(committer.committed),
             committer.peak_open)
    return write_summary(output, files, skipped=len(files) - len(todo), started=started,
                         model_seconds=model_seconds, scorer_actors=pool, devices=sorted(devices),
                         retried=len(earlier.retried), model=made.model, settings=made.settings,
                         scorers=sorted(scorers), skipped_entries=len(inputs.skipped))


def _planning_parts(scorers: int, shards: int) -> int:
    """Units of work per shard: enough for every scorer to have one, at most 8 (each reads the shard's headers)."""
    return max(1, min(8, -(-scorers // max(shards, 1))))


def _pool_size(todo: list[str], actors: int, s: ScoringSettings) -> tuple[int, dict[str, tuple[float, str]]]:
    """Scorer actors for this run: `actors`, or as many as there are read groups when a run has fewer files
    than that (one long file still gets every actor; a few short files do not start idle ones); with the
    headers read to size it (none when the run has as many files as actors)."""
    if len(todo) >= actors:
        return actors, {}
    headers = read_headers(todo)
    chunks = [c for f in todo if not headers[f][1] for c in s.plan(f, headers[f][0])]
    return max(1, min(actors, len(pack_chunks(chunks, s.batch_size)))), headers


def _commit_skipped(output: str, run_id: str, skipped: dict[str, str], classes: list[str],
                    s: ScoringSettings) -> None:
    """One files/ row per entry that is not scored (status "skipped", the reason in `error`), committed at once."""
    if not skipped:
        return
    log.info("%d entries under the input are not audio this reader takes: skipped (see files/)", len(skipped))
    commit_shard(output, f"part-{run_id}-skipped.parquet", list(skipped),
                 {p: (float("nan"), f"{SKIPPED}{why}") for p, why in skipped.items()},
                 pd.DataFrame(columns=WINDOW_COLUMNS), classes, window_seconds=s.window_seconds, method=s.method,
                 threshold=s.threshold)


def predict_file(model: ScoringModel, path: str, cfg: Config) -> tuple[dict, list[dict], pd.DataFrame]:
    """Score one file in this process (no Ray): the same chunk plan, reader, scorer and summary as the job."""
    s = ScoringSettings.from_config(cfg, model_chunk_seconds=model.chunk_seconds)
    info = audio.info(path)
    scorer = WindowScorer(model, mixed_precision=s.mixed_precision, batch_size=s.batch_size)
    rows = []
    for chunk in s.plan(path, info.duration):
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
    errors = [e for e in windows["error"] if e]
    row, events = summarize_file(path, info.duration, windows, all_onsets(windows["onsets"]), model.classes,
                                 method=s.method, threshold=s.threshold, error=errors[0] if errors else "")
    return row, events, windows
