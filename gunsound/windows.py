"""Where scoring windows fall in a file, which chunk of work owns each, and cutting them out of a read.

A file is split into chunks (units of work, each read as one frame range) and every chunk into windows. A
window belongs to the chunk where it starts; a chunk reads one window length past its last window's start, so
windows at chunk edges are scored once, never lost and never counted twice. A shot belongs to the chunk whose
span it falls in (from its first window's start to the next chunk's); each chunk's read reaches a little past
that span on both sides, so that a shot at an edge is judged by the same sound in both chunks.

This module imports no gunsound module and no Ray: the exported scorer ships it as it is (numpy only).
"""

from __future__ import annotations

import math

import numpy as np


def window_starts(duration: float, window: float, hop: float) -> np.ndarray:
    """Start times of the windows that cover a file: the last may run past the end (padded)."""
    if duration <= 0:
        return np.zeros(0)
    count = max(1, int(math.ceil(max(duration - window, 0) / hop - 1e-9)) + 1)
    return np.arange(count) * hop


# What a chunk reads around the span whose shots it owns: before it, the shot detector's noise floor looks back
# 3 s, and a shot, ring or burst that began before the edge must be heard as one (not as a new shot at the
# read's start). After it, the detector reads on to tell whether a shot just before the edge opens a burst of
# automatic fire and which of the burst's shots count; a read that stops short of that counts a burst across the
# edge from a part of it, unlike one read of the whole file. `onsets.burst_period` correlates the next half second
# (`detect_shots` gives it fps // 2 frames), and `find_shots` takes a steady run from three blasts, up to two of
# its longest intervals (0.25 s) apart, with the shots up to its shortest one (0.04 s) past the last. Both read a
# few frames further (half the 20 ms analysis window, 15 ms filters): FRAME_REACH. tests/test_windows.py checks
# these against the detector's own constants. Reads start on a 5 ms grid; `onsets.chunk_onsets` trims a read's
# head to the detector's frames at the model's rate.
SHOT_CONTEXT_BEFORE = 3.0
BURST_LOOK_AHEAD = max(0.5, 2 * 0.25 + 0.04)
FRAME_REACH = 0.05
SHOT_CONTEXT_AFTER = BURST_LOOK_AHEAD + FRAME_REACH
_FRAME = 0.005


def plan_chunks(path: str, duration: float, *, window_seconds: float, hop_seconds: float,
                read_seconds: float) -> list[dict]:
    """Chunks of a file: each owns the windows starting inside [start, start + read_seconds), and the shots from
    its first window's start to the next chunk's (`owned_end`; the file's end for the last chunk)."""
    starts = window_starts(duration, window_seconds, hop_seconds)
    chunks = []
    per_chunk = max(1, int(round(read_seconds / hop_seconds)))
    for i in range(0, len(starts), per_chunk):
        owned = starts[i:i + per_chunk]
        owned_end = float(starts[i + per_chunk]) if i + per_chunk < len(starts) else float(duration)
        read_start = 0.0 if i == 0 else max(0.0, math.floor((owned[0] - SHOT_CONTEXT_BEFORE) / _FRAME + 1e-6) * _FRAME)
        read_end = max(float(owned[-1] + window_seconds), min(float(duration), owned_end + SHOT_CONTEXT_AFTER))
        chunks.append({"path": path, "chunk": i // per_chunk, "first_window": i, "starts": owned.tolist(),
                       "read_start": read_start, "read_end": read_end, "owned_end": owned_end,
                       "duration": duration, "hop": hop_seconds})
    return chunks


def cut_windows(wave: np.ndarray, sr: int, read_start: float, starts: np.ndarray, window: int) -> np.ndarray:
    """(windows, window samples) float32: each window from its start in a chunk read from read_start,
    zero-padded where the audio ends."""
    out = np.zeros((len(starts), window), dtype=np.float32)
    for j, start in enumerate(starts):
        piece = wave[int(round((start - read_start) * sr)):][:window]
        out[j, : len(piece)] = piece
    return out


def pack_chunks(chunks: list[dict], batch_windows: int) -> list[list[dict]]:
    """Consecutive chunks packed into read groups of at most `batch_windows` windows, so that one read call
    feeds the model a full batch from many short files; a chunk that holds more stands alone (a long file's
    chunks stay separate units of parallel work). A chunk without windows (a file that cannot be scored)
    counts as one."""
    groups: list[list[dict]] = []
    group: list[dict] = []
    size = 0
    for chunk in chunks:
        weight = max(1, len(chunk["starts"]))
        if group and size + weight > batch_windows:
            groups.append(group)
            group, size = [], 0
        group.append(chunk)
        size += weight
    if group:
        groups.append(group)
    return groups
