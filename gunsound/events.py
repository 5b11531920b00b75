"""Shots and per-file results: muzzle-blast onsets, bursts of automatic fire, and the per-file summary row.

This module imports no gunsound module and no Ray: the exported scorer ships it as it is (numpy, scipy,
pandas).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd
from scipy.ndimage import maximum_filter1d
from scipy.signal import butter, sosfilt

BLAST_BAND_HZ = (200.0, 2000.0)
FRAME_SECONDS = 0.005


def band_level_db(wave: np.ndarray, sr: int, frame: int) -> np.ndarray:
    """Short-time level (dB) of the muzzle blast's band, one value per frame of `frame` samples.

    The band is 200 Hz to 2 kHz. Below it are wind and traffic rumble; above it the supersonic crack, which
    reaches the microphone up to ~100 ms before the blast and, counted in a broadband energy, times a shot
    early or counts it twice."""
    frames = len(wave) // frame
    band = sosfilt(_blast_filter(sr), np.asarray(wave, dtype=np.float64))
    return 20 * np.log10(np.sqrt(np.mean(band[: frames * frame].reshape(frames, frame) ** 2, axis=1)) + 1e-9)


@lru_cache(maxsize=8)
def _blast_filter(sr: int) -> np.ndarray:
    """The blast band's filter at `sr`, designed once: designing it cost more than filtering a short clip."""
    return butter(4, [BLAST_BAND_HZ[0], min(BLAST_BAND_HZ[1], 0.45 * sr)], btype="band", fs=sr, output="sos")


def detect_onsets(wave: np.ndarray, sr: int, *, threshold_db: float = 12.0, rise_db: float = 6.0,
                  min_gap: float = 0.03, ring_db: float = 3.0, release_db: float = 30.0, echo_db: float = 6.0,
                  echo_seconds: float = 1.0) -> np.ndarray:
    """Muzzle blasts in seconds: the band level jumps `rise_db` over its quietest of the last 15 ms and stands
    `threshold_db` above the noise floor (a low percentile of the past second, so that a dense burst does not
    raise its own floor; the first second's own quietest part where there is no past, so that a shot at the
    very start of a file counts).

    A shot then rings until its level has fallen `release_db` below its peak. While it rings, a new blast must
    come within `ring_db` of that peak (automatic fire: each blast as loud as the last), so the ripples of one
    shot's ring are not shots; once it has died away, a sound within `echo_seconds` must come within
    `echo_db` of the peak, so an echo off a wall is not a shot. Blasts closer than `min_gap` (2000 rounds per
    minute) are one."""
    frame = max(1, int(sr * FRAME_SECONDS))
    frames = len(wave) // frame
    if frames < 3:
        return np.zeros(0)
    level = band_level_db(wave, sr, frame)
    second = int(round(1.0 / FRAME_SECONDS))
    past = pd.Series(level).rolling(second, min_periods=1).quantile(0.2).shift(1).to_numpy()
    head = np.quantile(level[:second], 0.2)
    floor = np.where(np.arange(frames) < second, np.fmin(np.nan_to_num(past, nan=head), head), past)
    # In automatic fire the next blast lands on the previous shot's ring and may climb over more than a frame.
    quietest = pd.Series(level).shift(1).rolling(3, min_periods=1).min().to_numpy()
    quietest = np.where(np.isnan(quietest), floor, quietest)
    candidate = (level - floor > threshold_db) & (level - quietest > rise_db)
    # A blast's own peak: the loudest of its first 15 ms (a blast may climb over more than one frame).
    blast = maximum_filter1d(level, size=3, origin=-1)
    onsets: list[float] = []
    last, peak, ringing = -np.inf, -np.inf, False
    for c in range(frames):
        if ringing:
            peak = max(peak, level[c])  # a shot's peak may come some ms after its onset
            ringing = level[c] >= max(peak - release_db, floor[c] + threshold_db)
        if not candidate[c]:
            continue
        t = c * frame / sr
        if t - last < min_gap or (ringing and blast[c] < peak - ring_db):
            continue
        if not ringing and t - last < echo_seconds and blast[c] < peak - echo_db:
            continue
        onsets.append(t)
        last, peak, ringing = t, blast[c], True
    return np.array(onsets)


def chunk_onsets(wave: np.ndarray, sr: int, *, read_start: float, starts: np.ndarray, hop: float,
                 duration: float, threshold_db: float) -> np.ndarray:
    """The onsets (seconds in the file) that a chunk owns: from its first window's start up to where the next
    chunk's first window starts, or to the file's end for the last chunk; so each shot is found once."""
    owned_end = starts[-1] + hop
    found = detect_onsets(wave, sr, threshold_db=threshold_db) + read_start
    last_chunk = owned_end >= duration
    return found[(found >= starts[0]) & ((found < owned_end) | last_chunk) & (found < duration)]


def summarize_file(path: str, duration: float, windows: pd.DataFrame, onsets: np.ndarray, classes: list[str], *,
                   method: str, threshold: float, error: str = "") -> tuple[dict, list[dict]]:
    """The per-file row and its events. `windows` has start, end and probs (one array per window). A window
    whose probabilities all stay under the threshold is 'no gunshot'; an onset inside a gunshot window becomes
    an event of that window's class. `method` "Fix" ranks classes by their mean over the file, "Sliding" by
    their peak."""
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
    gunshot = probs.max(axis=1) >= threshold
    row["gunshot_windows"] = int(gunshot.sum())
    score = mean if method == "Fix" else peak
    top = int(score.argmax())
    row["top_class"] = classes[top] if (method == "Fix" or gunshot.any()) else "no gunshot"
    row["top_probability"] = float(score[top])
    events = []
    starts, ends = windows["start"].to_numpy(), windows["end"].to_numpy()
    for t in np.sort(onsets):
        covering = (starts <= t) & (t < ends)
        if not covering.any():
            continue
        p = probs[covering].mean(axis=0)
        if p.max() < threshold:
            continue
        events.append({"file": path, "time": float(t), "class": classes[int(p.argmax())],
                       "probability": float(p.max())})
    bursts(events)
    row["shots"] = len(events)
    return row, events


def bursts(events: list[dict], max_gap: float = 0.5) -> None:
    """Group shots (sorted by time) less than max_gap apart into bursts, in place: each event gets its burst
    number, the burst's shot count and its rate of fire, 60 / median interval."""
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
