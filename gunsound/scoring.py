"""Offline scoring of audio archives on Ray: the job (`score`) and one file without Ray (`predict_file`).

Every input file is planned into chunks of windows (`windows`); decoding and onset detection (`events`) run
as CPU tasks that read one chunk each, and the model (`inference.WindowScorer`) in an actor pool (a GPU each
and autocast where GPUs are used, `resources.scorer_actors`), one pool for the whole run. Files are grouped in shards; a shard's results
are committed to OUTPUT as soon as its last window is scored (`shards`), so a killed job started again with
the same OUTPUT skips the files it finished, scores again those whose rows are errors, and ends with each
file exactly once. It resumes only with the same model and settings (`fingerprint`), and one job at a time
writes an OUTPUT (`lease`).

Outputs (Parquet datasets under OUTPUT): windows/ (file, start, end, prob_<class>), files/ (one row per
input file: status, duration, top class, per-class max and mean, shots), events/ (one row per detected shot:
time, class, probability, burst, rate of fire), summary.json (with the model and settings), fingerprint.json,
and lease.json while a job runs.
"""

from __future__ import annotations

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
from gunsound.windows import cut_windows, plan_chunks

log = logging.getLogger(__name__)

__all__ = ["InputManifestError", "Inputs", "ScoringSettings", "list_inputs", "predict_file", "read_chunks", "score",
           "scoring_config"]

# What scoring writes into its OUTPUT: all that --overwrite removes there.
SCORING_OUTPUTS = ("files", "windows", "events", "summary.json")
# Chunks are the input blocks, one each up to this many (so every CPU reads); beyond it a block holds several
# chunks, still read one at a time, and the driver does not track millions of tiny objects.
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


def read_chunks(batch: dict[str, np.ndarray], *, sample_rate: int, window_seconds: float, onset_detection: bool,
                onset_threshold_db: float, s3: storage.S3Settings) -> dict[str, np.ndarray]:
    """CPU task: read each chunk's frame range once and cut it into its windows (zero-padded at the end).
    One row per window; the chunk's onsets (float64 seconds in the file) ride on its first window's row."""
    storage.configure_s3(s3.endpoint_url, s3.region)
    window = int(round(window_seconds * sample_rate))
    out: dict[str, list] = {k: [] for k in ("path", "index", "start", "end", "wave", "error", "onsets")}
    for i, path in enumerate(batch["path"]):
        starts = np.asarray(batch["starts"][i], dtype=float)
        read_start, duration = float(batch["read_start"][i]), float(batch["duration"][i])
        try:
            wave, _ = audio.read(str(path), sample_rate, start=read_start,
                                 duration=float(batch["read_end"][i]) - read_start)
            error = ""
        except Exception as exc:  # whatever one file raises is that file's error row, never a failed task
            error = str(exc) if isinstance(exc, audio.AudioError) else f"{path}: cannot decode audio: {_described(exc)}"
            wave = np.zeros(0, dtype=np.float32)
        onsets = np.zeros(0)
        if onset_detection and not error:
            onsets = chunk_onsets(wave, sample_rate, read_start=read_start, starts=starts,
                                  hop=float(batch["hop"][i]), duration=duration, threshold_db=onset_threshold_db)
        pieces = cut_windows(wave, sample_rate, read_start, starts, window)
        for j, start in enumerate(starts):
            out["path"].append(path)
            out["index"].append(int(batch["first_window"][i]) + j)
            out["start"].append(start)
            out["end"].append(min(start + window_seconds, duration))
            out["wave"].append(pieces[j])
            out["error"].append(error)
            out["onsets"].append(np.asarray(onsets if j == 0 else np.zeros(0), dtype=np.float64))
    onset_column = np.empty(len(out["onsets"]), dtype=object)  # one float64 array per row, of any length
    onset_column[:] = out["onsets"]
    return {"path": np.array(out["path"], dtype=object), "error": np.array(out["error"], dtype=object),
            "onsets": onset_column,
            "wave": np.stack(out["wave"]).astype(np.float32) if out["wave"] else np.zeros((0, window), np.float32),
            "start": np.array(out["start"], dtype=np.float64), "end": np.array(out["end"], dtype=np.float64),
            "index": np.array(out["index"], dtype=np.int64)}


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
    headers = read_headers(todo)
    chunks = [c for f in todo if not headers[f][1] for c in s.plan(f, headers[f][0])]
    # One dataset for the whole run, so the scorer actors load the model (and start CUDA) once; each shard is
    # committed as soon as the last of its windows comes out, which keeps resume at shard granularity.
    committer = ShardCommitter(output, run_id, todo, headers, chunks, model.classes, shard_files=s.shard_files,
                               window_seconds=s.window_seconds, method=s.method, threshold=s.threshold)
    model_seconds, pool, devices, scorers = 0.0, 0, set(), set()
    if chunks:
        pool = min(actors, len(chunks))  # no idle actor for a run of few chunks
        ds = ray.data.from_items(chunks, override_num_blocks=min(len(chunks), MAX_INPUT_BLOCKS))
        ds = ds.map_batches(read_chunks, batch_size=1, batch_format="numpy", num_cpus=1,
                            fn_kwargs={"sample_rate": model.features.sample_rate,
                                       "window_seconds": s.window_seconds, "onset_detection": s.onset_detection,
                                       "onset_threshold_db": s.onset_threshold_db,
                                       "s3": storage.current_settings()})
        # Without GPUs the read stage fuses into the actors, where a batch size would bundle that many
        # chunks into one call (one actor would score a whole hour); one chunk per call instead.
        ds = ds.map_batches(WindowScorer, batch_size=s.batch_size if gpus else None, batch_format="numpy",
                            fn_constructor_kwargs={"model": model, "mixed_precision": s.mixed_precision,
                                                   "batch_size": s.batch_size},
                            num_gpus=gpus_per_actor, num_cpus=1,
                            # GPU scorers: a pool that grows with the backlog, its requests bring GPU nodes up.
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool) if gpus else
                            ray.data.ActorPoolStrategy(size=pool))
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            model_seconds += float(batch["model_seconds"].sum())
            devices.update(batch["device"])
            scorers.update(batch["scorer"])
            committer.add(batch.drop(columns=["model_seconds", "device", "scorer"]))
    committer.finish()
    return write_summary(output, files, skipped=len(files) - len(todo), started=started,
                         model_seconds=model_seconds, scorer_actors=pool, devices=sorted(devices),
                         retried=len(earlier.retried), model=made.model, settings=made.settings,
                         scorers=sorted(scorers), skipped_entries=len(inputs.skipped))


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
