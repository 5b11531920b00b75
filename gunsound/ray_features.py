"""Ray Data: clips -> decoded, fixed-length waveforms (CPU tasks) -> log-mel features (actor pool).

The feature actors take a GPU share when the cluster has GPUs and run on the CPU otherwise. A clip that
fails to decode becomes a row with an `error` message (and zero audio), never a crashed pipeline and never
a silent drop; callers decide what to do with error rows.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import lru_cache

import numpy as np
import pandas as pd
import ray
import torch

from gunsound import audio, storage
from gunsound.accelerator import compute_device
from gunsound.features import FeatureParams, LogMelSpectrogram
from gunsound.ray_runtime import cluster_cpus, cluster_gpus


def decode_clips(batch: dict[str, np.ndarray], sample_rate: int, chunk_samples: int,
                 s3: storage.S3Settings) -> dict[str, np.ndarray]:
    """CPU task body: decode, mix to mono, resample and fit each clip to the chunk length."""
    storage.configure_s3(s3.endpoint_url, s3.region)
    waves = np.zeros((len(batch["path"]), chunk_samples), dtype=np.float32)
    errors = []
    for i, path in enumerate(batch["path"]):
        try:
            wave, _ = audio.read(str(path), sample_rate)
            if wave.size == 0:
                raise audio.AudioError(f"{path}: no samples")
            waves[i] = audio.fit_length(wave, chunk_samples)
            errors.append("")
        except (audio.AudioError, OSError) as exc:
            errors.append(str(exc))
    return {**batch, "wave": waves, "error": np.array(errors, dtype=object)}


# Clips per front-end call on a CPU. The STFT's intermediates (framed input, complex spectrum, power) take
# about 5 MB per 2 s clip at n_fft 2048, so a 64-clip block at once peaks some 300 MB above the worker's
# resting size; 8 at a time keeps that near 40 MB, and runs faster (the slices stay in cache).
CPU_FRONTEND_CLIPS = 8
# Clips per block (one task) on a CPU-only cluster: a block's waveforms and features stay in the worker
# while it runs, and smaller blocks share the clips out more evenly between the workers.
CPU_BLOCK_CLIPS = 32


def features_in_slices(frontend: LogMelSpectrogram, waves: torch.Tensor, clips_per_call: int) -> np.ndarray:
    """Log-mel features (clips, mels, frames) of a batch of waveforms, computed `clips_per_call` clips at a
    time into one array, so the front end's intermediates stay those of a slice, not of the whole batch."""
    out = np.empty((len(waves), frontend.params.n_mels, frontend.params.num_frames(waves.shape[-1])),
                   dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(waves), clips_per_call):
            out[start:start + clips_per_call] = frontend(waves[start:start + clips_per_call])[:, 0].cpu().numpy()
    return out


class FeatureExtractor:
    """Actor: loads the front end once, then turns batches of waveforms into log-mel spectrograms."""

    def __init__(self, params: dict):
        self.device = compute_device("a feature actor")
        self.frontend = LogMelSpectrogram(FeatureParams(**params)).to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        waves = torch.from_numpy(np.asarray(batch.pop("wave"), dtype=np.float32)).to(self.device)
        # A GPU takes the whole batch in one call; its memory is not the laptop's.
        clips_per_call = len(waves) if self.device.type == "cuda" else CPU_FRONTEND_CLIPS
        batch["features"] = features_in_slices(self.frontend, waves, clips_per_call)
        return batch


@lru_cache(maxsize=4)
def _cpu_frontend(params: FeatureParams) -> LogMelSpectrogram:
    return LogMelSpectrogram(params).eval()


def decode_and_featurize(batch: dict[str, np.ndarray], sample_rate: int, chunk_samples: int,
                         s3: storage.S3Settings, params: FeatureParams) -> dict[str, np.ndarray]:
    """CPU-only clusters: both stages in one task, so waveforms never cross the object store and the
    task runs in Ray's pooled workers (no actor process to start per pipeline)."""
    batch = decode_clips(batch, sample_rate, chunk_samples, s3)
    waves = torch.from_numpy(batch.pop("wave"))
    batch["features"] = features_in_slices(_cpu_frontend(params), waves, CPU_FRONTEND_CLIPS)
    return batch


def feature_bytes(clips: int, params: FeatureParams, chunk_seconds: float) -> int:
    """Bytes of the features of `clips` clips as `feature_dataset` makes them (float32 mels x frames): what a
    materialized feature dataset keeps in the object store (`ray_runtime.object_store_bytes_for`)."""
    frames = params.num_frames(int(round(chunk_seconds * params.sample_rate)))
    return clips * params.n_mels * frames * 4


def feature_dataset(
    clips: pd.DataFrame,
    params: FeatureParams,
    chunk_seconds: float,
    feature_actors: int | None = None,
    batch_size: int = 64,
    *,
    gpus: float | None = None,
    cpus: int | None = None,
) -> ray.data.Dataset:
    """A lazy dataset of the clips' log-mel features; every input row comes out once, with `error` set
    where it could not be decoded. `clips` needs a `path` column; other columns are passed through.

    With GPUs, decoding runs as 1-CPU tasks and the features in actors holding a quarter GPU each. Without,
    one 1-CPU task per block does both (`decode_and_featurize`), so waveforms never travel through the
    object store and no actor has to start per pipeline; that dataset's context (not the global one) turns
    Ray Data's per-operator reservation off, and datasets derived from it share that context.
    """
    if clips.empty:
        raise ValueError("no clips to featurize")
    chunk_samples = int(round(chunk_seconds * params.sample_rate))
    records = clips.to_dict("records")
    # `gpus` and `cpus`: what the cluster has or may launch (`resources`); by default what is alive now.
    cpus = cpus or cluster_cpus()
    gpus = cluster_gpus() if gpus is None else gpus
    fused = not gpus and feature_actors is None
    # Blocks of at most batch_size clips (CPU_BLOCK_CLIPS when one CPU task does everything), at least one per
    # CPU; each block is then one batch (a batch_size in map_batches would make Ray Data bundle two short
    # blocks into one task).
    per_block = min(batch_size, CPU_BLOCK_CLIPS) if fused else batch_size
    blocks = max(-(-len(records) // per_block), min(len(records), cpus))
    ds = ray.data.from_items(records, override_num_blocks=blocks)
    decode_kwargs = {"sample_rate": params.sample_rate, "chunk_samples": chunk_samples,
                     "s3": storage.current_settings()}
    if fused:
        # One operator, so Ray Data's per-operator resource reservation has nothing to share out; left on, it
        # grants no CPU for the first second (its budget starts at zero) and then launches a task only after
        # noticing the last one finished, leaving each CPU idle ~0.2 s per block. Without it, a cap of two
        # tasks per CPU keeps the next block queued at every worker and bounds what is in flight.
        ds.context.op_resource_reservation_enabled = False
        return ds.map_batches(decode_and_featurize, fn_kwargs={**decode_kwargs, "params": params},
                              batch_format="numpy", batch_size=None, num_cpus=1,
                              compute=ray.data.TaskPoolStrategy(size=min(blocks, 2 * cpus)))
    ds = ds.map_batches(decode_clips, fn_kwargs=decode_kwargs, batch_format="numpy", batch_size=None, num_cpus=1)
    ds = ds.map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={"params": asdict(params)},
        batch_format="numpy",
        batch_size=batch_size,  # Ray Data requires an int batch size with num_gpus
        num_gpus=0.25 if gpus else 0,
        num_cpus=0.5 if gpus else 1,
        # With GPUs, a pool that grows with the backlog: its GPU requests are what bring GPU nodes up.
        compute=(ray.data.ActorPoolStrategy(size=feature_actors) if feature_actors else
                 ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(min(gpus, 64) * 4)))),
    )
    return ds
