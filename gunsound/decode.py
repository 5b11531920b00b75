"""Decoding: any WAV/FLAC/OGG/MP3 at any rate, depth and channel count, to mono float32 at a target rate.

A path or an open binary file goes in; where it comes from (local disk, S3, a zip) is `audio.py`'s business.
This module imports no gunsound module and no Ray, so the exported scorer ships it as it is and reads audio
with the same code as the scoring job. Needs numpy, soundfile and torch; torchaudio only to resample.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".opus")
Source = str | BinaryIO


class AudioError(RuntimeError):
    """A file that cannot be decoded; the message names the file and the reason."""


@dataclass(frozen=True)
class AudioInfo:
    path: str
    sample_rate: int
    frames: int
    channels: int
    format: str
    subtype: str

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def _source(source: Source | bytes) -> Source:
    return io.BytesIO(source) if isinstance(source, bytes | bytearray) else source


def info(path: str, source: Source | bytes | None = None) -> AudioInfo:
    """Read only the header of an audio file (`source`: an open file or its bytes; default: open `path`)."""
    try:
        with sf.SoundFile(_source(source if source is not None else path)) as f:
            frames = f.frames
            if frames <= 0 and f.format == "MPEG":  # some MP3s carry no frame count in the header
                frames = sum(len(b) for b in f.blocks(65536))
            result = AudioInfo(path, f.samplerate, int(frames), f.channels, f.format, f.subtype)
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError) as exc:
        raise AudioError(f"{path}: cannot read audio header: {exc}") from exc
    if result.sample_rate <= 0 or result.channels <= 0:
        raise AudioError(f"{path}: invalid header (sample rate {result.sample_rate}, channels {result.channels})")
    return result


def to_mono(frames: np.ndarray) -> np.ndarray:
    if frames.ndim == 1:
        return frames.astype(np.float32, copy=False)
    if frames.shape[1] == 1:
        return np.ascontiguousarray(frames[:, 0], dtype=np.float32)
    return frames.mean(axis=1, dtype=np.float32)


@lru_cache(maxsize=16)
def _resampler(orig_sr: int, target_sr: int) -> torch.nn.Module:
    # The windowed-sinc kernel is built once per rate pair, not once per clip.
    import torchaudio.transforms as T

    return T.Resample(orig_sr, target_sr)


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling (torchaudio's windowed sinc)."""
    if orig_sr == target_sr or wave.size == 0:
        return wave.astype(np.float32, copy=False)
    with torch.inference_mode():
        out = _resampler(orig_sr, target_sr)(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)))
    return out.numpy()


def read(
    path: str,
    target_sr: int | None = None,
    start: float = 0.0,
    duration: float | None = None,
    source: Source | bytes | None = None,
) -> tuple[np.ndarray, int]:
    """Decode [start, start + duration) seconds of a file to mono float32, resampled to `target_sr`.

    Returns (wave, sample_rate). Only the requested frame range is decoded. `source` is an open file or the
    file's bytes; without it `path` is opened from the local disk.
    """
    try:
        with sf.SoundFile(_source(source if source is not None else path)) as f:
            sr = f.samplerate
            first = int(round(start * sr))
            if first:
                f.seek(min(first, f.frames) if f.frames > 0 else first)
            count = -1 if duration is None else int(round(duration * sr))
            frames = f.read(frames=count, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError) as exc:
        raise AudioError(f"{path}: cannot decode audio: {exc}") from exc
    wave = to_mono(frames)
    if not np.all(np.isfinite(wave)):
        raise AudioError(f"{path}: decoded samples contain NaN or infinity")
    if target_sr is not None and target_sr != sr:
        return resample(wave, sr, target_sr), target_sr
    return wave, sr


def fit_length(wave: np.ndarray, length: int) -> np.ndarray:
    """Pad with zeros or crop to `length` samples; a crop keeps the loudest window (where the shot is)."""
    n = wave.shape[-1]
    if n == length:
        return wave
    if n < length:
        return np.pad(wave, (0, length - n))
    energy = np.concatenate([[0.0], np.cumsum(wave.astype(np.float64) ** 2)])
    window_energy = energy[length:] - energy[:-length]
    start = int(np.argmax(window_energy))
    return wave[start : start + length]
