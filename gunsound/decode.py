"""Decoding: any format libsndfile reads (WAV, FLAC, OGG, MP3, AIFF, AU...) at any rate, depth and channel
count, to mono float32 at a target rate; every frame asked for, or an AudioError naming the file.

A path or an open binary file goes in; where it comes from (local disk, S3, a zip) is `audio.py`'s business.
This module imports no gunsound module and no Ray, so the exported scorer ships it as it is and reads audio
with the same code as the scoring job. Needs numpy and soundfile; torch, torchaudio and scipy to resample
(imported then, so that reading headers and audio at the model's rate costs no torch import).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from math import gcd
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import soundfile as sf

if TYPE_CHECKING:
    import torch

# Headers outside these bounds are corrupt (or not worth a cluster's time) and the file becomes an error:
# below 1 kHz a header turns 4,000 samples into an hour of windows; 768 kHz is the fastest audio interfaces
# record.
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 768_000
# 64 channels hold 7th-order ambisonics and the usual microphone arrays; a larger count is a corrupt header.
MAX_CHANNELS = 64
# One file is at most a day of recording; a longer one is a corrupt header (or should be split first).
MAX_SECONDS = 24 * 3600
# Decoded (interleaved float32) audio is read and mixed down in blocks of at most this size, so a read's memory
# is its mono output and one block, whatever the channel count.
READ_BLOCK_BYTES = 4 << 20
# An MP3 header's frame count includes the encoder's padding, which decoders may trim: a shortfall of up to
# two MPEG frames at the end is not a truncated file.
MPEG_FRAME_SLACK = 2 * 1152
# Rate ratios whose reduced terms are at most this are resampled with torchaudio's windowed sinc (its kernel
# grows as their product: 44,101 -> 16,000 Hz would need gigabytes); others with scipy's polyphase filter over
# the nearest ratio with terms at most this (a pitch error below 1e-6).
MAX_RESAMPLE_FACTOR = 1000

# File name extensions of the formats libsndfile reads, keyed as soundfile.available_formats() names them
# (RAW, headerless, and MAT/HTK, whose extensions mostly name other data, are left out).
FORMAT_EXTENSIONS = {
    "WAV": (".wav", ".wave"), "WAVEX": (".wav",), "RF64": (".rf64",), "W64": (".w64",), "FLAC": (".flac",),
    "OGG": (".ogg", ".oga", ".opus"), "MP3": (".mp3", ".mp2"), "AIFF": (".aiff", ".aif", ".aifc"),
    "AU": (".au", ".snd"), "CAF": (".caf",), "IRCAM": (".sf", ".ircam"), "NIST": (".nist", ".sph"),
    "VOC": (".voc",), "PAF": (".paf",), "SVX": (".iff", ".svx"), "AVR": (".avr",), "SD2": (".sd2",),
    "SDS": (".sds",), "PVF": (".pvf",), "XI": (".xi",), "WVE": (".wve",),
}
AUDIO_EXTENSIONS = tuple(sorted({ext for name in sf.available_formats() for ext in FORMAT_EXTENSIONS.get(name, ())}))
Source = str | BinaryIO


class AudioError(RuntimeError):
    """A file that cannot be decoded: `path` and `reason`, the message is "PATH: REASON"."""

    def __init__(self, path: str, reason: str | None = None):
        if reason is None:  # one argument: the whole message
            path, reason = "", path
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}" if path else reason)


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


class _WholeReads(io.RawIOBase):
    """An open file as libsndfile's virtual I/O should see it. libsndfile takes a short read for the end of the
    file, and soundfile prints an exception raised in its callbacks and goes on as if the file ended, so a
    flaky stream would decode to a cut clip: here every read is filled up to the size asked for (a raw stream
    may return less) and the first exception is kept, to be raised once libsndfile returns."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.failure, self._position = raw, None, 0
        self._read_into = raw.readinto if hasattr(raw, "readinto") else self._read_copy

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.failure is not None:
            return 0
        done = 0
        try:
            done = self._read_into(buffer) or 0
            if done < len(buffer):  # short: read on to the size asked for, or the end of the file
                view = memoryview(buffer).cast("B")
                while done < len(view):
                    got = self._read_into(view[done:]) or 0
                    if not got:
                        break
                    done += got
        except Exception as exc:  # kept, and raised once libsndfile returns
            self.failure = exc
        self._position += done
        return done

    def _read_copy(self, view) -> int:
        data = self.raw.read(len(view))
        memoryview(view).cast("B")[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.failure is None:
            try:
                self._position = self.raw.seek(offset, whence)
                if self._position is None:  # file objects whose seek returns nothing
                    self._position = self.raw.tell()
            except Exception as exc:
                self.failure = exc
        return self._position

    def tell(self) -> int:
        return self._position

    def raise_failure(self, path: str, what: str) -> None:
        if self.failure is not None:
            raise AudioError(path, f"{what}: read failed: {self.failure}") from self.failure


def _handle(path: str, source: Source | bytes | None) -> tuple[str | BinaryIO, _WholeReads | None]:
    if source is None or isinstance(source, str):
        return source or path, None
    guard = _WholeReads(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source)
    return guard, guard


def _reason(exc: Exception) -> str:
    if isinstance(exc, sf.LibsndfileError):  # its message names the file object, not the file
        return exc.error_string.strip()
    return f"{type(exc).__name__}: {exc}"


def check_header(path: str, sample_rate: int, channels: int, frames: int) -> None:
    """Raise AudioError unless the header's values are within the bounds above."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(path, f"unsupported header: sample rate {sample_rate} Hz is outside "
                               f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(path, f"unsupported header: {channels} channels (at most {MAX_CHANNELS})")
    if frames > MAX_SECONDS * sample_rate:
        raise AudioError(path, f"unsupported header: {frames / sample_rate / 3600:.1f} h long "
                               f"(at most {MAX_SECONDS / 3600:g} h per file)")


# libsndfile's log notes an audio chunk that claims more bytes than the file holds as "data : N (should be
# M)" (a container size alone is often stale after editing, and not a cut), and an Ogg stream without its
# end-of-stream page. A size of 2 GiB or more is a streaming writer's "unknown length", not a claim, and a few
# bytes off is a sloppy writer, not a cut.
_SHOULD_BE = re.compile(r"^\s*(data|SSND|Data Size)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_CUT_SHORT = re.compile(r"^.*(end-of-stream|truncated).*$", re.MULTILINE | re.IGNORECASE)
_UNKNOWN_LENGTH = 0x7FFF0000
_SLOPPY_BYTES = 64


def truncation(log: str, fmt: str = "", frames: int = 0, channels: int = 1, subtype: str = "",
               header: bytes = b"") -> str:
    """Why libsndfile's log (SoundFile.extra_info) and, for NIST, the file's first bytes (`header`) show a file
    of `frames` frames cut short, or "". Where a format's header claims a length, libsndfile takes the frames
    the file holds and notes the claim, or says nothing of it: each such claim is compared here. IRCAM, PAF
    and PVF headers state no length, so only a cut inside a frame shows there."""
    for name, claimed, holds in _SHOULD_BE.findall(log):
        if int(holds) + _SLOPPY_BYTES < int(claimed) < _UNKNOWN_LENGTH:
            return f"truncated: the header claims {claimed} bytes of audio ({name}) and the file holds {holds}"
    cut = _CUT_SHORT.search(log)
    if cut:
        return f"truncated: {cut.group(0).strip()}"
    claimed = _claimed_frames(log, fmt, header)
    if claimed is not None and frames + _SLOPPY_FRAMES < claimed:
        return f"truncated: the header claims {claimed} frames and the file holds {frames}"
    length, width = re.search(r"^Length\s*:\s*(\d+)", log, re.MULTILINE), _SAMPLE_BYTES.get(subtype)
    offset = _DATA_OFFSET.get(fmt) or (int(m.group(1)) if (m := re.search(r"Data Offset\s*:\s*(\d+)", log)) else 0)
    # libsndfile writes 24-bit PAF in blocks of 10 frames, 32 bytes per channel: the unit a cut shows in
    unit = 32 * channels if (fmt, subtype) == ("PAF", "PCM_24") else (width or 0) * channels
    if fmt in _DATA_OFFSET and length and unit and (int(length.group(1)) - offset) % unit:
        return f"truncated: the file ends inside a frame ({int(length.group(1)) - offset} bytes of audio)"
    return ""


# Headers with no length: where their audio starts (PVF's log gives it).
_DATA_OFFSET = {"IRCAM": 1024, "PAF": 2048, "PVF": 0}
_SAMPLE_BYTES = {"PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8,
                 "ULAW": 1, "ALAW": 1}
_SLOPPY_FRAMES = 16


def _claimed_frames(log: str, fmt: str, header: bytes) -> int | None:
    """The frame count a header claims where libsndfile reads the length from the file's size instead."""
    if fmt == "RF64" and (m := re.search(r"frame count \d+ does not match value from 'ds64' chunk of (\d+)", log)):
        return int(m.group(1))
    if fmt == "W64":  # its data chunk's size counts the chunk's own 24-byte header
        size, align = re.search(r"^data\s*:\s*(\d+)\s*$", log, re.MULTILINE), re.search(r"Block Align\s*:\s*(\d+)", log)
        if size and align and int(align.group(1)) and int(size.group(1)) < _UNKNOWN_LENGTH:
            return (int(size.group(1)) - 24) // int(align.group(1))
    if fmt == "AVR" and (m := re.search(r"^\s*Frames\s*:\s*(\d+)", log, re.MULTILINE)):
        return int(m.group(1))
    if fmt == "NIST" and (m := re.search(rb"sample_count\s+-i\s+(\d+)", header)):
        return int(m.group(1))
    return None


def _first_bytes(handle: str | BinaryIO, count: int = 1024) -> bytes:
    """A file's first `count` bytes, its position left where it was."""
    if isinstance(handle, str):
        with open(handle, "rb") as f:
            return f.read(count)
    at = handle.tell()
    try:
        handle.seek(0)
        return handle.read(count) or b""
    finally:
        handle.seek(at)


def _check_whole(path: str, f: sf.SoundFile, handle: str | BinaryIO) -> None:
    check_header(path, f.samplerate, f.channels, f.frames)
    cut = truncation(f.extra_info, f.format, f.frames, f.channels, f.subtype,
                     _first_bytes(handle) if f.format == "NIST" else b"")
    if cut:
        raise AudioError(path, cut)


def _block_frames(channels: int) -> int:
    return max(1, READ_BLOCK_BYTES // (4 * channels))


def info(path: str, source: Source | bytes | None = None) -> AudioInfo:
    """Read only the header of an audio file (`source`: an open file or its bytes; default: open `path`).
    Raises AudioError for an unreadable, truncated or out-of-bounds header."""
    handle, guard = _handle(path, source)
    try:
        with sf.SoundFile(handle) as f:
            frames = f.frames
            if frames <= 0 and f.format == "MPEG":  # some MP3s carry no frame count in the header
                frames = sum(len(b) for b in f.blocks(_block_frames(f.channels), dtype="float32", always_2d=True))
            result = AudioInfo(path, f.samplerate, int(frames), f.channels, f.format, f.subtype)
            log = f.extra_info
            header = _first_bytes(handle) if f.format == "NIST" else b""
        if guard is not None:
            guard.raise_failure(path, "unreadable audio")
    except AudioError:
        raise
    except Exception as exc:
        if guard is not None:
            guard.raise_failure(path, "unreadable audio")
        raise AudioError(path, f"unreadable audio: {_reason(exc)}") from exc
    check_header(path, result.sample_rate, result.channels, result.frames)
    cut = truncation(log, result.format, result.frames, result.channels, result.subtype, header)
    if cut:
        raise AudioError(path, cut)
    return result


def to_mono(frames: np.ndarray) -> np.ndarray:
    if frames.ndim == 1:
        return frames.astype(np.float32, copy=False)
    if frames.shape[1] == 1:
        return np.ascontiguousarray(frames[:, 0], dtype=np.float32)
    return frames.mean(axis=1, dtype=np.float32)


def _read_mono(f: sf.SoundFile, count: int | None) -> np.ndarray:
    """Up to `count` frames (None: to the end) from the current position, mixed to mono block by block."""
    block = _block_frames(f.channels)
    if count is None:  # length unknown: block by block to the end
        pieces = [to_mono(b) for b in f.blocks(block, dtype="float32", always_2d=True)]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    out = np.empty(count, dtype=np.float32)
    buffer = np.empty((block, f.channels), dtype=np.float32) if f.channels > 1 else None
    done = 0
    while done < count:
        want = min(block, count - done)
        if buffer is None:  # mono: straight into the output
            got = len(f.read(want, dtype="float32", always_2d=True, out=out[done:done + want, None]))
        else:
            frames = f.read(want, dtype="float32", always_2d=True, out=buffer[:want])
            got = len(frames)
            out[done:done + got] = to_mono(frames)
        done += got
        if got < want:
            break
    return out[:done]


@lru_cache(maxsize=16)
def _resampler(orig_sr: int, target_sr: int) -> torch.nn.Module:
    # The windowed-sinc kernel is built once per rate pair, not once per clip.
    import torchaudio.transforms as T

    return T.Resample(orig_sr, target_sr)


@lru_cache(maxsize=16)
def _polyphase(orig_sr: int, target_sr: int) -> tuple[int, int, np.ndarray]:
    """(up, down, FIR filter) for scipy's resample_poly: the ratio with terms at most MAX_RESAMPLE_FACTOR
    nearest target/orig, and the filter resample_poly itself designs (Kaiser window, beta 5), in float32."""
    from scipy.signal import firwin

    ratio = Fraction(target_sr, orig_sr)
    small = ratio if ratio <= 1 else 1 / ratio  # limit_denominator bounds the denominator: work below 1
    small = small.limit_denominator(MAX_RESAMPLE_FACTOR) or Fraction(1, MAX_RESAMPLE_FACTOR)
    ratio = small if ratio <= 1 else 1 / small
    up, down = ratio.numerator, ratio.denominator
    most = max(up, down)
    return up, down, firwin(20 * most + 1, 1.0 / most, window=("kaiser", 5.0)).astype(np.float32)


def polyphase_resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """scipy's polyphase resampler over the ratio nearest target/orig with terms at most MAX_RESAMPLE_FACTOR:
    memory bounded for any pair of rates."""
    from scipy.signal import resample_poly

    up, down, fir = _polyphase(orig_sr, target_sr)
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    return resample_poly(wave, up, down, window=fir).astype(np.float32, copy=False)


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling in bounded memory: torchaudio's windowed sinc for the usual rate pairs (whose
    reduced terms are at most MAX_RESAMPLE_FACTOR), `polyphase_resample` for the rest."""
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if orig_sr == target_sr or wave.size == 0:
        return wave
    if max(orig_sr, target_sr) // gcd(orig_sr, target_sr) > MAX_RESAMPLE_FACTOR:
        return polyphase_resample(wave, orig_sr, target_sr)
    import torch

    with torch.inference_mode():
        return _resampler(orig_sr, target_sr)(torch.from_numpy(wave)).numpy()


def read(
    path: str,
    target_sr: int | None = None,
    start: float = 0.0,
    duration: float | None = None,
    source: Source | bytes | None = None,
) -> tuple[np.ndarray, int]:
    """Decode [start, start + duration) seconds of a file to mono float32, resampled to `target_sr`.

    Returns (wave, sample_rate): every frame of the range that the file holds, or AudioError naming the file
    (truncated, unreadable, a failed read, NaN or infinite samples, a header out of bounds). Only the
    requested frame range is decoded. `source` is an open file or the file's bytes; without it `path` is
    opened from the local disk.
    """
    handle, guard = _handle(path, source)
    try:
        with sf.SoundFile(handle) as f:
            if guard is not None:  # a failed read while opening: that, not what libsndfile made of it
                guard.raise_failure(path, "cannot decode audio")
            _check_whole(path, f, handle)
            sr, total = f.samplerate, f.frames
            first = max(0, int(round(start * sr)))
            wanted = None if duration is None else max(0, int(round(duration * sr)))
            if total > 0:
                first = min(first, total)
                expected = total - first if wanted is None else min(wanted, total - first)
            else:  # no frame count in the header (some MP3s): as far as the stream goes
                expected = None
            if first:
                f.seek(first)
            wave = _read_mono(f, expected if expected is not None else wanted)
            fmt = f.format
        if guard is not None:
            guard.raise_failure(path, "cannot decode audio")
        if expected is not None and len(wave) < expected - (MPEG_FRAME_SLACK if fmt == "MPEG" else 0):
            raise AudioError(path, f"truncated: the header says {total} frames and decoding stopped at frame "
                                   f"{first + len(wave)}")
        if not np.all(np.isfinite(wave)):
            raise AudioError(path, "decoded samples contain NaN or infinity")
        if target_sr is not None and target_sr != sr:
            return resample(wave, sr, target_sr), target_sr
        return wave, sr
    except AudioError:
        raise
    except Exception as exc:  # anything decoding or resampling one file raises is that file's error
        if guard is not None:
            guard.raise_failure(path, "cannot decode audio")
        raise AudioError(path, f"cannot decode audio: {_reason(exc)}") from exc


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
