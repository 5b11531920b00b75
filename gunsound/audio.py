"""Audio from any location: a local path, S3, or a member of a zip, opened through `storage` and decoded by
`decode` (soundfile's frame-range seeking, so a window of a long recording is read without fetching and
decoding the rest of it, as lhotse's lazy range reads). Reads from S3 are retried and never cut short
(`storage.RetryingInput`); a read returns every frame asked for or raises AudioError naming the file."""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

from gunsound import storage
from gunsound.decode import AUDIO_EXTENSIONS, AudioError, AudioInfo, fit_length, resample, to_mono
from gunsound.decode import info as _decode_info
from gunsound.decode import read as _decode_read

__all__ = ["AUDIO_EXTENSIONS", "AudioError", "AudioInfo", "fit_length", "info", "read", "resample", "to_mono"]


def _open(path: str, what: str) -> BinaryIO:
    try:
        return storage.open_input(path)
    except Exception as exc:  # a missing file, a bad zip, a failed request: this file's error
        raise AudioError(path, f"{what}: {exc}") from exc


def info(path: str, data: bytes | None = None) -> AudioInfo:
    """Read only the header of an audio file (or of its bytes, `data`)."""
    if data is not None:
        return _decode_info(path, data)
    with _open(path, "unreadable audio") as f:
        return _decode_info(path, f)


def read(
    path: str,
    target_sr: int | None = None,
    start: float = 0.0,
    duration: float | None = None,
    data: bytes | None = None,
) -> tuple[np.ndarray, int]:
    """Decode [start, start + duration) seconds of a file to mono float32, resampled to `target_sr`.

    Returns (wave, sample_rate). Only the requested frame range is decoded.
    """
    if data is not None:
        return _decode_read(path, target_sr, start, duration, data)
    with _open(path, "cannot decode audio") as f:
        return _decode_read(path, target_sr, start, duration, f)
