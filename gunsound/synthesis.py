"""Synthetic gunshot recordings from a simple physical model, in the Hydrogen Torch dataset layout.

Each shot is a muzzle blast (a Friedlander pressure wave) coloured by the weapon's resonances, preceded by
the supersonic bullet's N-wave crack when the round is supersonic, and followed by the action's mechanical
click. Shots follow the weapon's cyclic rate of fire in bursts (single shots for the pistol). Distance
scales the level, low-passes the sound (air absorption) and sets the crack's lead over the blast; echoes,
background noise, gain, sample rate, channel count, bit depth and duration vary per clip.

It is the embedded default dataset and the test fixture. Deterministic for a seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from scipy.signal import lfilter

SPEED_OF_SOUND = 343.0
DATA_FOLDER = "Gun_Classifier"
DATAFRAME = "train.pq"


@dataclass(frozen=True)
class Weapon:
    rate_of_fire: float  # rounds per minute (cyclic); 0 for semi-automatic only
    burst: tuple[int, int]  # shots per burst, inclusive range
    blast_ms: float  # positive-phase duration of the muzzle blast
    resonances: tuple[float, ...]  # Hz: the blast's spectral colour
    bullet_speed: float  # m/s; below the speed of sound there is no crack
    click_hz: float  # the action's mechanical click


# Rates of fire and muzzle velocities are the weapons' published figures; the acoustic colour is a model.
WEAPONS: dict[str, Weapon] = {
    "AK-12": Weapon(700, (2, 5), 2.2, (520.0, 1900.0), 900, 5200),
    "AK-47": Weapon(600, (2, 5), 2.9, (360.0, 1350.0), 715, 4300),
    "IMI Desert Eagle": Weapon(0, (1, 2), 3.8, (240.0, 820.0), 470, 3100),
    "M16": Weapon(800, (1, 3), 1.6, (720.0, 2700.0), 960, 6100),
    "M249": Weapon(850, (5, 10), 1.9, (640.0, 2250.0), 915, 3700),
    "M4": Weapon(900, (2, 5), 1.3, (900.0, 3200.0), 880, 7000),
    "MG-42": Weapon(1200, (6, 14), 3.1, (300.0, 1150.0), 755, 2600),
    "MP5": Weapon(800, (2, 6), 0.9, (1150.0, 3800.0), 340, 8000),
    # A short-barrelled carbine: a brighter, shorter blast than the rifles firing the same round.
    "Zastava M92": Weapon(620, (1, 4), 1.8, (440.0, 2500.0), 680, 4800),
}
CLASSES = list(WEAPONS)
BACKGROUND = "background"


@dataclass(frozen=True)
class ClipFormat:
    sample_rate: int
    channels: int
    subtype: str
    seconds: float


def _choose_format(rng: np.random.Generator) -> ClipFormat:
    # Mostly 2 s at 48 kHz, as in the real set; some 44.1 kHz, a few other rates and a few long clips.
    sample_rate = int(rng.choice([48000, 44100, 32000, 96000], p=[0.75, 0.17, 0.04, 0.04]))
    channels = int(rng.choice([1, 2], p=[0.75, 0.25]))
    subtype = str(rng.choice(["PCM_16", "PCM_24", "FLOAT", "PCM_U8"], p=[0.7, 0.18, 0.1, 0.02]))
    if subtype == "PCM_U8":
        subtype = "PCM_16"  # WAV 8-bit exists in the wild but is too coarse for quiet backgrounds
    seconds = 2.0 if rng.random() < 0.95 else float(rng.uniform(5.0, 20.0))
    return ClipFormat(sample_rate, channels, subtype, seconds)


def _lowpass(x: np.ndarray, cutoff: float, sr: int) -> np.ndarray:
    a = float(np.exp(-2 * np.pi * min(cutoff, 0.45 * sr) / sr))
    return lfilter([1 - a], [1, -a], x)


def _shot(weapon: Weapon, sr: int, distance: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """One shot's waveform and the offset (s) of its muzzle blast within it."""
    length = int(0.12 * sr)
    t = np.arange(length) / sr
    blast_t = weapon.blast_ms * 1e-3 * rng.uniform(0.9, 1.1)
    # The crack travels with the bullet and reaches the microphone before the blast.
    crack_lead = max(0.0, distance / SPEED_OF_SOUND - distance / weapon.bullet_speed) * rng.uniform(0.3, 0.8)
    crack_lead = min(crack_lead, 0.08)
    onset = crack_lead
    tb = t - onset
    pos = tb >= 0
    friedlander = np.where(pos, (1 - tb / blast_t) * np.exp(-1.8 * np.clip(tb, 0, None) / blast_t), 0.0)
    wave = friedlander
    for k, f0 in enumerate(weapon.resonances):
        f = f0 * rng.uniform(0.93, 1.07)
        decay = rng.uniform(4, 9) / f0 * (3 if k == 0 else 1.5)
        wave = wave + np.where(pos, 0.7 / (k + 1) * np.exp(-np.clip(tb, 0, None) / decay)
                               * np.sin(2 * np.pi * f * tb + rng.uniform(0, 2 * np.pi)), 0.0)
    if weapon.bullet_speed > SPEED_OF_SOUND:
        n_len = max(2, int(rng.uniform(2.5e-4, 4.5e-4) * sr))
        n_wave = np.linspace(1, -1, n_len) * 0.8 * rng.uniform(0.6, 1.0)
        wave[:n_len] += n_wave
    click_at = onset + rng.uniform(0.03, 0.05)
    tc = t - click_at
    wave = wave + np.where(tc >= 0, 0.05 * np.exp(-np.clip(tc, 0, None) / 0.002)
                           * np.sin(2 * np.pi * weapon.click_hz * tc), 0.0)
    return wave, onset


def _shot_times(weapon: Weapon, seconds: float, rng: np.random.Generator) -> list[float]:
    """Times of the muzzle blasts: bursts at the rate of fire; single shots for semi-automatic weapons."""
    times: list[float] = []
    t = rng.uniform(0.05, 0.45)
    while t < seconds - 0.15:
        n = int(rng.integers(weapon.burst[0], weapon.burst[1] + 1))
        if weapon.rate_of_fire:
            interval = 60.0 / weapon.rate_of_fire
            burst = t + np.cumsum(np.r_[0, interval * rng.uniform(0.97, 1.03, n - 1)])
        else:
            burst = t + np.cumsum(np.r_[0, rng.uniform(0.45, 0.9, n - 1)])
        times.extend(float(b) for b in burst if b < seconds - 0.15)
        if seconds <= 2.5:
            break
        t = float(burst[-1]) + rng.uniform(1.0, 4.0)
    return times


def _background(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    pink = lfilter([0.049922, -0.095993, 0.050612, -0.004408], [1, -2.494956, 2.017265, -0.522189], white)
    wind = _lowpass(rng.standard_normal(n), rng.uniform(30, 120), sr) * rng.uniform(0, 6)
    hum = rng.uniform(0, 0.3) * np.sin(2 * np.pi * rng.choice([50, 60]) * np.arange(n) / sr)
    noise = pink + wind + hum
    return noise / (np.std(noise) + 1e-12)


def _transient(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A non-gunshot impulse for background clips: a door slam (low thud) or a hand clap (short noise burst)."""
    out = np.zeros(n)
    at = int(rng.uniform(0.1, 0.8) * n)
    length = min(int(0.08 * sr), n - at)
    t = np.arange(length) / sr
    if rng.random() < 0.5:
        out[at : at + length] = np.exp(-t / 0.02) * np.sin(2 * np.pi * rng.uniform(60, 150) * t)
    else:
        out[at : at + length] = np.exp(-t / 0.004) * rng.standard_normal(length)
    return out


def render_clip(label: str, fmt: ClipFormat, rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """Render one clip (frames, channels) in [-1, 1] and the true shot times (s)."""
    sr = fmt.sample_rate
    n = int(round(fmt.seconds * sr))
    signal = np.zeros(n)
    times: list[float] = []
    distance = float(rng.uniform(15, 250))
    if label == BACKGROUND:
        for _ in range(int(rng.integers(0, 3))):
            signal += _transient(n, sr, rng) * rng.uniform(0.2, 1.0)
    else:
        weapon = WEAPONS[label]
        times = _shot_times(weapon, fmt.seconds, rng)
        for when in times:
            shot, onset = _shot(weapon, sr, distance, rng)
            start = int(round((when - onset) * sr))
            lo, hi = max(start, 0), min(start + len(shot), n)
            if hi > lo:
                signal[lo:hi] += shot[lo - start : hi - start] * rng.uniform(0.85, 1.15)
        # Air absorption: farther shots lose their highs.
        signal = _lowpass(signal, 18000 * np.exp(-distance / 600), sr) * (30.0 / distance)
        for _ in range(int(rng.integers(1, 4))):  # reflections from buildings and terrain
            delay = int(rng.uniform(0.02, 0.3) * sr)
            if delay < n:
                echo = _lowpass(signal[: n - delay], rng.uniform(1500, 6000), sr) * rng.uniform(0.1, 0.45)
                signal[delay:] += echo
    if label == BACKGROUND:  # transients stand out of the noise floor by up to ~20 dB
        mix = _background(n, sr, rng) + signal * rng.uniform(2.0, 10.0)
    else:
        peak = float(np.max(np.abs(signal)))
        snr_db = rng.uniform(12, 40)
        mix = signal + _background(n, sr, rng) * peak * 10 ** (-snr_db / 20)
    mix *= rng.uniform(0.2, 0.9) / (np.max(np.abs(mix)) + 1e-12)  # recorder gain
    if fmt.channels == 2:  # a second microphone: small delay and level difference
        lag = int(rng.integers(0, max(1, sr // 2000)))
        right = np.roll(mix, lag) * rng.uniform(0.8, 1.0)
        frames = np.stack([mix, right], axis=1)
    else:
        frames = mix[:, None]
    return frames.astype(np.float32), times


def generate_dataset(
    out: str | Path,
    clips_per_class: int = 95,
    background: int = 0,
    seed: int = 0,
    classes: list[str] | None = None,
) -> pd.DataFrame:
    """Write a synthetic dataset in the Hydrogen Torch layout and return its dataframe.

    out/train.pq            columns: image (path relative to the data folder), class, shot_times, ...
    out/Gun_Classifier/<class>/<class>_<n>.wav
    """
    out = Path(out)
    classes = classes or CLASSES
    unknown = [c for c in classes if c not in WEAPONS]
    if unknown:
        raise ValueError(f"unknown weapon class(es) {unknown}; known: {CLASSES}")
    labels = [c for c in classes for _ in range(clips_per_class)] + [BACKGROUND] * background
    seeds = np.random.SeedSequence(seed).spawn(len(labels))
    rows = []
    counters: dict[str, int] = {}
    for label, clip_seed in zip(labels, seeds, strict=True):
        rng = np.random.default_rng(clip_seed)
        fmt = _choose_format(rng)
        frames, times = render_clip(label, fmt, rng)
        counters[label] = counters.get(label, 0) + 1
        rel = f"{label}/{label}_{counters[label]:04d}.wav"
        path = out / DATA_FOLDER / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, frames, fmt.sample_rate, subtype=fmt.subtype)
        rows.append({
            "image": rel,
            "class": label,
            "shot_times": json.dumps([round(t, 5) for t in times]),
            "num_shots": len(times),
            "sample_rate": fmt.sample_rate,
            "channels": fmt.channels,
            "subtype": fmt.subtype,
            "duration": fmt.seconds,
        })
    df = pd.DataFrame(rows)
    df.to_parquet(out / DATAFRAME, index=False)
    return df


def generate_archive(
    path: str | Path,
    minutes: float,
    bursts_per_minute: float = 2.0,
    sample_rate: int = 48000,
    seed: int = 0,
    classes: list[str] | None = None,
    subtype: str = "PCM_16",
) -> pd.DataFrame:
    """A long recording of background sound with bursts of gunfire at known times, written one minute at a
    time (memory stays bounded for hour-long files). Returns the true shots: time (s, the muzzle blast) and class."""
    rng = np.random.default_rng(seed)
    classes = classes or CLASSES
    total = int(round(minutes * 60 * sample_rate))
    block = 60 * sample_rate
    truth = []
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with sf.SoundFile(path, "w", samplerate=sample_rate, channels=1, subtype=subtype) as out:
        for first in range(0, total, block):
            n = min(block, total - first)
            signal = _background(n, sample_rate, rng) * 0.005
            seconds = n / sample_rate
            count = int(rng.poisson(bursts_per_minute * seconds / 60))
            starts = np.sort(rng.uniform(0.2, max(0.3, seconds - 2.5), count))
            last_end = -1.0
            for start in starts:
                if start < last_end + 0.6:  # bursts do not overlap
                    continue
                label = str(rng.choice(classes))
                weapon = WEAPONS[label]
                distance = float(rng.uniform(20, 150))
                times = [start + t for t in _shot_times(weapon, 2.0, rng)]
                for when in times:
                    shot, onset = _shot(weapon, sample_rate, distance, rng)
                    shot = _lowpass(shot, 18000 * np.exp(-distance / 600), sample_rate) * (10.0 / distance)
                    at = int(round((when - onset) * sample_rate))
                    lo, hi = max(at, 0), min(at + len(shot), n)
                    if hi > lo:
                        signal[lo:hi] += shot[lo - at: hi - at]
                    truth.append({"time": first / sample_rate + when, "class": label})  # the muzzle blast
                last_end = times[-1] if times else start
            out.write(np.clip(signal, -1, 1).astype(np.float32))
    return pd.DataFrame(truth, columns=["time", "class"])
