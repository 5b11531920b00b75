"""The model side of scoring: the fold models as one ensemble, loaded from a run, and the batch scorer that
turns waveform windows into per-class probabilities (the Ray job's actor, and `predict_file`'s scorer)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from gunsound import storage
from gunsound.accelerator import compute_device
from gunsound.features import FeatureParams, LogMelSpectrogram
from gunsound.model import ModelArtifact
from gunsound.model_files import LOSS_FUNCTIONS, ModelDescription, check_ensemble, model_files


class Ensemble(torch.nn.Module):
    """Waveform windows -> per-class probabilities, averaged over the fold models (one front end)."""

    def __init__(self, frontend: LogMelSpectrogram, models: list[torch.nn.Module], loss_function: str):
        super().__init__()
        self.frontend = frontend
        self.models = torch.nn.ModuleList(models)
        if loss_function not in LOSS_FUNCTIONS:  # any other loss's outputs would be read as a softmax's
            raise ValueError(f"loss_function {loss_function!r} is not one this version scores")
        self.use_sigmoid = loss_function == "BCE"

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        spec = self.frontend(waves)
        probs = []
        for model in self.models:
            logits = model(spec).float()
            probs.append(torch.sigmoid(logits) if self.use_sigmoid else torch.softmax(logits, dim=1))
        return torch.stack(probs).mean(dim=0)


@dataclass(frozen=True)
class ScoringModel:
    """The fold models scored together: one or more model artifacts with the same classes, front end, loss
    and clip length (`model_files.check_ensemble`)."""

    artifacts: list[ModelArtifact]
    sources: list[str] = field(default_factory=list)  # where each artifact was read from

    def __post_init__(self) -> None:
        if not self.artifacts:
            raise ValueError("a scoring model needs at least one model artifact")
        names = self.sources or [f"model {i}" for i in range(len(self.artifacts))]
        check_ensemble([(name, {"classes": a.classes, "features": a.features, "loss_function": a.loss_function,
                                "chunk_seconds": a.chunk_seconds})
                        for a, name in zip(self.artifacts, names, strict=False)])

    @property
    def classes(self) -> list[str]:
        return self.artifacts[0].classes

    @property
    def features(self) -> FeatureParams:
        return self.artifacts[0].features

    @property
    def chunk_seconds(self) -> float:
        """The training clip length: the window the models learned to see."""
        return self.artifacts[0].chunk_seconds

    @property
    def loss_function(self) -> str:
        return self.artifacts[0].loss_function

    def describe(self) -> ModelDescription:
        return ModelDescription(classes=list(self.classes), sample_rate=self.features.sample_rate,
                                chunk_seconds=self.chunk_seconds, files=list(self.sources))

    def build(self) -> Ensemble:
        models = [a.build() for a in self.artifacts]
        return Ensemble(LogMelSpectrogram(self.features), models, self.loss_function).eval()


def load_scoring_model(location: str) -> ScoringModel:
    """A training run (its fold ensemble, from ensemble.json), a fold folder, or a model.pt file."""
    return load_model_files(model_files(location))


def load_model_files(files: list[str]) -> ScoringModel:
    """The ensemble of these model files (`model_files.model_files`)."""
    return ScoringModel([ModelArtifact.load(u) for u in files], list(files))


def _where(device: torch.device) -> str:
    """Where a scorer runs: in a Ray actor its device, node, node type and granted GPUs; else its device."""
    import ray

    if not ray.is_initialized():
        return device.type
    from gunsound.resources import describe_placement, placement

    return describe_placement(placement(device.type))


# Windows per model call on a CPU. A resnet18's activations for 64 two-second windows take some 500 MB; 16 at a
# time take a quarter of that and scored an hour-long file 10-15% faster (they stay in cache; scoring_archive.py,
# 2026-11-29), with the scorer's memory on it steadier. A GPU takes the whole `batch_size`.
CPU_MODEL_WINDOWS = 16


class WindowScorer:
    """Scores waveform windows (a batch's `wave` column) in model batches of `batch_size` (at most
    CPU_MODEL_WINDOWS on a CPU), however many a call
    brings (from one file or many: each row stays its own), with autocast on a GPU; rows with an `error` are
    left unscored; loads the ensemble once (a Ray actor in the job: given the model's files, it reads them itself,
    from S3 with `s3`'s settings). Computes where `accelerator.compute_device` says: in a Ray actor on the GPU it
    was granted, if any; elsewhere on `device` (environment.device). Adds `probs`, and per row the model time, the
    device and where the scorer ran, for throughput figures and the summary."""

    def __init__(self, model: ScoringModel | list[str], *, mixed_precision: bool = True, batch_size: int = 64,
                 s3: storage.S3Settings | None = None, device: str = "auto"):
        if not isinstance(model, ScoringModel):
            if s3 is not None:
                storage.configure_s3(s3.endpoint_url, s3.region)
            model = load_model_files(model)
        self.device = compute_device("a scorer", device)
        self.where = _where(self.device)
        self.model = model.build().to(self.device)
        self.amp = self.device.type == "cuda" and mixed_precision
        self.batch_size = batch_size if self.device.type == "cuda" else min(batch_size, CPU_MODEL_WINDOWS)
        self.classes = len(model.classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        waves = batch.pop("wave")
        # Rows that carry an error (a failed read, a file without windows) are not scored: NaN probabilities.
        errors = batch.get("error")
        scored = np.arange(len(waves)) if errors is None else np.flatnonzero([not e for e in errors])
        probs = np.full((len(waves), self.classes), np.nan, dtype=np.float32)
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.amp):
            for i in range(0, len(scored), self.batch_size):
                rows = scored[i:i + self.batch_size]
                piece = waves[rows] if len(scored) < len(waves) else waves[i:i + self.batch_size]
                piece = torch.from_numpy(np.ascontiguousarray(piece)).to(self.device)
                probs[rows] = self.model(piece).float().cpu().numpy()
        batch["probs"] = probs
        batch["model_seconds"] = np.full(len(waves), (time.perf_counter() - started) / max(1, len(waves)))
        batch["device"] = np.full(len(waves), self.device.type, dtype=object)
        batch["scorer"] = np.full(len(waves), self.where, dtype=object)
        return batch
