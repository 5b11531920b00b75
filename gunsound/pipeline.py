"""Ray Data: clips -> decoded, fixed-length waveforms (CPU tasks) -> log-mel features (actor pool).

The feature actors take a GPU share when the cluster has GPUs and run on the CPU otherwise. A clip that
fails to decode becomes a row with an `error` message (and zero audio), never a crashed pipeline and never
a silent drop; callers decide what to do with error rows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

import numpy as np
import pandas as pd
import ray
import torch

from gunsound import audio, storage
from gunsound.features import FeatureParams, LogMelSpectrogram

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (address, or RAY_ADDRESS as set by `ray job submit`) or start a local Ray."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A laptop: a local Ray with a modest object store (Ray's default is 30% of RAM).
    ray.init(num_cpus=num_cpus, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=True)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def decode_clips(batch: pd.DataFrame, sample_rate: int, chunk_samples: int, s3: storage.S3Settings) -> pd.DataFrame:
    """CPU task body: decode, mix to mono, resample and fit each clip to the chunk length."""
    storage.configure_s3(s3.endpoint_url, s3.region)
    waves = np.zeros((len(batch), chunk_samples), dtype=np.float32)
    errors = []
    for i, path in enumerate(batch["path"]):
        try:
            wave, _ = audio.read(path, sample_rate)
            if wave.size == 0:
                raise audio.AudioError(f"{path}: no samples")
            waves[i] = audio.fit_length(wave, chunk_samples)
            errors.append("")
        except (audio.AudioError, OSError) as exc:
            errors.append(str(exc))
    out = batch.copy()
    out["wave"] = list(waves)
    out["error"] = errors
    return out


class FeatureExtractor:
    """Actor: loads the front end once, then turns batches of waveforms into log-mel spectrograms."""

    def __init__(self, params: dict):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.frontend = LogMelSpectrogram(FeatureParams(**params)).to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        waves = torch.from_numpy(np.stack(batch.pop("wave"))).to(self.device, non_blocking=True)
        with torch.inference_mode():
            batch["features"] = self.frontend(waves)[:, 0].cpu().numpy()
        return batch


def feature_dataset(
    clips: pd.DataFrame,
    params: FeatureParams,
    chunk_seconds: float,
    decode_cpus: float = 0.5,
    feature_actors: int = 1,
    batch_size: int = 32,
) -> ray.data.Dataset:
    """A lazy dataset of the clips' log-mel features; every input row comes out once, with `error` set
    where it could not be decoded. `clips` needs a `path` column; other columns are passed through."""
    if clips.empty:
        raise ValueError("no clips to featurize")
    chunk_samples = int(round(chunk_seconds * params.sample_rate))
    records = clips.to_dict("records")
    blocks = max(1, min(len(records), -(-len(records) // 16)))
    ds = ray.data.from_items(records, override_num_blocks=blocks)
    ds = ds.map_batches(
        decode_clips,
        fn_kwargs={"sample_rate": params.sample_rate, "chunk_samples": chunk_samples,
                   "s3": storage.current_settings()},
        batch_format="pandas",
        batch_size=16,
        num_cpus=decode_cpus,
    )
    gpus = cluster_gpus()
    ds = ds.map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={"params": asdict(params)},
        batch_format="numpy",
        batch_size=batch_size,
        num_gpus=0.25 if gpus else 0,
        num_cpus=0.5,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, feature_actors)),
    )
    return ds
