"""Synthetic gunshot recordings from a simple physical model, in the Hydrogen Torch dataset layout.

Each shot is a muzzle blast (a Friedlander pressure wave and the noise of the propellant gas's turbulent jet)
coloured by the weapon's resonances, preceded by the supersonic bullet's N-wave crack when the round is
supersonic, and followed by the action's mechanical click, over a low body (the boom that far microphones
and sound designers give a shot). Shots follow the weapon's cyclic rate of fire in bursts (single shots for
the pistol). Distance scales the level, low-passes the sound (air absorption) and sets the crack's lead over
the blast.

`background` clips hold the impulsive sounds a shot detector must not take for shots: explosions, drums,
struck metal, wood and glass, doors and footsteps, swings and ricochets, clicks, fire and insects. Shots and
these sounds go through one recording path (echoes, a room, a floor from a busy street to a library's digital
silence, clips cut to their sound, a consumer recorder's filters and clipping), so that the path tells nothing
and only the sound can. Gain, sample rate, channel count, bit depth and duration vary per clip.

It is the embedded default dataset and the test fixture. Deterministic for a seed.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from scipy.signal import fftconvolve, lfilter

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
    # The propellant gas leaves the muzzle as a turbulent jet: broadband noise over the weapon's band that
    # outlasts the pulse by tens of ms, and gives a real shot its bright, noisy report.
    jet = _band(rng.standard_normal(length), weapon.resonances[0] * rng.uniform(0.5, 1.0),
                weapon.resonances[-1] * rng.uniform(2.0, 5.0), sr)
    jet_gain, jet_seconds = rng.uniform(0.5, 2.0), rng.uniform(0.01, 0.06)
    wave = friedlander + jet_gain * np.where(pos, np.exp(-np.clip(tb, 0, None) / jet_seconds), 0.0) * jet
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


def _decay(length: int, sr: int, seconds: float) -> np.ndarray:
    """An exponential envelope that falls 60 dB in `seconds`."""
    return np.exp(-6.9 * np.arange(length) / sr / seconds)


def _band(x: np.ndarray, low: float, high: float, sr: int) -> np.ndarray:
    """Band-pass by a high-pass then a low-pass (one pole each: gentle slopes, as microphones and rooms give)."""
    return _lowpass(x - _lowpass(x, low, sr), high, sr)


def _partials(length: int, sr: int, freqs: np.ndarray, decays: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(length) / sr
    return sum(np.exp(-6.9 * t / d) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) / (k + 1) ** 0.5
               for k, (f, d) in enumerate(zip(freqs, decays, strict=True)))


def _falling_tone(length: int, sr: int, pitch: float, rise: float, settle: float) -> np.ndarray:
    """A tone that starts `rise` times above `pitch` and falls to it in about `settle` seconds (a drum, a boom)."""
    t = np.arange(length) / sr
    return np.sin(2 * np.pi * np.cumsum(pitch * (1 + rise * np.exp(-t / settle))) / sr)


def _body(sr: int, rng: np.random.Generator) -> np.ndarray:
    """A shot's low body: the blast's boom as a far microphone (and a game's sound designer) gives it, a
    falling low tone and a burst of dark noise. Real recordings carry most of a shot's energy under 500 Hz."""
    length = int(rng.uniform(0.4, 1.5) * sr)
    f0 = rng.uniform(45, 140)
    tone = _falling_tone(length, sr, f0, rng.uniform(0.3, 1.5), 0.015) * _decay(length, sr, rng.uniform(0.2, 1.2))
    rumble = _lowpass(rng.standard_normal(length), rng.uniform(200, 900), sr) * _decay(length, sr, rng.uniform(0.2, 1.2))
    body = tone + rumble * 4 * rng.uniform(0.2, 1.0)
    return body / (np.max(np.abs(body)) + 1e-12)


# Non-gun impulsive sounds for `background` clips: what public places and sound libraries hold that a shot
# detector must not take for a shot. Each returns a waveform with its peak at 1.
def _explosion(sr: int, rng: np.random.Generator) -> np.ndarray:
    length = int(rng.uniform(0.6, 2.5) * sr)
    t = np.arange(length) / sr
    rise = rng.uniform(0.004, 0.04)
    env = np.minimum(t / rise, 1.0) * _decay(length, sr, rng.uniform(0.4, 2.5))
    rumble = _lowpass(_lowpass(rng.standard_normal(length), rng.uniform(120, 700), sr), rng.uniform(300, 1500), sr)
    crackle = _band(rng.standard_normal(length) * (rng.random(length) < 0.01), 1500, 6000, sr)
    return rumble * env / (np.std(rumble) + 1e-12) + crackle * env * rng.uniform(0, 3)


def _drum(sr: int, rng: np.random.Generator) -> np.ndarray:
    """Kick, tom, snare, clap, hi-hat or cymbal."""
    kind = rng.integers(0, 5)
    length = int(rng.uniform(0.15, 1.5) * sr)
    t = np.arange(length) / sr
    noise = rng.standard_normal(length)
    if kind <= 1:  # kick (0) or tom (1): a tone falling to its pitch
        f0 = rng.uniform(45, 90) if kind == 0 else rng.uniform(90, 250)
        tone = _falling_tone(length, sr, f0, 1.5, 0.02)
        return tone * _decay(length, sr, rng.uniform(0.15, 0.8)) + 0.3 * noise * _decay(length, sr, 0.01)
    if kind == 2:  # snare or clap: a band of noise (several bursts for a clap) over a drum tone
        bursts = sum(np.roll(_decay(length, sr, rng.uniform(0.08, 0.3)), int(i * rng.uniform(0.006, 0.012) * sr))
                     for i in range(int(rng.integers(1, 4))))
        tone = np.sin(2 * np.pi * rng.uniform(160, 260) * t) * _decay(length, sr, 0.12)
        return _band(noise, rng.uniform(500, 1500), rng.uniform(4000, 9000), sr) * bursts + 0.4 * tone
    return _band(noise, rng.uniform(3000, 6000), 16000, sr) * _decay(length, sr, rng.uniform(0.05, 1.5))  # hats


def _strike(sr: int, rng: np.random.Generator, longest: float = 1.5) -> np.ndarray:
    """Metal, wood, stone or glass struck: a contact click and the object's inharmonic modes ringing."""
    length = int(rng.uniform(0.1, max(0.1, longest)) * sr)
    count = int(rng.integers(2, 9))
    base = rng.uniform(150, 2500)
    freqs = base * np.sort(rng.uniform(1.0, 6.0, count))
    decays = rng.uniform(0.02, 1.2, count) * (1 if rng.random() < 0.5 else 0.1)
    click = rng.standard_normal(length) * _decay(length, sr, rng.uniform(0.002, 0.02))
    return _partials(length, sr, freqs, decays, rng) + rng.uniform(0.2, 1.5) * click


def _thud(sr: int, rng: np.random.Generator) -> np.ndarray:
    """A door slam, a body or a heavy object landing, a footstep: a dull low knock, sometimes a latch after it."""
    length = int(rng.uniform(0.1, 0.6) * sr)
    t = np.arange(length) / sr
    knock = np.sin(2 * np.pi * rng.uniform(50, 200) * t) * _decay(length, sr, rng.uniform(0.05, 0.4))
    knock += _lowpass(rng.standard_normal(length), rng.uniform(300, 2000), sr) * _decay(length, sr, rng.uniform(0.02, 0.15))
    if rng.random() < 0.4:
        at = int(rng.uniform(0.03, 0.5) * length)
        knock[at:] += 0.3 * _band(rng.standard_normal(length - at), 2000, 8000, sr) * _decay(length - at, sr, 0.01)
    return knock


def _steps(sr: int, rng: np.random.Generator) -> np.ndarray:
    """A few footsteps or knocks in a row."""
    spacing = rng.uniform(0.15, 0.6)
    steps = [_thud(sr, rng) * rng.uniform(0.5, 1.0) for _ in range(int(rng.integers(2, 6)))]
    out = np.zeros(int(spacing * sr) * len(steps) + max(len(s) for s in steps))
    for i, step in enumerate(steps):
        at = int(i * spacing * sr * rng.uniform(0.9, 1.1))
        out[at : at + len(step)] += step[: len(out) - at]
    return out


def _breakage(sr: int, rng: np.random.Generator) -> np.ndarray:
    """Glass or debris: a cloud of small bright strikes."""
    length = int(rng.uniform(0.3, 1.2) * sr)
    out = np.zeros(length)
    for _ in range(int(rng.integers(8, 50))):
        piece = _strike(sr, rng, longest=0.1) * rng.uniform(0.1, 1.0)
        at = int(rng.exponential(0.15) * sr) % length
        out[at : at + len(piece)] += piece[: length - at]
    return _band(out, 1000, 14000, sr)


def _swoosh(sr: int, rng: np.random.Generator) -> np.ndarray:
    """A swing, a passing projectile, a ricochet's whine or a steam burst: sound that swells rather than strikes."""
    length = int(rng.uniform(0.2, 1.0) * sr)
    t = np.arange(length) / sr
    env = np.abs(np.sin(np.pi * t / t[-1])) ** rng.uniform(0.5, 3)
    if rng.random() < 0.5:
        return _band(rng.standard_normal(length), rng.uniform(200, 1500), rng.uniform(2000, 9000), sr) * env
    f = np.geomspace(rng.uniform(1500, 5000), rng.uniform(400, 1500), length)
    return np.sin(2 * np.pi * np.cumsum(f) / sr) * env


def _click(sr: int, rng: np.random.Generator) -> np.ndarray:
    """A click or tick of a few milliseconds: a spent case landing, a switch, a stick, a closed hi-hat."""
    length = int(rng.uniform(0.02, 0.12) * sr)
    if rng.random() < 0.5:
        low = rng.uniform(300, 5000)
        return _band(rng.standard_normal(length), low, low * rng.uniform(1.5, 4), sr) * _decay(length, sr, rng.uniform(0.005, 0.06))
    tink = _strike(sr, rng, longest=0.1)[:length]  # metal or wood
    return tink * _decay(len(tink), sr, rng.uniform(0.01, 0.08))


def _texture(sr: int, rng: np.random.Generator) -> np.ndarray:
    """Sound that goes on: fire or rain (a crackle of small clicks), insects (a chirping tone), rumble."""
    length = int(rng.uniform(1.0, 2.0) * sr)
    kind = rng.integers(0, 3)
    if kind == 0:
        clicks = rng.standard_normal(length) * (rng.random(length) < rng.uniform(2, 200) / sr)
        return _band(clicks, rng.uniform(300, 3000), 12000, sr) + 0.05 * _lowpass(rng.standard_normal(length), 300, sr)
    t = np.arange(length) / sr
    if kind == 1:
        gate = (np.sin(2 * np.pi * rng.uniform(2, 20) * t) > rng.uniform(0.0, 0.8)).astype(float)
        return np.sin(2 * np.pi * rng.uniform(2500, 7000) * t) * _lowpass(gate, 200, sr)
    return _lowpass(rng.standard_normal(length), rng.uniform(40, 200), sr) * (1 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.2, 2) * t))


NON_GUN_EVENTS = (_explosion, _drum, _strike, _thud, _steps, _breakage, _swoosh, _click, _texture)


def _non_gun_event(sr: int, rng: np.random.Generator) -> np.ndarray:
    event = NON_GUN_EVENTS[int(rng.integers(len(NON_GUN_EVENTS)))](sr, rng)
    return event / (np.max(np.abs(event)) + 1e-12)


def _room(signal: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Reverberation, from a dry outdoor field to a hall: the direct sound plus a diffuse tail (decaying,
    darkening noise) at a random direct-to-reverberant ratio."""
    rt60 = rng.uniform(0.2, 1.2)
    length = int(rt60 * sr)
    tail = _lowpass(rng.standard_normal(length), rng.uniform(1500, 8000), sr) * _decay(length, sr, rt60)
    tail[: int(rng.uniform(0.002, 0.03) * sr)] = 0.0  # the first reflection's delay
    wet = fftconvolve(signal, tail)[: len(signal)]
    direct_to_reverberant_db = rng.uniform(0, 20)
    gain = np.sqrt(np.sum(signal**2) / (np.sum(wet**2) + 1e-20)) * 10 ** (-direct_to_reverberant_db / 20)
    return signal + wet * gain


def _recorder(mix: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A consumer recorder's colouring: a small microphone's high-pass and roll-off, and at times clipping."""
    mix = mix - _lowpass(mix, rng.uniform(20, 250), sr)
    mix = _lowpass(mix, rng.uniform(6000, 20000), sr)
    mix = mix / (np.max(np.abs(mix)) + 1e-12)
    if rng.random() < 0.25:  # a gain set too high: the loudest sound clips
        drive = rng.uniform(1.5, 6.0)
        mix = np.tanh(mix * drive) / np.tanh(drive)
    return mix


def render_clip(label: str, fmt: ClipFormat, rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """Render one clip (frames, channels) in [-1, 1] and the true shot times (s).

    Gun and `background` clips share one recording path (reflections, room, noise floor, recorder), so that
    only the sound itself tells a shot from a door, a drum or an explosion."""
    sr = fmt.sample_rate
    n = int(round(fmt.seconds * sr))
    signal = np.zeros(n)
    times: list[float] = []
    distance = float(rng.uniform(15, 250))
    last_sound = 0.0
    if label == BACKGROUND:
        for _ in range(int(rng.choice([0, 1, 1, 1, 2, 2, 3]))):
            event = _non_gun_event(sr, rng) * rng.uniform(0.3, 1.0)
            at = int(rng.uniform(0.0, 0.7) * n)
            take = min(len(event), n - at)
            signal[at : at + take] += event[:take]
            last_sound = max(last_sound, (at + len(event)) / sr)
    else:
        weapon = WEAPONS[label]
        times = _shot_times(weapon, fmt.seconds, rng)
        body = _body(sr, rng) * rng.uniform(0.3, 2.0)  # one weapon, one boom: every shot of the clip has it
        for when in times:
            shot, onset = _shot(weapon, sr, distance, rng)
            start = int(round((when - onset) * sr))
            sound = np.zeros(max(len(shot), int(onset * sr) + len(body)))
            sound[: len(shot)] += shot * rng.uniform(0.85, 1.15)
            sound[int(onset * sr): int(onset * sr) + len(body)] += body
            lo, hi = max(start, 0), min(start + len(sound), n)
            if hi > lo:
                signal[lo:hi] += sound[lo - start : hi - start]
        last_sound = times[-1] + 0.4 if times else 0.0
    sounding = np.flatnonzero(signal)
    if len(sounding) and rng.random() < 0.3:  # an edited clip that starts at the sound, as libraries cut them
        lead = max(0, int(sounding[0]) - int(rng.uniform(0.0, 0.01) * sr))
        signal = np.r_[signal[lead:], np.zeros(lead)]
        times = [t - lead / sr for t in times]
        last_sound -= lead / sr
    # Distance: air absorption takes the highs of farther sounds.
    signal = _lowpass(signal, 18000 * np.exp(-distance / 600), sr) * (30.0 / distance)
    for _ in range(int(rng.integers(0, 4))):  # reflections from buildings and terrain
        delay = int(rng.uniform(0.02, 0.3) * sr)
        if delay < n:
            signal[delay:] += _lowpass(signal[: n - delay], rng.uniform(1500, 6000), sr) * rng.uniform(0.1, 0.45)
    if rng.random() < 0.5:
        signal = _room(signal, sr, rng)
    peak = float(np.max(np.abs(signal)))
    if peak == 0.0:  # a background clip of nothing but its floor
        mix = _background(n, sr, rng)
    else:
        # The floor under the sound, the same for shots and other sounds so that it tells nothing: a busy
        # street, a quiet field, or a sound library's clip with no floor at all.
        floor_db = rng.uniform(15, 70)
        mix = signal + (0.0 if rng.random() < 0.3 else _background(n, sr, rng) * peak * 10 ** (-floor_db / 20))
        if rng.random() < 0.5:  # an edited clip: the sound, then digital silence
            end = min(n, int((last_sound + rng.uniform(0.2, 1.0)) * sr))
            mix[end:] = 0.0
    mix = _recorder(mix, sr, rng) * rng.uniform(0.2, 0.9)
    if fmt.channels == 2:  # a second microphone: small delay and level difference
        lag = int(rng.integers(0, max(1, sr // 2000)))
        right = np.roll(mix, lag) * rng.uniform(0.8, 1.0)
        frames = np.stack([mix, right], axis=1)
    else:
        frames = mix[:, None]
    return frames.astype(np.float32), times


def _write_clip(clip: tuple[str, np.random.SeedSequence, Path]) -> dict:
    """Render one clip from its own seed, write it, and return its dataframe row."""
    label, clip_seed, path = clip
    rng = np.random.default_rng(clip_seed)
    fmt = _choose_format(rng)
    frames, times = render_clip(label, fmt, rng)
    sf.write(path, frames, fmt.sample_rate, subtype=fmt.subtype)
    return {
        "image": f"{path.parent.name}/{path.name}",
        "class": label,
        "shot_times": json.dumps([round(t, 5) for t in times]),
        "num_shots": len(times),
        "sample_rate": fmt.sample_rate,
        "channels": fmt.channels,
        "subtype": fmt.subtype,
        "duration": fmt.seconds,
    }


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
    counters: dict[str, int] = {}
    clips = []
    for label, clip_seed in zip(labels, seeds, strict=True):
        counters[label] = counters.get(label, 0) + 1
        clips.append((label, clip_seed, out / DATA_FOLDER / f"{label}/{label}_{counters[label]:04d}.wav"))
    for label in counters:
        (out / DATA_FOLDER / label).mkdir(parents=True, exist_ok=True)
    # Each clip has its own seed, so clips render in any order, in parallel, to the same samples. Threads:
    # NumPy, SciPy's filters and libsndfile release the GIL for most of a clip's work (720 clips: 47 s -> 16 s
    # on 2 cores), and unlike processes they need no `__main__` guard in the caller's script.
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        rows = list(pool.map(_write_clip, clips))
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
