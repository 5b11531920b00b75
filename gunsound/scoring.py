"""Offline scoring of audio archives with chunked inference.

Plan: every input file is split into chunks (units of work, read as frame ranges) and every chunk into
windows. A window belongs to the chunk where it starts; a chunk reads one window length past its end so
windows at chunk edges are scored once, never lost and never counted twice. Decoding runs as CPU tasks and
the model in an actor pool (a GPU share and autocast when there is a GPU), one pool for the whole run. Files
are grouped in shards; a shard's results are committed to OUTPUT as soon as its last window is scored, so a
killed job started again with the same OUTPUT skips the files it finished and ends with each file exactly
once.

Outputs (Parquet datasets under OUTPUT): windows/ (file, start, end, prob_<class>), files/ (one row per
input file: status, duration, top class, per-class max and mean, shots), events/ (one row per detected shot:
time, class, probability, burst, rate of fire), and summary.json.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.signal import butter, sosfilt

from gunsound import audio, storage
from gunsound.config import ArchitectureConfig, Config, ConfigError
from gunsound.features import FeatureParams, LogMelSpectrogram
from gunsound.model import ModelArtifact, build_model

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the model: one fold or the fold ensemble


class Ensemble(torch.nn.Module):
    """Waveform windows -> per-class probabilities, averaged over the fold models (one front end)."""

    def __init__(self, frontend: LogMelSpectrogram, models: list[torch.nn.Module], loss_function: str):
        super().__init__()
        self.frontend = frontend
        self.models = torch.nn.ModuleList(models)
        self.use_sigmoid = loss_function == "BCE"

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        spec = self.frontend(waves)
        probs = []
        for model in self.models:
            logits = model(spec).float()
            probs.append(torch.sigmoid(logits) if self.use_sigmoid else torch.softmax(logits, dim=1))
        return torch.stack(probs).mean(dim=0)


@dataclass
class ScoringModel:
    classes: list[str]
    features: FeatureParams
    chunk_seconds: float  # the training chunk: the natural window
    loss_function: str
    architecture: dict
    state_dicts: list[dict]
    sources: list[str] = field(default_factory=list)

    def build(self) -> Ensemble:
        models = []
        for state in self.state_dicts:
            model = build_model(ArchitectureConfig(**self.architecture), len(self.classes), pretrained=False)
            model.load_state_dict(state)
            models.append(model.eval())
        return Ensemble(LogMelSpectrogram(self.features), models, self.loss_function).eval()


def load_scoring_model(location: str) -> ScoringModel:
    """A training run (its fold ensemble, from ensemble.json), a fold folder, or a model.pt file."""
    if location.endswith(".pt"):
        uris = [location]
    elif storage.exists(storage.join(location, "ensemble.json")):
        spec = json.loads(storage.read_text(storage.join(location, "ensemble.json")))
        uris = [storage.join(location, *m.split("/")) for m in spec["models"]]
    elif storage.exists(storage.join(location, "model.pt")):
        uris = [storage.join(location, "model.pt")]
    else:
        raise FileNotFoundError(f"{location}: not a training run (ensemble.json), a fold folder or a model.pt file")
    saved = [ModelArtifact.load(u) for u in uris]
    first = saved[0]
    for other, uri in zip(saved[1:], uris[1:], strict=True):
        if other.classes != first.classes or other.features != first.features:
            raise ValueError(f"{uri}: classes or features differ from {uris[0]}; cannot ensemble")
    return ScoringModel(first.classes, first.features, first.chunk_seconds, first.loss_function,
                        asdict(first.architecture), [a.state_dict for a in saved], uris)


# ---------------------------------------------------------------- what to score, and how it is cut


@dataclass(frozen=True)
class ScoringSettings:
    method: str  # "Fix" (consecutive windows, averaged per file) or "Sliding"
    window_seconds: float
    hop_seconds: float
    chunk_seconds: float  # unit of work read as one frame range
    threshold: float
    batch_size: int = 64
    shard_files: int = 256
    onset_detection: bool = True
    mixed_precision: bool = True
    actors: int | None = None
    onset_threshold_db: float = 12.0

    @classmethod
    def from_config(cls, cfg: Config, model: ScoringModel) -> ScoringSettings:
        p, sc = cfg.prediction, cfg.scoring
        if p.inference_chunk_method == "Fix" and cfg.audio.audio_parameters == "Auto":
            # Auto chose the training chunk from the data: Fix windows are that chunk, the length the model
            # learned to see (the seed's 60 s windows around 2 s clips scored at chance: 11% vs 91% accuracy).
            window = hop = min(model.chunk_seconds, p.max_inference_chunk_seconds)
        elif p.inference_chunk_method == "Fix":
            window = hop = min(p.inference_chunk_seconds, p.max_inference_chunk_seconds)
        else:
            window = sc.window_seconds or model.chunk_seconds
            hop = sc.hop_seconds or window / 2
        if hop <= 0 or window <= 0:
            raise ConfigError("scoring: window_seconds and hop_seconds must be positive")
        if sc.actors is not None and sc.actors < 1:
            raise ConfigError(f"scoring.actors: {sc.actors} (at least 1, or leave it out for one per GPU or CPU)")
        if sc.onset_threshold_db <= 0:
            raise ConfigError(f"scoring.onset_threshold_db: {sc.onset_threshold_db} (a positive number of dB)")
        return cls(p.inference_chunk_method, float(window), float(hop), max(sc.chunk_seconds, window),
                   p.probability_threshold, sc.batch_size, sc.shard_files, sc.onset_detection,
                   cfg.environment.mixed_precision_inference, sc.actors, sc.onset_threshold_db)


def list_inputs(location: str) -> list[str]:
    """Audio files under a folder or prefix, inside a zip, a manifest's `path` column, or one file."""
    lower = location.lower()
    if lower.endswith(".zip"):
        location, lower = storage.zip_location(location), ""
    if lower.endswith((".csv", ".pq", ".parquet")):
        with storage.open_input(location) as f:
            frame = pd.read_csv(f) if lower.endswith(".csv") else pd.read_parquet(f)
        column = "path" if "path" in frame.columns else frame.columns[0]
        base = location.rsplit("/", 1)[0] if "/" in location else "."
        paths = [str(p) for p in frame[column]]
        return [p if not storage.is_local(p) or Path(p).is_absolute() else storage.join(base, p) for p in paths]
    if lower.endswith(audio.AUDIO_EXTENSIONS) and not storage.is_dir(location):
        return [location]
    if not storage.exists(location):
        raise FileNotFoundError(f"input {location} does not exist")
    files = storage.list_files(location)
    return [f for f in files if f.lower().endswith(audio.AUDIO_EXTENSIONS) or "." not in f.rsplit("/", 1)[-1]]


def window_starts(duration: float, window: float, hop: float) -> np.ndarray:
    """Start times of the windows that cover a file: the last may run past the end (padded)."""
    if duration <= 0:
        return np.zeros(0)
    count = max(1, int(math.ceil(max(duration - window, 0) / hop - 1e-9)) + 1)
    return np.arange(count) * hop


def plan_chunks(path: str, duration: float, s: ScoringSettings) -> list[dict]:
    """Chunks of a file: each owns the windows starting inside [start, start + chunk_seconds)."""
    starts = window_starts(duration, s.window_seconds, s.hop_seconds)
    chunks = []
    per_chunk = max(1, int(round(s.chunk_seconds / s.hop_seconds)))
    for i in range(0, len(starts), per_chunk):
        owned = starts[i:i + per_chunk]
        chunks.append({"path": path, "chunk": i // per_chunk, "first_window": i, "starts": owned.tolist(),
                       "read_start": float(owned[0]), "read_end": float(owned[-1] + s.window_seconds),
                       "duration": duration, "hop": s.hop_seconds})
    return chunks


# ---------------------------------------------------------------- the work: decode chunks, score windows


BLAST_BAND_HZ = (200.0, 2000.0)
# Chunks are the input blocks, one each up to this many (so every CPU reads); beyond it a block holds several
# chunks, still read one at a time, and the driver does not track millions of tiny objects.
MAX_INPUT_BLOCKS = 20_000


def detect_onsets(wave: np.ndarray, sr: int, min_gap: float = 0.03, threshold_db: float = 12.0) -> np.ndarray:
    """Muzzle blasts in seconds: a jump of the short-time energy threshold_db above the running floor.

    The energy is taken in the blast's band (200 Hz to 2 kHz). Below it are wind and traffic rumble; above it
    the supersonic crack, which reaches the microphone up to ~100 ms before the blast and, counted in a
    broadband energy, times a shot early or counts it twice."""
    hop = max(1, int(sr * 0.005))
    frames = len(wave) // hop
    if frames < 3:
        return np.zeros(0)
    low, high = BLAST_BAND_HZ[0], min(BLAST_BAND_HZ[1], 0.45 * sr)
    band = sosfilt(butter(4, [low, high], btype="band", fs=sr, output="sos"), np.asarray(wave, dtype=np.float64))
    energy = np.sqrt(np.mean(band[: frames * hop].reshape(frames, hop) ** 2, axis=1)) + 1e-9
    level = 20 * np.log10(energy)
    # The noise floor: a low percentile of the past second, so a dense burst does not raise its own floor.
    floor = pd.Series(level).rolling(int(1.0 / 0.005), min_periods=1).quantile(0.2).shift(1).bfill().to_numpy()
    # The rise is over the quietest of the last three frames (15 ms): in automatic fire the next blast lands
    # on the previous shot's ring and may climb over more than one frame.
    rise = level - pd.Series(level).shift(1).rolling(3, min_periods=1).min().bfill().to_numpy()
    candidates = np.where((level - floor > threshold_db) & (rise > 6))[0]
    onsets, last = [], -np.inf
    for c in candidates:
        t = c * hop / sr
        if t - last >= min_gap:
            onsets.append(t)
            last = t
    return np.array(onsets)


def chunk_onsets(wave: np.ndarray, sr: int, read_start: float, starts: np.ndarray, hop: float, duration: float,
                 threshold_db: float) -> np.ndarray:
    """The onsets (seconds in the file) that a chunk owns: from its first window's start up to where the next
    chunk's first window starts, or to the file's end for the last chunk; so each shot is found once."""
    owned_end = starts[-1] + hop
    found = detect_onsets(wave, sr, threshold_db=threshold_db) + read_start
    last_chunk = owned_end >= duration
    return found[(found >= starts[0]) & ((found < owned_end) | last_chunk) & (found < duration)]


def cut_windows(wave: np.ndarray, sr: int, read_start: float, starts: np.ndarray, window: int) -> np.ndarray:
    """(windows, window samples) float32: each window from its start in a chunk read from read_start,
    zero-padded where the audio ends."""
    out = np.zeros((len(starts), window), dtype=np.float32)
    for j, start in enumerate(starts):
        piece = wave[int(round((start - read_start) * sr)):][:window]
        out[j, : len(piece)] = piece
    return out


def read_chunks(batch: dict[str, np.ndarray], sample_rate: int, window_seconds: float, onset_detection: bool,
                s3: storage.S3Settings, onset_threshold_db: float) -> dict[str, np.ndarray]:
    """CPU task: read each chunk's frame range once and cut it into its windows (zero-padded at the end)."""
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
        except (audio.AudioError, OSError) as exc:
            wave, error = np.zeros(0, dtype=np.float32), str(exc)
        onsets = np.zeros(0)
        if onset_detection and not error:
            onsets = chunk_onsets(wave, sample_rate, read_start, starts, float(batch["hop"][i]), duration,
                                  onset_threshold_db)
        pieces = cut_windows(wave, sample_rate, read_start, starts, window)
        for j, start in enumerate(starts):
            out["path"].append(path)
            out["index"].append(int(batch["first_window"][i]) + j)
            out["start"].append(start)
            out["end"].append(min(start + window_seconds, duration))
            out["wave"].append(pieces[j])
            out["error"].append(error)
            # Arrow cannot unify ragged float arrays across blocks; the chunk's onsets travel as JSON text.
            out["onsets"].append(json.dumps(onsets.round(5).tolist()) if j == 0 else "[]")
    result = {k: np.array(v, dtype=object) for k, v in out.items() if k not in ("wave", "start", "end", "index")}
    result["wave"] = np.stack(out["wave"]).astype(np.float32) if out["wave"] else np.zeros((0, window), np.float32)
    result["start"] = np.array(out["start"], dtype=np.float64)
    result["end"] = np.array(out["end"], dtype=np.float64)
    result["index"] = np.array(out["index"], dtype=np.int64)
    return result


class WindowScorer:
    """Actor: loads the ensemble once, then scores windows in model batches of `batch_size` (autocast on a
    GPU), however many windows a call brings."""

    def __init__(self, model: ScoringModel, mixed_precision: bool = True, batch_size: int = 64):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.build().to(self.device)
        self.amp = self.device.type == "cuda" and mixed_precision
        self.batch_size = batch_size
        self.classes = len(model.classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        waves = batch.pop("wave")
        probs = [np.zeros((0, self.classes), dtype=np.float32)]
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.amp):
            for i in range(0, len(waves), self.batch_size):
                piece = torch.from_numpy(np.ascontiguousarray(waves[i:i + self.batch_size])).to(self.device)
                probs.append(self.model(piece).float().cpu().numpy())
        batch["probs"] = np.concatenate(probs)
        # Model-stage time, spread over the batch's rows, for throughput figures.
        batch["model_seconds"] = np.full(len(waves), (time.perf_counter() - started) / max(1, len(waves)))
        batch["device"] = np.full(len(waves), self.device.type, dtype=object)  # where the windows were scored
        return batch


# ---------------------------------------------------------------- per file and per shot


def summarize_file(path: str, duration: float, windows: pd.DataFrame, onsets: np.ndarray, classes: list[str],
                   s: ScoringSettings, error: str = "") -> tuple[dict, list[dict]]:
    """The per-file row and its events. A window whose probabilities all stay under the threshold is
    'no gunshot'; an onset inside a gunshot window becomes an event of that window's class."""
    row = {"file": path, "duration": duration, "status": "error" if error else "ok", "error": error,
           "windows": len(windows), "top_class": "", "top_probability": float("nan"), "shots": 0,
           "gunshot_windows": 0, "note": ""}
    if error or windows.empty:
        for c in classes:
            row[f"max_{c}"] = row[f"mean_{c}"] = float("nan")
        return row, []
    probs = np.stack(windows["probs"].to_numpy())
    weights = (windows["end"] - windows["start"]).to_numpy()
    mean = (probs * weights[:, None]).sum(axis=0) / max(weights.sum(), 1e-9)
    peak = probs.max(axis=0)
    for i, c in enumerate(classes):
        row[f"max_{c}"], row[f"mean_{c}"] = float(peak[i]), float(mean[i])
    gunshot = probs.max(axis=1) >= s.threshold
    row["gunshot_windows"] = int(gunshot.sum())
    score = mean if s.method == "Fix" else peak
    top = int(score.argmax())
    row["top_class"] = classes[top] if (s.method == "Fix" or gunshot.any()) else "no gunshot"
    row["top_probability"] = float(score[top])
    events = []
    starts, ends = windows["start"].to_numpy(), windows["end"].to_numpy()
    for t in np.sort(onsets):
        covering = (starts <= t) & (t < ends)
        if not covering.any():
            continue
        p = probs[covering].mean(axis=0)
        if p.max() < s.threshold:
            continue
        events.append({"file": path, "time": float(t), "class": classes[int(p.argmax())],
                       "probability": float(p.max())})
    _bursts(events)
    row["shots"] = len(events)
    return row, events


def _bursts(events: list[dict], max_gap: float = 0.5) -> None:
    """Group shots less than max_gap apart into bursts; a burst's rate of fire is 60 / median interval."""
    members: list[dict] = []
    groups: list[list[dict]] = []
    for e in events:
        if members and e["time"] - members[-1]["time"] > max_gap:
            groups.append(members)
            members = []
        members.append(e)
    if members:
        groups.append(members)
    for burst, group in enumerate(groups):
        gaps = np.diff([e["time"] for e in group])
        rpm = float(60.0 / np.median(gaps)) if len(gaps) else float("nan")
        for e in group:
            e.update({"burst": burst, "shots_in_burst": len(group), "rounds_per_minute": rpm})


# ---------------------------------------------------------------- the job


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


def _headers(paths: list[str]) -> dict[str, tuple[float, str]]:
    from concurrent.futures import ThreadPoolExecutor

    def one(path: str) -> tuple[str, tuple[float, str]]:
        try:
            info = audio.info(path)
        except audio.AudioError as exc:
            return path, (float("nan"), f"unreadable: {str(exc).split(': ', 1)[-1]}")
        if info.frames <= 0:
            return path, (0.0, "empty: no samples")
        return path, (info.duration, "")

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(pool.map(one, paths))


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


def score(model_location: str, input_location: str, output: str, cfg: Config) -> ScoreSummary:
    """Score every audio file under INPUT with the model and write windows/, files/, events/ to OUTPUT."""
    import ray

    from gunsound.ray_runtime import cluster_cpus, cluster_gpus, init_ray

    started = time.perf_counter()
    output, input_location = storage.absolute(output), storage.absolute(input_location)
    storage.configure_s3(cfg.storage.endpoint_url, cfg.storage.region)
    init_ray(cfg.environment.ray_address, feature_tasks=False)
    ray.data.DataContext.get_current().enable_progress_bars = True
    model = load_scoring_model(model_location)
    s = ScoringSettings.from_config(cfg, model)
    files = list_inputs(input_location)
    if not files:
        raise FileNotFoundError(f"input {input_location}: no audio files found")
    if len(set(files)) != len(files):
        raise ValueError(f"input {input_location}: a file is listed twice")
    storage.makedirs(output)
    done = finished_files(output)
    todo = [f for f in files if f not in done]
    log.info("scoring %d file(s) (%d already finished) with %d model(s); %s windows of %gs, hop %gs",
             len(todo), len(files) - len(todo), len(model.state_dicts), s.method, s.window_seconds, s.hop_seconds)
    gpus = cluster_gpus()
    # Without GPUs the read stage fuses into the scorer actors (both take one CPU), so one actor per CPU
    # keeps every core scoring and leaves no read task waiting for a CPU; more could never all start.
    cpus = cluster_cpus()
    actors = s.actors or (max(1, int(gpus)) if gpus else cpus)
    if not gpus and actors > cpus:
        log.warning("scoring.actors=%d but the cluster has %d CPUs and no GPU: using %d", actors, cpus, cpus)
        actors = cpus
    run_id = uuid.uuid4().hex[:8]
    headers = _headers(todo)
    chunks = [c for f in todo if not headers[f][1] for c in plan_chunks(f, headers[f][0], s)]
    # One dataset for the whole run, so the scorer actors load the model (and start CUDA) once; each shard is
    # committed as soon as the last of its windows comes out, which keeps resume at shard granularity.
    committer = ShardCommitter(output, run_id, todo, headers, chunks, model.classes, s)
    model_seconds, pool, devices = 0.0, 0, set()
    if chunks:
        pool = min(actors, len(chunks))  # no idle actor for a run of few chunks
        ds = ray.data.from_items(chunks, override_num_blocks=min(len(chunks), MAX_INPUT_BLOCKS))
        ds = ds.map_batches(read_chunks, batch_size=1, batch_format="numpy", num_cpus=1,
                            fn_kwargs={"sample_rate": model.features.sample_rate,
                                       "window_seconds": s.window_seconds,
                                       "onset_detection": s.onset_detection, "s3": storage.current_settings(),
                                       "onset_threshold_db": s.onset_threshold_db})
        # Without GPUs the read stage fuses into the actors, where a batch size would bundle that many
        # chunks into one call (one actor would score a whole hour); one chunk per call instead.
        ds = ds.map_batches(WindowScorer, batch_size=s.batch_size if gpus else None, batch_format="numpy",
                            fn_constructor_kwargs={"model": model, "mixed_precision": s.mixed_precision,
                                                   "batch_size": s.batch_size},
                            num_gpus=0.5 if gpus else 0, num_cpus=0.5 if gpus else 1,
                            compute=ray.data.ActorPoolStrategy(size=pool))
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            model_seconds += float(batch["model_seconds"].sum())
            devices.update(batch["device"])
            committer.add(batch.drop(columns=["model_seconds", "device"]))
    committer.finish()
    return _summary(output, files, len(files) - len(todo), started, model_seconds, pool, sorted(devices))


class ShardCommitter:
    """Takes scored windows as they stream out of the job, in any order, and commits each shard of files
    (`scoring.shard_files`) once all of its windows are in. A window delivered twice (a retried task) counts
    once; a shard whose files all failed their header read is committed at once."""

    def __init__(self, output: str, run_id: str, files: list[str], headers: dict[str, tuple[float, str]],
                 chunks: list[dict], classes: list[str], s: ScoringSettings):
        self.output, self.run_id, self.headers, self.classes, self.settings = output, run_id, headers, classes, s
        self.shards = [files[i:i + s.shard_files] for i in range(0, len(files), s.shard_files)]
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
            windows = (pd.concat(parts, ignore_index=True) if parts else
                       pd.DataFrame(columns=["path", "index", "start", "end", "error", "onsets", "probs"]))
            _commit_shard(self.output, f"part-{self.run_id}-{k:05d}.parquet", shard, self.headers, windows,
                          self.classes, self.settings)
            self.committed[k], self.received[k] = True, []
            for f in shard:
                del self.seen[f]
            log.info("shard %d: %d files committed", k, len(shard))


def _onsets(column) -> np.ndarray:
    return np.array([t for text in column for t in json.loads(text)], dtype=float)


def _commit_shard(output: str, name: str, shard: list[str], headers: dict, windows: pd.DataFrame,
                  classes: list[str], s: ScoringSettings) -> None:
    rows, events, window_rows = [], [], []
    grouped = dict(tuple(windows.groupby("path"))) if len(windows) else {}
    for path in shard:
        duration, error = headers[path]
        part = grouped.get(path, pd.DataFrame(columns=windows.columns))
        if not error and len(part):
            read_errors = [e for e in part["error"] if e]
            error = f"decode failed: {read_errors[0]}" if read_errors else ""
        part = part.sort_values("index")
        onsets = _onsets(part["onsets"])
        row, file_events = summarize_file(path, duration, part if not error else part.iloc[0:0], onsets, classes, s,
                                          error)
        if not error and duration < s.window_seconds:
            row["note"] = f"shorter than a window ({duration:.2f} s < {s.window_seconds:g} s): zero-padded"
        rows.append(row)
        events.extend(file_events)
        if not error:
            probs = np.stack(part["probs"].to_numpy()) if len(part) else np.zeros((0, len(classes)))
            frame = pd.DataFrame({"file": path, "start": part["start"].to_numpy(), "end": part["end"].to_numpy()})
            for i, c in enumerate(classes):
                frame[f"prob_{c}"] = probs[:, i]
            window_rows.append(frame)
    import pyarrow as pa

    window_schema = pa.schema([("file", pa.string()), ("start", pa.float64()), ("end", pa.float64()),
                               *[(f"prob_{c}", pa.float64()) for c in classes]])
    event_schema = pa.schema([("file", pa.string()), ("time", pa.float64()), ("class", pa.string()),
                              ("probability", pa.float64()), ("burst", pa.int64()), ("shots_in_burst", pa.int64()),
                              ("rounds_per_minute", pa.float64())])
    storage.write_parquet(pd.concat(window_rows, ignore_index=True) if window_rows else
                          pd.DataFrame(columns=window_schema.names), storage.join(output, "windows", name),
                          window_schema)
    storage.write_parquet(pd.DataFrame(events, columns=event_schema.names), storage.join(output, "events", name),
                          event_schema)
    files = pd.DataFrame(rows).astype({"file": str, "status": str, "error": str, "top_class": str, "note": str})
    storage.write_parquet(files, storage.join(output, "files", name))  # last: the shard's commit


def _summary(output: str, files: list[str], skipped: int, started: float, model_seconds: float,
             scorer_actors: int, devices: list[str]) -> ScoreSummary:
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
    return config_from_dict(apply_overrides(data, overrides), f"{model_location}/config.yaml")


def predict_file(model: ScoringModel, path: str, cfg: Config) -> tuple[dict, list[dict], pd.DataFrame]:
    """Score one file in this process (no Ray): the same chunk plan, reader, scorer and summary as the job."""
    s = ScoringSettings.from_config(cfg, model)
    info = audio.info(path)
    scorer = WindowScorer(model, s.mixed_precision, s.batch_size)
    rows = []
    for chunk in plan_chunks(path, info.duration, s):
        batch = {k: np.array([v], dtype=object) for k, v in chunk.items()}
        cut = read_chunks(batch, model.features.sample_rate, s.window_seconds, s.onset_detection,
                          storage.current_settings(), s.onset_threshold_db)
        probs = scorer(cut)["probs"]
        for j in range(len(probs)):
            rows.append({"path": path, "index": int(cut["index"][j]), "start": float(cut["start"][j]),
                         "end": float(cut["end"][j]), "error": cut["error"][j], "onsets": cut["onsets"][j],
                         "probs": probs[j]})
    windows = pd.DataFrame(rows)
    errors = [e for e in windows["error"] if e]
    onsets = _onsets(windows["onsets"])
    row, events = summarize_file(path, info.duration, windows, onsets, model.classes, s, errors[0] if errors else "")
    return row, events, windows
