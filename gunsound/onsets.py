"""Shots counted by what a gunshot repeats: log-mel onsets, the loudest onset of a shot's first 100 ms, and
bursts of automatic fire found as a repeating rise spectrogram (not yet the scoring job's detector: on
gunsound's generated archives it times and finds shots worse than events.detect_onsets; see
benchmarks/shots_real.py).

Imports numpy, scipy and pandas only, like events.py, so that the exported scorer could ship it as it is.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.ndimage import maximum_filter1d

BAND_HZ = (200.0, 4000.0)  # below: wind and traffic rumble; above: the supersonic crack, ahead of the blast
MEL_BANDS = 32
FRAME_SECONDS = 0.005
WINDOW_SECONDS = 0.02


def mel_filterbank(sr: int, n_fft: int, bands: int, low: float, high: float) -> np.ndarray:
    """Triangular filters evenly spaced on the mel scale, (bands, n_fft // 2 + 1)."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    edges = 700.0 * (10 ** (np.linspace(mel(low), mel(high), bands + 2) / 2595.0) - 1.0)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    return np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))


def log_mel(wave: np.ndarray, sr: int, *, bands: int = MEL_BANDS, block: int = 4096) -> np.ndarray:
    """Log-mel levels (dB), one row per FRAME_SECONDS frame, over BAND_HZ; computed `block` frames at a time so
    that a long chunk never holds its whole complex spectrogram."""
    hop = max(1, int(sr * FRAME_SECONDS))
    win = max(8, int(sr * WINDOW_SECONDS))
    n_fft = 1 << int(np.ceil(np.log2(win)))
    frames = len(wave) // hop
    padded = np.concatenate([np.asarray(wave, dtype=np.float32), np.zeros(win, dtype=np.float32)])
    view = np.lib.stride_tricks.sliding_window_view(padded, win)[::hop][:frames]
    weights = mel_filterbank(sr, n_fft, bands, BAND_HZ[0], min(BAND_HZ[1], 0.45 * sr)).astype(np.float32).T
    taper = np.hanning(win).astype(np.float32)
    out = np.empty((frames, bands), dtype=np.float32)
    for at in range(0, frames, block):
        power = np.abs(np.fft.rfft(view[at:at + block] * taper, n_fft)) ** 2
        out[at:at + block] = power @ weights
    return 10.0 * np.log10(out + 1e-10)


def noise_floor(level: np.ndarray, frames_per_second: int) -> np.ndarray:
    """Each band's floor: a low percentile of the past three seconds, in 50 ms steps (so that a long burst does
    not raise its own floor); over the first second its own quietest part, so that a shot at time 0 counts."""
    step = max(1, frames_per_second // 20)
    blocks = len(level) // step
    if blocks == 0:
        return np.repeat(level.min(axis=0, keepdims=True), len(level), axis=0)
    coarse = level[: blocks * step].reshape(blocks, step, -1).mean(axis=1)
    past = pd.DataFrame(coarse).rolling(60, min_periods=1).quantile(0.1).shift(1).to_numpy(copy=True)
    head = np.quantile(level[:frames_per_second], 0.2, axis=0)
    past[:20] = np.fmin(np.nan_to_num(past[:20], nan=np.inf), head)
    floor = np.repeat(past, step, axis=0)
    return np.concatenate([floor, np.repeat(floor[-1:], len(level) - len(floor), axis=0)])


SKIP = 3


def burst_period(rise: np.ndarray, start: int, *, shortest: int, longest: int, span: int,
                 min_correlation: float) -> int | None:
    """The interval (frames) at which a shot's onset pattern repeats after `start`, or None for a single shot.

    Automatic fire repeats one sound: every band's rise recurs one interval later, so the rise spectrogram
    correlates with itself at that lag; a single shot's layered transients, ring and echoes do not recur."""
    first = start + SKIP
    seg = rise[first:max(start + span, first + 2 * longest)]
    seg = seg - seg.mean(axis=0)
    lags = np.arange(shortest, min(longest, len(seg) - 2) + 1)
    if not len(lags):
        return None
    scores = np.array([float((seg[:-lag] * seg[lag:]).sum()
                             / np.sqrt((seg[:-lag] ** 2).sum() * (seg[lag:] ** 2).sum() + 1e-12)) for lag in lags])
    if scores.max() < min_correlation:
        return None
    # Two intervals also repeat: the shortest lag that correlates almost as well is the rate of fire.
    return int(lags[np.argmax(scores >= 0.8 * scores.max())])


def burst_shots(flux: np.ndarray, blast: np.ndarray, standing: np.ndarray, start: int, period: int, *,
                rise_db: float, tooth_ratio: float, tooth_db: float) -> list[int]:
    """The shots of a burst from its first one (frames): one onset near every `period` frames after the last,
    as long as each rises at least `tooth_ratio` as sharply as the burst's shots so far and its blast comes
    within `tooth_db` of theirs. A single weak interval between two good ones is still a shot (a rise masked
    by the previous shot's ring)."""
    frames = len(flux)
    tol = max(2, int(round(0.2 * period)))

    def tooth(after: int) -> int | None:
        lo, hi = after + period - tol, min(frames, after + period + tol + 1)
        if lo >= frames:
            return None
        j = lo + int(np.argmax(flux[lo:hi]))
        strong = flux[j] > rise_db and standing[j]
        if len(teeth) > 1:
            strong = strong and flux[j] >= tooth_ratio * float(np.median(flux[teeth[1:]]))
        return j if strong and blast[j] >= float(np.median(blast[teeth])) - tooth_db else None

    teeth = [start]
    while True:
        j = tooth(teeth[-1])
        if j is None:
            gap = teeth[-1] + period
            j = tooth(gap) if gap < frames else None
            if j is None:
                break
            teeth.append(gap)
        teeth.append(j)
    return teeth


def detect_shots(wave: np.ndarray, sr: int, *, threshold_db: float = 12.0, rise_db: float = 3.0,
                  ring_db: float = 3.0, echo_db: float = 6.0, echo_seconds: float = 1.0,
                  precursor_db: float = 6.0, precursor_seconds: float = 0.1, body_seconds: float = 0.17,
                  shortest_seconds: float = 0.04, min_correlation: float = 0.25, tooth_ratio: float = 0.3,
                  new_shot_ratio: float = 0.5, body_ratio: float = 0.8, tooth_db: float = 3.0) -> np.ndarray:
    """Gunshots in seconds.

    Candidates: the log-mel rise (each band over its quietest of the last 15 ms, averaged) peaks above
    `rise_db` while the bands stand on average `threshold_db` above their noise floor.

    A shot is the loudest onset of its first `precursor_seconds` (a hammer click or a bolt before the blast
    is not the shot). Within `body_seconds` of it nothing else counts unless its rise spectrogram repeats at
    an interval of `shortest_seconds` or more (automatic fire, see burst_period): then every interval that
    brings an onset at least `tooth_ratio` as strong as the burst's own is a shot. Later, while the shot
    rings, a new blast must come within `ring_db` of its peak; within `echo_seconds` after it died, within
    `echo_db`, so that echoes and reverberation are not shots."""
    fps = int(round(1.0 / FRAME_SECONDS))
    level = log_mel(wave, sr).astype(np.float64)
    frames = len(level)
    if frames < 3:
        return np.zeros(0)
    floor = noise_floor(level, fps)
    excess = np.clip(level - floor, 0.0, None).mean(axis=1)
    quietest = pd.DataFrame(level).shift(1).rolling(3, min_periods=1).min().to_numpy()
    rise = np.clip(level - np.where(np.isnan(quietest), floor, quietest), 0.0, None)
    flux = rise.mean(axis=1)
    loud = level.mean(axis=1)
    blast = maximum_filter1d(loud, size=3, origin=-1)  # a blast may climb over more than one frame
    # A blast stands above the floor for tens of ms; a crackle or a click for a frame or two.
    standing = pd.Series(excess[::-1]).rolling(4, min_periods=1).median().to_numpy()[::-1]
    candidates = np.where((flux == maximum_filter1d(flux, size=5)) & (flux > rise_db)
                          & (standing > threshold_db))[0]
    body, shortest = int(body_seconds * fps), max(2, int(shortest_seconds * fps))
    echo, precursor = int(echo_seconds * fps), int(precursor_seconds * fps)
    onsets: list[int] = []
    peak, strongest, last, ring_end = -np.inf, 0.0, -(10**9), -1
    for c in candidates:
        if c <= last or (onsets and c - onsets[-1] < shortest):
            continue
        ringing = c <= ring_end
        if onsets and c - last < body and flux[c] < body_ratio * strongest:
            continue  # a layered transient of the shot; a second shot this soon rises almost as sharply
        if ringing and (blast[c] < peak - ring_db or flux[c] < new_shot_ratio * strongest):
            continue
        if not ringing and c - last < echo + body and (blast[c] < peak - echo_db
                                                       or flux[c] < new_shot_ratio * strongest):
            continue
        start = int(c)
        while True:  # a click or a bolt before the blast is not the shot: the loudest onset soon after is
            ahead = candidates[(candidates > start) & (candidates <= start + precursor)]
            louder = ahead[blast[ahead] >= blast[start] + precursor_db]
            if not len(louder):
                break
            start = int(louder[np.argmax(blast[louder])])
        teeth = [start]
        period = burst_period(rise, start, shortest=shortest, longest=body, span=fps // 2,
                              min_correlation=min_correlation)
        if period:
            teeth = burst_shots(flux, blast, standing > threshold_db, start, period, rise_db=rise_db,
                                tooth_ratio=tooth_ratio, tooth_db=tooth_db)
        onsets.extend(teeth)
        peak, strongest = float(blast[start]), float(flux[start])
        last = teeth[-1]
        ring_end = last
        while ring_end + 1 < frames and excess[ring_end + 1] > threshold_db:
            ring_end += 1
    # A frame's level is that of its window, so a step in level shows when the window's middle passes it:
    # frames are timed at their window's centre (timed at its start, every shot would come half a window early).
    hop, win = max(1, int(sr * FRAME_SECONDS)), max(8, int(sr * WINDOW_SECONDS))
    return (np.array(onsets, dtype=np.float64) * hop + win / 2) / sr
