"""Where the shots are: `find_shots`, the scoring job's detector, and the two detectors it combines.

- `detect_shots` counts what a gunshot repeats: log-mel onsets, the loudest onset of a shot's first 100 ms,
  bursts of automatic fire found as a repeating rise spectrogram. It counts a real shot's echoes and ring as
  no shots, but misses automatic fire whose first shot rises far more sharply than the next ones.
- `detect_onsets` finds muzzle blasts by the level of their band: it finds those bursts, and counts a real
  single shot's echoes as shots (benchmarks/shots_real.py has both on real recordings).

This module imports no gunsound module and no Ray: the exported scorer ships it as it is (numpy, scipy,
pandas).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd
from scipy.fft import irfft, rfft
from scipy.ndimage import maximum_filter1d
from scipy.signal import butter, firwin, resample_poly, sosfilt
from scipy.sparse import csr_array

BAND_HZ = (200.0, 4000.0)  # below: wind and traffic rumble; above: the supersonic crack, ahead of the blast
MEL_BANDS = 32
FRAME_SECONDS = 0.005
WINDOW_SECONDS = 0.02
SHOT_DETECTOR = "onsets.find_shots 2026-11-30 (8)"  # the scoring job's detector, as scoring outputs record it
DECIMATED_HZ = 10_000  # the band (up to 4 kHz) stays well under half the decimated rate


def mel_filterbank(sr: int, n_fft: int, bands: int, low: float, high: float) -> np.ndarray:
    """Triangular filters evenly spaced on the mel scale, (bands, n_fft // 2 + 1)."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    edges = 700.0 * (10 ** (np.linspace(mel(low), mel(high), bands + 2) / 2595.0) - 1.0)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    return np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))


def frame_samples(sr: int) -> int:
    """The samples of one FRAME_SECONDS frame at `sr` (both detectors' frame)."""
    return max(1, int(sr * FRAME_SECONDS))


def decimate(wave: np.ndarray, sr: int) -> tuple[np.ndarray, int]:
    """The wave at the lowest rate of at least DECIMATED_HZ that keeps FRAME_SECONDS frames whole (the factor
    divides the frame's samples and the rate), and that rate; as float32. The detectors' bands end at 4 kHz,
    so at 48 kHz this makes their work four times smaller with the same frames."""
    wave = np.asarray(wave, dtype=np.float32)
    hop = frame_samples(sr)
    factor = max((q for q in range(1, hop + 1) if hop % q == 0 and sr % q == 0 and sr / q >= DECIMATED_HZ),
                 default=1)
    if factor == 1:
        return wave, sr
    low = resample_poly(wave, 1, factor, window=_decimation_filter(sr, factor))
    return low.astype(np.float32, copy=False), sr // factor


@lru_cache(maxsize=8)
def _decimation_filter(sr: int, factor: int) -> np.ndarray:
    """The low-pass for decimating `sr` by `factor`: flat over BAND_HZ, 40-50 dB down (a Hamming window) from
    where a frequency would fold into it at the new rate (the rate less 4 kHz), and no longer than that
    transition needs: 39 taps from 48 kHz to 12 kHz (scipy's default has 81), 49 from 44.1 to 11.025 kHz."""
    rate, top = sr / factor, BAND_HZ[1]
    folds = rate - top
    taps = int(3.3 * sr / (folds - top)) | 1
    return firwin(taps, (top + folds) / 2, window="hamming", fs=sr)


def log_mel(wave: np.ndarray, sr: int, *, bands: int = MEL_BANDS, block: int = 4096) -> np.ndarray:
    """Log-mel levels (dB), one row per FRAME_SECONDS frame (centred on it), over BAND_HZ, computed on the
    decimated wave and `block` frames at a time, so that a long chunk never holds its whole complex
    spectrogram."""
    wave, rate = decimate(wave, sr)
    hop = frame_samples(sr) * rate // sr
    win = max(8, int(rate * WINDOW_SECONDS))
    n_fft = 1 << int(np.ceil(np.log2(win)))
    frames = len(wave) // hop
    # Frame k is centred on sample k * hop: a step in level shows when the window's middle passes it, and a
    # shot at the very start of the wave is timed at 0, not half a window late.
    padded = np.concatenate([np.zeros(win // 2, dtype=np.float32), wave, np.zeros(win, dtype=np.float32)])
    view = np.lib.stride_tricks.sliding_window_view(padded, win)[::hop][:frames]
    weights = _band_weights(rate, n_fft, bands)
    taper = np.hanning(win).astype(np.float32)
    out = np.empty((frames, bands), dtype=np.float32)
    for at in range(0, frames, block):
        spectrum = rfft(view[at:at + block] * taper, n_fft)  # scipy keeps float32 (numpy's FFT works in float64)
        out[at:at + block] = (spectrum.real ** 2 + spectrum.imag ** 2) @ weights
    return 10.0 * np.log10(out + 1e-10)


@lru_cache(maxsize=8)
def _band_weights(rate: int, n_fft: int, bands: int) -> csr_array:
    """`log_mel`'s filterbank over BAND_HZ, (n_fft // 2 + 1, bands), as a sparse matrix: each band covers a
    few bins, and a dense product would go through a multithreaded BLAS whose threads spin against the
    scorer's own on a small machine (CPU per chunk doubled on 2 cores)."""
    return csr_array(mel_filterbank(rate, n_fft, bands, BAND_HZ[0], min(BAND_HZ[1], 0.45 * rate)).astype(np.float32).T)


def previous_min(level: np.ndarray, frames: int) -> np.ndarray:
    """Per frame (rows), the quietest of the `frames` frames before it; NaN for the first frame."""
    out = np.full(level.shape, np.nan)
    out[1:] = level[:-1]
    for k in range(2, frames + 1):
        out[k:] = np.minimum(out[k:], level[:-k])
    return out


def columns_rolling_quantile(values: np.ndarray, window: int, q: float) -> np.ndarray:
    """Per column of `values` (rows, columns), the `q` quantile of each row's last `window` rows (fewer at the
    start), as pandas' rolling quantile gives it column by column, in one call: the columns end to end, each
    behind `window` NaNs, which no window spans. A call per column cost more than a short clip's whole
    detection."""
    rows, columns = values.shape
    gapped = np.full((columns, window + rows), np.nan)
    gapped[:, window:] = values.T
    out = pd.Series(gapped.ravel()).rolling(window, min_periods=1).quantile(q).to_numpy()
    return out.reshape(columns, window + rows)[:, window:].T


OPENING_JUMP_DB = 6.0
SILENCE_DB = -90.0  # log_mel gives -100 dB for digital silence (its 1e-10 floor)


def noise_floor(level: np.ndarray, frames_per_second: int) -> np.ndarray:
    """Each band's floor: a low percentile of the past three seconds of sound, in 50 ms steps (so that a long
    burst does not raise its own floor), or silence where none was heard; over the first second its own
    quietest part, so that a shot at time 0 counts, or, where the wave opens quiet and jumps `OPENING_JUMP_DB`
    over that quietest part within 50 ms (a shot a few ms in whose own body fills the first second), the
    level it opens at."""
    step = max(1, frames_per_second // 20)
    blocks = len(level) // step
    if blocks == 0:
        return np.repeat(level.min(axis=0, keepdims=True), len(level), axis=0)
    # Digital silence (a file's leading zeros, a dropout) says nothing of the floor: averaged into a block it
    # would drag that block far under the sound around it, and the quantile would keep it there for 3 s.
    sound = level > SILENCE_DB
    frames = blocks * step
    counts = sound[:frames].reshape(blocks, step, -1).sum(axis=1)
    sums = np.where(sound, level, 0.0)[:frames].reshape(blocks, step, -1).sum(axis=1)
    coarse = np.where(2 * counts > step, sums / np.maximum(counts, 1), np.nan)  # mostly sound, or no sample
    past = np.full_like(coarse, np.nan)
    past[1:] = columns_rolling_quantile(coarse, 60, 0.1)[:-1]
    head = np.quantile(level[:frames_per_second], 0.2, axis=0)  # silence counts here: a shot after it stands
    # Only after such a jump: a fade-in or a few ms of silence before steady sound opens quiet too, and that
    # sound must not stand over a floor it never had (frame 0's window is half padding: +3 dB).
    if level[:step].mean(axis=1).max() - head.mean() >= OPENING_JUMP_DB:
        head = np.fmin(head, level[0] + 3.0)
    past[:20] = np.fmin(past[:20], head)
    past = np.where(np.isnan(past), SILENCE_DB, past)  # nothing heard yet: the floor is silence
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
    lags = np.arange(shortest, min(longest, len(seg) - 2) + 1)
    if not len(lags):  # too near the end of the wave to tell
        return None
    seg = seg - seg.mean(axis=0)
    # Per lag: sum(seg[:-lag] * seg[lag:]) over the bands' autocorrelations (one FFT, no BLAS), and the
    # energies of the two overlapping parts from a running sum.
    spectrum = rfft(seg, 2 * len(seg), axis=0)
    products = irfft((spectrum.real ** 2 + spectrum.imag ** 2).sum(axis=1), 2 * len(seg))[lags]
    energy = np.concatenate([[0.0], np.cumsum((seg ** 2).sum(axis=1))])
    scores = products / np.sqrt(energy[len(seg) - lags] * np.maximum(energy[-1] - energy[lags], 0.0) + 1e-12)
    if scores.max() < min_correlation:
        return None
    # Two intervals also repeat: the shortest lag that correlates almost as well is the rate of fire.
    return int(lags[np.argmax(scores >= 0.8 * scores.max())])


def burst_shots(flux: np.ndarray, blast: np.ndarray, standing: np.ndarray, power: np.ndarray, start: int,
                period: int, *, rise_db: float, tooth_ratio: float, tooth_db: float, fade_ratio: float) -> list[int]:
    """The shots of a burst from its first one (frames): one onset near every `period` frames after the last,
    as long as each rises at least `tooth_ratio` as sharply as the burst's shots so far and its blast comes
    within `tooth_db` of theirs. A single weak interval between two good ones is still a shot (a rise masked
    by the previous shot's ring).

    From the third shot on, the interval an onset opens must also hold no less sound (`power`, per frame) than
    the one before it, less `fade_ratio` times the burst's first interval. The sounds of a burst's shots add
    up: while it goes on, each interval holds every earlier shot's ring and one more blast; once it has
    stopped, an interval loses about a whole first interval of sound (the blast that did not come), while the
    echoes and swells of the shots' rings still arrive at the burst's interval and rise like its shots."""
    frames = len(flux)
    tol = max(2, int(round(0.2 * period)))

    def sound(at: int) -> float:
        return float(power[at:at + period].sum())

    def tooth(after: int) -> int | None:
        lo, hi = after + period - tol, min(frames, after + period + tol + 1)
        if lo >= frames:
            return None
        j = lo + int(np.argmax(flux[lo:hi]))
        strong = flux[j] > rise_db and standing[j]
        if strong and len(teeth) > 1:
            strong = (flux[j] >= tooth_ratio * float(np.median(flux[teeth[1:]]))
                      and sound(j) >= sound(after) - fade_ratio * sound(start))
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


def ring_through(loud: np.ndarray, start: int, *, gap: int) -> int:
    """The last frame of a ring from `start`: the last `loud` frame before `loud` first lapses for more than
    `gap` frames (a designed or reverberant tail dips between its swells without the shot having died)."""
    end, k = start, start
    while k + 1 < len(loud) and k - end <= gap:
        k += 1
        if loud[k]:
            end = k
    return end


def detect_shots(wave: np.ndarray, sr: int, *, threshold_db: float = 12.0, rise_db: float = 3.0,
                  ring_db: float = 3.0, echo_db: float = 6.0, echo_seconds: float = 1.0,
                  precursor_db: float = 6.0, precursor_seconds: float = 0.1, body_seconds: float = 0.17,
                  shortest_seconds: float = 0.04, min_correlation: float = 0.25, tooth_ratio: float = 0.3,
                  new_shot_ratio: float = 0.5, new_shot_db: float = 10.0, body_ratio: float = 0.8,
                  tooth_db: float = 3.0, ring_gap_seconds: float = 0.015, sharp_rise_db: float = 12.0,
                  sharp_margin_db: float = 4.0, fade_ratio: float = 0.6) -> np.ndarray:
    """Gunshots in seconds.

    Candidates: the log-mel rise (each band over its quietest of the last 15 ms, averaged) peaks above
    `rise_db` while the bands stand on average `threshold_db` above their noise floor, or `sharp_margin_db`
    less where the rise reaches `sharp_rise_db`.

    A shot is the loudest onset of its first `precursor_seconds` (a hammer click or a bolt before the blast
    is not the shot). Within `body_seconds` of it nothing else counts unless its rise spectrogram repeats at
    an interval of `shortest_seconds` or more (automatic fire, see burst_period): then every interval that
    brings an onset at least `tooth_ratio` as strong as the burst's own is a shot, until an interval holds
    `fade_ratio` of the burst's first one less sound than the interval before it (see burst_shots). Later, while the shot
    rings, a new blast must come within `ring_db` of its peak; within `echo_seconds` after its tail died (a
    rumble may roll on for seconds, and a tail that lapses for no more than `ring_gap_seconds` has not died),
    within `echo_db`, so that echoes and reverberation are not shots. Either way it
    must rise `new_shot_ratio` as sharply as the shot did or `new_shot_db`, whichever is less: a second shot
    rises out of the first one's ring, not out of silence."""
    fps = int(round(1.0 / FRAME_SECONDS))
    level = log_mel(wave, sr).astype(np.float64)
    frames = len(level)
    if frames < 3:
        return np.zeros(0)
    floor = noise_floor(level, fps)
    excess = np.clip(level - floor, 0.0, None).mean(axis=1)
    quietest = previous_min(level, 3)
    rise = np.clip(level - np.where(np.isnan(quietest), floor, quietest), 0.0, None)
    flux = rise.mean(axis=1)
    loud = level.mean(axis=1)
    power = (10.0 ** (level / 10.0)).sum(axis=1)  # the bands' power: what shots add up to
    blast = maximum_filter1d(loud, size=3, origin=-1)  # a blast may climb over more than one frame
    # A blast stands above the floor for tens of ms; a crackle or a click for a frame or two.
    standing = pd.Series(excess[::-1]).rolling(4, min_periods=1).median().to_numpy()[::-1]
    # A blast rises faster than anything of a bed: one that rises `sharp_rise_db` within 15 ms (averaged over
    # the bands) counts at `sharp_margin_db` less over the floor, so that a shot just out of a loud bed counts.
    stands = (standing > threshold_db) | ((standing > threshold_db - sharp_margin_db) & (flux > sharp_rise_db))
    candidates = np.where((flux == maximum_filter1d(flux, size=5)) & (flux > rise_db) & stands)[0]
    body, shortest = int(body_seconds * fps), max(2, int(shortest_seconds * fps))
    ring_gap = int(ring_gap_seconds * fps)
    loud_frames = excess > threshold_db
    echo, precursor = int(echo_seconds * fps), int(precursor_seconds * fps)
    onsets: list[int] = []
    peak, strongest, new_shot, last, ring_end, tail_end = -np.inf, 0.0, 0.0, -(10**9), -1, -1
    for c in candidates:
        if c <= last or (onsets and c - onsets[-1] < shortest):
            continue
        ringing = c <= ring_end
        if onsets and c - last < body and flux[c] < body_ratio * strongest:
            continue  # a layered transient of the shot; a second shot this soon rises almost as sharply
        if ringing and (blast[c] < peak - ring_db or flux[c] < new_shot):
            continue
        if onsets and not ringing and c - tail_end <= echo and (blast[c] < peak - echo_db or flux[c] < new_shot):
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
            teeth = burst_shots(flux, blast, standing > threshold_db, power, start, period, rise_db=rise_db,
                                tooth_ratio=tooth_ratio, tooth_db=tooth_db, fade_ratio=fade_ratio)
        onsets.extend(teeth)
        peak, strongest = float(blast[start]), float(flux[start])
        new_shot = min(new_shot_ratio * strongest, new_shot_db)
        last = teeth[-1]
        ring_end = ring_through(loud_frames, last, gap=0)
        tail_end = ring_through(loud_frames, ring_end, gap=ring_gap)  # every frame up to ring_end is loud
    return np.array(onsets, dtype=np.float64) * frame_samples(sr) / sr


BLAST_BAND_HZ = (200.0, 2000.0)


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
    """Muzzle blasts in seconds (see `blast_onsets`) of a wave."""
    frame = frame_samples(sr)
    if len(wave) // frame < 3:
        return np.zeros(0)
    return blast_onsets(band_level_db(wave, sr, frame), frame, sr, threshold_db=threshold_db, rise_db=rise_db,
                        min_gap=min_gap, ring_db=ring_db, release_db=release_db, echo_db=echo_db,
                        echo_seconds=echo_seconds)[0]


def blast_onsets(level: np.ndarray, frame: int, sr: int, *, threshold_db: float = 12.0, rise_db: float = 6.0,
                 min_gap: float = 0.03, ring_db: float = 3.0, release_db: float = 30.0, echo_db: float = 6.0,
                 echo_seconds: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Muzzle blasts in the blast band's level (dB per frame of `frame` samples at `sr`): their times in seconds and
    their peak levels. A blast: the band level jumps `rise_db` over its quietest of the last 15 ms and stands
    `threshold_db` above the noise floor (a low percentile of the past second, so that a dense burst does not
    raise its own floor; the first second's own quietest part where there is no past, so that a shot at the
    very start of a file counts).

    A shot then rings until its level has fallen `release_db` below its peak. While it rings, a new blast must
    come within `ring_db` of that peak (automatic fire: each blast as loud as the last), so the ripples of one
    shot's ring are not shots; once it has died away, a sound within `echo_seconds` must come within
    `echo_db` of the peak, so an echo off a wall is not a shot. Blasts closer than `min_gap` (2000 rounds per
    minute) are one."""
    frames = len(level)
    second = int(round(1.0 / FRAME_SECONDS))
    past = pd.Series(level).rolling(second, min_periods=1).quantile(0.2).shift(1).to_numpy()
    head = np.quantile(level[:second], 0.2)
    floor = np.where(np.arange(frames) < second, np.fmin(np.nan_to_num(past, nan=head), head), past)
    # In automatic fire the next blast lands on the previous shot's ring and may climb over more than a frame.
    quietest = previous_min(level, 3)
    quietest = np.where(np.isnan(quietest), floor, quietest)
    candidate = (level - floor > threshold_db) & (level - quietest > rise_db)
    # A blast's own peak: the loudest of its first 15 ms (a blast may climb over more than one frame).
    blast = maximum_filter1d(level, size=3, origin=-1)
    # Gaps in whole frames, not float seconds from the read's start: whether two blasts exactly `min_gap` apart
    # are one must not depend on where a chunk's read begins.
    gap_frames, echo_frames = min_gap * sr / frame - 1e-9, echo_seconds * sr / frame - 1e-9
    onsets: list[int] = []
    peaks: list[float] = []
    last, peak, ringing = -(10**9), -np.inf, False
    for c in range(frames):
        if ringing:
            peak = max(peak, level[c])  # a shot's peak may come some ms after its onset
            ringing = level[c] >= max(peak - release_db, floor[c] + threshold_db)
        if not candidate[c]:
            continue
        if c - last < gap_frames or (ringing and blast[c] < peak - ring_db):
            continue
        if not ringing and c - last < echo_frames and blast[c] < peak - echo_db:
            continue
        onsets.append(c)
        peaks.append(float(blast[c]))
        last, peak, ringing = c, blast[c], True
    return np.array(onsets, dtype=np.float64) * frame / sr, np.array(peaks)


def steady_runs(onsets: np.ndarray, *, shortest: float, longest: float, spread: float, min_shots: int,
                slack: float = 0.0) -> list[tuple[int, int]]:
    """(first, last) indices of the runs of at least `min_shots` onsets whose intervals lie between
    `shortest` and `longest` seconds and within a factor `spread` of each other: the steady rate of fire of
    an automatic weapon (a shot's echoes and ring come at no steady rate). `slack` (half a frame) widens each
    limit by what timing onsets to whole frames can move an interval."""
    runs, first = [], 0
    while first < len(onsets):
        last = first
        while last + 1 < len(onsets):
            gaps = np.diff(onsets[first:last + 2])
            if (not shortest - slack <= gaps[-1] <= longest + slack
                    or gaps.max() - slack > spread * (gaps.min() + slack)):
                break
            last += 1
        if last - first + 1 >= min_shots:
            runs.append((first, last))
            first = last + 1
        else:
            first += 1
    return runs


def run_span(shots: np.ndarray, blasts: np.ndarray, first: int, last: int, *, tolerance: float,
             after: float) -> np.ndarray:
    """Which of `shots` fall in the run of blasts `first` to `last`: from `tolerance` before its first blast to
    `after` past its last."""
    return (shots >= blasts[first] - tolerance) & (shots <= blasts[last] + after)


def runs_to_take(shots: np.ndarray, blasts: np.ndarray, peaks: np.ndarray, runs: list[tuple[int, int]], *,
                 min_shots: int, even_db: float, tolerance: float, before: float, after: float,
                 reflections: float) -> list[tuple[int, int]]:
    """The steady runs of blasts (times, peak levels in dB) whose blasts are the shots in place of `shots`:
    - a quieter click before the first blast or a fading last one (`even_db` under the run's loudest) is left
      out first, as long as `min_shots` blasts stay; then every blast must come within `even_db` of the
      loudest (automatic fire is even);
    - one of `shots` lies within `tolerance` of one of its blasts (anchored), and none in the `before`
      seconds ahead of its first blast (then the run is that shot's layers, ring or echoes);
    - `shots` holds fewer shots than the run over its span (to `after` past its last blast);
    - a run of only `min_shots` blasts spans `reflections` seconds or more: shorter, it is one shot and its
      first reflections off walls and buildings (paths up to ~45 m longer arrive within 130 ms, as loud
      as the blast where the surfaces are near and hard), which `detect_shots` read as one shot."""
    taken = []
    for first, last in runs:
        loudest = peaks[first:last + 1].max()
        while last - first + 1 > min_shots and peaks[first] < loudest - even_db:
            first += 1
        while last - first + 1 > min_shots and peaks[last] < loudest - even_db:
            last -= 1
        start = blasts[first] - tolerance
        inside = run_span(shots, blasts, first, last, tolerance=tolerance, after=after)
        anchored = bool((np.abs(shots[:, None] - blasts[None, first:last + 1]) <= tolerance).any())
        after_shot = bool(((shots < start) & (shots >= start - before)).any())
        even = peaks[first:last + 1].min() >= loudest - even_db
        # Blasts fall on whole frames: a span of exactly `reflections` must not come out a hair under it.
        reflected = last - first + 1 <= min_shots and blasts[last] - blasts[first] < reflections - 1e-9
        if even and anchored and not after_shot and not reflected and inside.sum() < last - first + 1:
            taken.append((first, last))
    return taken


def find_shots(wave: np.ndarray, sr: int, *, threshold_db: float = 12.0, shortest: float = 0.04,
               longest: float = 0.25, spread: float = 1.3, min_shots: int = 3, even_db: float = 6.0,
               tolerance: float = 0.015, reflections: float = 0.13) -> np.ndarray:
    """Gunshots in seconds: the scoring job's detector. The shots of `detect_shots`, except where the blasts
    of `detect_onsets` make a steady run (`steady_runs`: 240 to 1500 rounds per minute by default) that
    `detect_shots` reads as fewer shots: automatic fire whose first shot rose so sharply that it hid the next
    ones, or whose rise pattern did not repeat well enough. There the run's blasts are the shots when it is
    even and anchored on one of `detect_shots`' shots (`runs_to_take`). Both detectors run on one decimated
    copy of the wave."""
    wave, sr = decimate(wave, sr)
    shots = detect_shots(wave, sr, threshold_db=threshold_db)
    frame = frame_samples(sr)
    if not len(shots) or len(wave) // frame < 3:  # a run counts only where detect_shots found one of its shots
        return shots
    blasts, peaks = blast_onsets(band_level_db(wave, sr, frame), frame, sr, threshold_db=threshold_db)
    runs = steady_runs(blasts, shortest=shortest, longest=longest, spread=spread, min_shots=min_shots,
                       slack=frame / sr / 2)
    for first, last in runs_to_take(shots, blasts, peaks, runs, min_shots=min_shots, even_db=even_db,
                                    tolerance=tolerance, before=longest, after=shortest,
                                    reflections=reflections):
        inside = run_span(shots, blasts, first, last, tolerance=tolerance, after=shortest)
        shots = np.concatenate([shots[~inside], blasts[first:last + 1]])
    return np.sort(shots)


def chunk_onsets(wave: np.ndarray, sr: int, *, read_start: float, owned_start: float, owned_end: float,
                 threshold_db: float) -> np.ndarray:
    """The shots (seconds in the file) that a chunk owns, in [owned_start, owned_end): from its first window's
    start to the next chunk's, or to the file's end for the last chunk (`windows.plan_chunks`), so each shot is
    found once. The wave, read from `read_start`, reaches past that span on both sides: a shot's tail at the
    span's start is heard as the tail of a shot before it, not as a shot at the start of the read.

    The detector times shots on frames of `frame_samples(sr)` counted from the wave's first sample, so the read
    is first trimmed to start on a whole frame of the file: then every chunk, and one read of the whole file,
    frame the audio alike. A read start on the 5 ms grid is not a whole frame where a frame is not 5 ms (220
    samples at 44.1 kHz): two chunks would time one shot a few ms apart, on either side of their edge, and both
    count it. Shots are timed from their frame in the file, so that both chunks give one shot the same time."""
    frame = frame_samples(sr)
    first = int(round(read_start * sr))  # the file's sample at wave[0], as the read rounds its start
    skip = -first % frame
    found = find_shots(wave[skip:], sr, threshold_db=threshold_db)
    frames = (first + skip) // frame + np.rint(found * sr / frame)
    found = frames * frame / sr
    return found[(found >= owned_start) & (found < owned_end)]
