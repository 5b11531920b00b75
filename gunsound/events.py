"""Shots and per-file results: muzzle-blast onsets, bursts of automatic fire, and the per-file summary row.

This module imports no gunsound module and no Ray: the exported scorer ships it as it is (numpy, scipy,
pandas).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.signal import butter, sosfilt

BLAST_BAND_HZ = (200.0, 2000.0)


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
