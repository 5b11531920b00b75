"""Shots: the detectors on generated archives and shots, chunk ownership of shots, bursts, the per-file row."""

import numpy as np
import pandas as pd
import pytest

from gunsound import audio
from gunsound.events import bursts, summarize_file
from gunsound.onsets import (
    chunk_onsets,
    columns_rolling_quantile,
    decimate,
    detect_onsets,
    detect_shots,
    find_shots,
    runs_to_take,
    steady_runs,
)
from gunsound.synthesis import WEAPONS, _shot, generate_archive
from gunsound.windows import plan_chunks


def test_onset_detector_recall_and_timing_on_generated_archive(tmp_path):
    path = tmp_path / "archive.wav"
    truth = generate_archive(path, minutes=3, bursts_per_minute=4, seed=3)
    wave, sr = audio.read(str(path))
    onsets = detect_onsets(wave, sr)
    errors = np.array([np.abs(onsets - t).min() for t in truth["time"]])
    assert np.mean(errors < 0.02) >= 0.95  # recall at 20 ms
    assert np.median(errors[errors < 0.02]) < 0.005
    unmatched = np.mean([np.abs(truth["time"] - t).min() > 0.02 for t in onsets])
    assert unmatched <= 0.25  # not by firing everywhere

    # The scoring job's detector: nearly every shot, and nothing that is not one.
    shots = find_shots(wave, sr)
    assert np.mean([np.abs(shots - t).min() < 0.02 for t in truth["time"]]) >= 0.95
    assert np.mean([np.abs(truth["time"] - t).min() > 0.02 for t in shots]) <= 0.05

    # A chunk finds the shots it owns, and threshold_db decides what counts as one.
    found = {db: chunk_onsets(wave[: 60 * sr], sr, read_start=0.0, owned_start=0.0, owned_end=59.0,
                              threshold_db=db) for db in (12.0, 200.0)}
    in_chunk = truth["time"][truth["time"] < 59.0]
    assert len(found[12.0]) >= 0.9 * len(in_chunk) > 0 and len(found[200.0]) == 0
    assert found[12.0].max() < 59.0


def _chunked_shots(wave: np.ndarray, sr: int, duration: float, *, window: float, hop: float,
                   read: float) -> list[float]:
    """The shots of a file as the scoring job finds them: chunk by chunk, each read as planned."""
    found: list[float] = []
    for c in plan_chunks("f.wav", duration, window_seconds=window, hop_seconds=hop, read_seconds=read):
        a, b = int(round(c["read_start"] * sr)), int(round(c["read_end"] * sr))
        found += chunk_onsets(wave[a:b], sr, read_start=c["read_start"], owned_start=c["starts"][0],
                              owned_end=c["owned_end"], threshold_db=12.0).tolist()
    return sorted(found)


@pytest.mark.parametrize(("window", "hop"), [(2.0, 2.0), (2.0, 1.0)])
@pytest.mark.parametrize("offset", [-0.1, -0.05, -0.02, -0.005, 0.0, 0.005, 0.03])
def test_a_shot_at_a_chunk_edge_is_found_once(window, hop, offset):
    """A chunk's read began at its first window, so the tail of a shot fired just before that edge read as a
    shot at the start of the read: counted by both chunks (a two-shot 'burst' at thousands of rounds per
    minute). Every shot near the edge is found once, where the whole file finds it."""
    sr, duration = 32000, 12.0
    rng = np.random.default_rng(int(offset * 1000) % 97)
    blast, onset = _shot(WEAPONS["AK-47"], sr, 30.0, rng)
    blast = blast[int(round(onset * sr)):]
    wave = 1e-4 * np.random.default_rng(7).standard_normal(int(duration * sr))
    for t in (1.5, 4.0 + offset, 8.5):
        at = int(round(t * sr))
        wave[at:at + len(blast)] += blast[: len(wave) - at]
    chunked = _chunked_shots(wave.astype(np.float32), sr, duration, window=window, hop=hop, read=4.0)
    whole = find_shots(wave.astype(np.float32), sr)
    assert len(chunked) == len(whole) == 3, (chunked, whole)
    np.testing.assert_allclose(chunked, whole, atol=0.006)


def _shots_at(sr: int, duration: float, weapon: str, times: np.ndarray | list[float], seed: int) -> np.ndarray:
    """Generated shots of `weapon`, each muzzle blast at one of `times` (s), over quiet noise; float32."""
    rng = np.random.default_rng(seed)
    wave = 0.002 * rng.standard_normal(int(duration * sr))
    for t in times:
        shot, onset = _shot(WEAPONS[weapon], sr, 50.0, rng)
        at = int(round((t - onset) * sr))
        wave[at:at + len(shot)] += 0.5 * shot
    return wave.astype(np.float32)


@pytest.mark.parametrize(("seed", "lead"), [(0, 0.0583), (1, 0.12), (1, 0.16), (1, 0.21)])
def test_automatic_fire_across_a_chunk_edge_counts_as_in_one_read(seed, lead):
    """A shot just before a chunk's edge may open a burst: the detector reads about half a second on to tell (the
    rise pattern repeating, a steady run of blasts). A chunk whose read stops short of that judges the burst's
    shots before its edge from part of the burst, and counts other shots there than one read of the file."""
    sr, duration = 24000, 8.0
    wave = _shots_at(sr, duration, "MG-42", 4.0 - lead + 0.05 * np.arange(14), seed)  # 1200 rpm, edge at 4 s
    chunked = _chunked_shots(wave, sr, duration, window=2.0, hop=2.0, read=4.0)
    whole = find_shots(wave, sr)
    assert len(chunked) == len(whole), (chunked, whole.tolist())
    np.testing.assert_allclose(chunked, whole, atol=1e-9)


@pytest.mark.parametrize("sr", [8000, 11025, 16000, 22050, 44100, 48000, 96000])
def test_a_shot_at_a_chunk_edge_is_found_once_at_any_rate(sr):
    """The detector's frames are a whole number of samples (220 at 44.1 kHz, not 5 ms): a chunk read from a
    start that is not a whole frame of the file times a shot on frames of its own, so that two chunks put a
    shot within a frame of their edge on either side of it, and both count it (or neither)."""
    duration = 10.0  # chunks [0, 4), [4, 8) and [8, 10), read from 0, 1 and 5 s
    found = {}
    for offset in (-0.005, -0.004, -0.003, -0.002, -0.001, 0.0, 0.001):
        wave = _shots_at(sr, duration, "AK-47", [8.0 + offset], seed=0)
        found[offset] = (_chunked_shots(wave, sr, duration, window=2.0, hop=2.0, read=4.0),
                         find_shots(wave, sr).tolist())
    assert all(len(chunked) == len(whole) == 1 and abs(chunked[0] - whole[0]) < 1e-6
               for chunked, whole in found.values()), found


@pytest.mark.parametrize(("duration", "shot"), [(10.0, 9.3), (1.5, 1.2), (9.5, 9.2)])
def test_a_shot_in_the_last_stretch_of_a_file_is_found_with_sliding_windows(duration, shot):
    """With windows longer than their hop, the last chunk owned shots only up to its last window's start plus a
    hop: a shot in the file's last (window - hop) seconds, which the last window covers, belonged to no chunk."""
    sr = 32000
    blast, onset = _shot(WEAPONS["M4"], sr, 30.0, np.random.default_rng(1))
    wave = 1e-4 * np.random.default_rng(2).standard_normal(int(duration * sr))
    at = int(round((shot - onset) * sr))
    wave[at:at + len(blast)] += blast[: len(wave) - at]
    found = _chunked_shots(wave.astype(np.float32), sr, duration, window=2.0, hop=1.0, read=4.0)
    assert len(found) == 1 and abs(found[0] - shot) < 0.01, found


def test_bursts_group_shots_and_give_the_rate_of_fire():
    events = [{"time": t} for t in (1.0, 1.1, 1.2, 3.0)]
    bursts(events)
    assert [e["burst"] for e in events] == [0, 0, 0, 1]
    assert [e["shots_in_burst"] for e in events] == [3, 3, 3, 1]
    assert events[0]["rounds_per_minute"] == pytest.approx(600.0) and np.isnan(events[3]["rounds_per_minute"])


def test_summary_row_and_events_of_a_file():
    windows = pd.DataFrame({"start": [0.0, 2.0], "end": [2.0, 3.0],
                            "probs": [np.array([0.9, 0.1]), np.array([0.2, 0.3])]})
    row, events = summarize_file("f.wav", 3.0, windows, np.array([0.5, 2.5]), ["a", "b"], method="Sliding",
                                 threshold=0.5)
    assert (row["top_class"], row["gunshot_windows"], row["shots"]) == ("a", 1, 1)
    assert events[0]["time"] == 0.5 and events[0]["class"] == "a"
    fix, _ = summarize_file("f.wav", 3.0, windows, np.zeros(0), ["a", "b"], method="Fix", threshold=0.5)
    assert fix["top_probability"] == (0.9 * 2 + 0.2) / 3
    failed, none = summarize_file("f.wav", 0.0, windows, np.zeros(0), ["a", "b"], method="Fix", threshold=0.5,
                                  error="unreadable")
    assert failed["status"] == "error" and np.isnan(failed["max_a"]) and none == []


def _pistol_shot(sr: int, seed: int = 0) -> np.ndarray:
    """One generated pistol shot (no supersonic crack), its muzzle blast at sample 0."""
    from gunsound.synthesis import WEAPONS, _shot

    rng = np.random.default_rng(seed)
    shot, onset = _shot(WEAPONS["IMI Desert Eagle"], sr, 30.0, rng)
    return shot[int(round(onset * sr)):]


@pytest.mark.parametrize("detector", [find_shots, detect_onsets])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_shot_at_the_very_start_of_a_file_counts_once(seed, detector):
    sr = 32000
    wave = np.zeros(2 * sr)
    shot = _pistol_shot(sr, seed)
    wave[: len(shot)] += shot
    wave += 1e-4 * np.random.default_rng(seed).standard_normal(len(wave))
    onsets = detector(wave, sr)
    assert len(onsets) == 1 and onsets[0] < 0.01


@pytest.mark.parametrize("detector", [find_shots, detect_onsets])
@pytest.mark.parametrize(("quiet_seconds", "echo_delays"), [(0.0, (0.12, 0.31, 0.55)), (0.5, (0.08, 0.2, 0.45))])
def test_one_shot_with_a_long_echo_tail_is_one_shot(quiet_seconds, echo_delays, detector):
    """Wall echoes 6-12 dB down and a reverberant tail (a second long, 10 dB under the shot): one shot."""
    sr = 32000
    rng = np.random.default_rng(5)
    shot = _pistol_shot(sr)
    dry = np.zeros(3 * sr)
    at = int(quiet_seconds * sr)
    dry[at:at + len(shot)] += shot
    wet = dry.copy()
    for delay, gain_db in zip(echo_delays, (-6, -9, -12), strict=True):
        wet[int(delay * sr):] += 10 ** (gain_db / 20) * dry[: len(dry) - int(delay * sr)]
    tail = rng.standard_normal(sr) * np.exp(-np.arange(sr) / (0.25 * sr))
    tail *= np.sqrt(0.1 / np.sum(tail**2))
    wet += np.convolve(dry, tail)[: len(wet)]
    wet += 1e-4 * rng.standard_normal(len(wet))
    onsets = detector(wet, sr)
    assert len(onsets) == 1 and abs(onsets[0] - quiet_seconds) < 0.01


def _band_noise(sr: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    return sosfilt(butter(2, [200, 3000], btype="band", fs=sr, output="sos"), rng.standard_normal(int(seconds * sr)))


@pytest.mark.parametrize("detector", [find_shots, detect_shots])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_shot_just_after_a_file_starts_over_its_own_long_body_counts_once(seed, detector):
    """A file that starts 15 ms before a shot whose designed body stays loud for seconds: the first second's
    usual floor (its quieter part) is that body, so the floor must come from the quiet the file starts in."""
    sr = 32000
    rng = np.random.default_rng(seed)
    shot = _pistol_shot(sr, seed)
    at = int(0.015 * sr)
    wave = np.zeros(3 * sr)
    wave[at:at + len(shot)] += shot
    body = _band_noise(sr, 2.5, rng) * np.exp(-np.arange(int(2.5 * sr)) / (1.5 * sr))
    body *= 0.6 * np.abs(shot).max() / np.abs(body).max()
    wave[at + sr // 100:at + sr // 100 + len(body)] += body
    wave += 1e-4 * rng.standard_normal(len(wave))
    shots = detector(wave, sr)
    assert len(shots) == 1 and abs(shots[0] - 0.015) < 0.01


@pytest.mark.parametrize("detector", [find_shots, detect_shots])
def test_a_shot_that_rises_sharply_just_out_of_a_loud_bed_counts(detector):
    """Pistol shots 9 dB over a steady band-noise bed (their first 100 ms against the bed's power) stand
    under the 12 dB margin in the bands' average, but rise faster than the bed ever does: most count, and
    nothing else does."""
    sr, found = 32000, 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        bed = _band_noise(sr, 4.0, rng)
        shot = _pistol_shot(sr, seed)[: sr // 2]
        wave = bed / bed.std()
        wave[2 * sr:2 * sr + len(shot)] += shot * np.sqrt(10 ** 0.9 / np.mean(shot[: sr // 10] ** 2))
        shots = detector(0.02 * wave, sr)
        assert np.all(np.abs(shots - 2.0) < 0.02)
        found += len(shots)
    assert found >= 7  # 4 of 10 with the 12 dB margin alone


@pytest.mark.parametrize("detector", [find_shots, detect_shots])
@pytest.mark.parametrize(("opening", "seconds"), [("fade", 0.01), ("fade", 0.05), ("zeros", 0.005),
                                                  ("zeros", 0.03), ("zeros", 0.05)])
def test_steady_noise_that_opens_with_a_fade_in_or_silence_is_no_shot(opening, seconds, detector):
    """Edited clips fade in, and decoders put some ms of zeros first (an MP3's priming samples): the quiet a
    wave opens with is no floor for the steady sound after it."""
    sr = 44100
    wave = 0.05 * _band_noise(sr, 3.0, np.random.default_rng(1))
    n = int(seconds * sr)
    wave[:n] *= np.linspace(0.0, 1.0, n) if opening == "fade" else 0.0
    assert len(detector(wave, sr)) == 0


@pytest.mark.parametrize("detector", [find_shots, detect_shots])
@pytest.mark.parametrize(("seed", "click_after"), [(0, 1.2), (1, 1.3), (2, 1.4)])
def test_a_click_late_in_a_tail_that_dipped_once_is_not_a_shot(seed, click_after, detector):
    """The tail goes silent for 30 ms early on (a lapse of two 5 ms frames under the floor's margin) and then
    sounds on for 1.5 s: the echo window runs from where the tail died, not from the lapse, so neither its
    swells nor a click in it well under the shot are shots."""
    sr = 32000
    rng = np.random.default_rng(seed)
    shot = _pistol_shot(sr, seed)
    start = sr // 2
    wave = np.zeros(4 * sr)
    wave[start:start + len(shot)] += shot
    tail = _band_noise(sr, 1.5, rng) * np.exp(-np.arange(int(1.5 * sr)) / (2.0 * sr))
    tail *= 0.1 * np.abs(shot).max() / np.abs(tail).max()
    dip = int(0.1 * sr)
    tail[dip:dip + int(0.03 * sr)] = 0.0
    wave[start + sr // 100:start + sr // 100 + len(tail)] += tail
    click = _band_noise(sr, 0.03, rng)
    at = int((0.5 + click_after) * sr)
    wave[at:at + len(click)] += 0.2 * np.abs(shot).max() * click / np.abs(click).max()
    wave += 1e-4 * rng.standard_normal(len(wave))
    shots = detector(wave, sr)
    assert len(shots) == 1 and abs(shots[0] - 0.5) < 0.01


def _layered_shot(sr: int, seed: int = 0) -> np.ndarray:
    """A designed game gunshot: the generated blast, a mechanical layer 30 ms later (6 dB down, darker) and a
    sustained body of noise under both for 300 ms, the layering that energy detectors count as extra shots."""
    rng = np.random.default_rng(seed)
    shot = np.zeros(sr // 2)
    blast = _pistol_shot(sr, seed)[: sr // 2]
    shot[: len(blast)] += blast
    layer = np.convolve(_pistol_shot(sr, seed + 10), np.ones(8) / 8)[: sr // 2 - int(0.03 * sr)]
    shot[int(0.03 * sr):int(0.03 * sr) + len(layer)] += 0.5 * layer * np.abs(blast).max() / np.abs(layer).max()
    body = rng.standard_normal(int(0.3 * sr)) * np.exp(-np.arange(int(0.3 * sr)) / (0.1 * sr))
    shot[: len(body)] += 0.2 * np.abs(blast).max() * body
    return shot


@pytest.mark.parametrize("detector", [find_shots, detect_shots])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_layered_shot_counts_once(seed, detector):
    sr = 32000
    wave = np.zeros(2 * sr)
    shot = _layered_shot(sr, seed)
    wave[sr // 2:sr // 2 + len(shot)] += shot
    wave += 1e-4 * np.random.default_rng(seed).standard_normal(len(wave))
    shots = detector(wave, sr)
    assert len(shots) == 1 and abs(shots[0] - 0.5) < 0.05


def _rumbling_shot(sr: int, seed: int, seconds: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """A shot at 0.5 s whose rumble rolls on (thunder, a blast off hills): band noise dying away 30 dB over
    2.5 s in swells every 100-300 ms, over a bed 45 dB under the shot. Returns the wave and the shot."""
    from scipy.signal import butter, sosfilt

    rng = np.random.default_rng(seed)
    shot = _pistol_shot(sr)
    wave = np.zeros(int(seconds * sr))
    wave[sr // 2:sr // 2 + len(shot)] += shot
    t = np.arange(3 * sr) / sr
    swells = sum(np.exp(-0.5 * ((t - k) / 0.03) ** 2) * rng.uniform(0.5, 1.0)
                 for k in np.cumsum(rng.uniform(0.1, 0.3, 30)) if k < 3.0)
    rumble = sosfilt(butter(2, [150, 1500], btype="band", fs=sr, output="sos"), rng.standard_normal(len(t)))
    rumble *= 10 ** (-1.5 * t / 2.5) * (0.3 + swells)
    rumble *= 0.3 * np.abs(shot).max() / np.abs(rumble[: sr // 5]).max()
    start = sr // 2 + sr // 20
    wave[start:start + len(rumble)] += rumble[: len(wave) - start]
    wave += np.abs(shot).max() * 10 ** (-45 / 20) * rng.standard_normal(len(wave))
    return wave, shot


@pytest.mark.parametrize("detector", [find_shots, detect_shots])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_rumble_that_dies_away_over_seconds_is_one_shot(seed, detector):
    """Its swells outlast the ring (12 dB over the floor) and the echo window must run from where it died."""
    sr = 32000
    wave, _ = _rumbling_shot(sr, seed)
    shots = detector(wave, sr)
    assert len(shots) == 1 and abs(shots[0] - 0.5) < 0.01


@pytest.mark.parametrize("detector", [find_shots, detect_shots])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_ring_that_swells_back_to_the_shots_level_is_not_a_shot(seed, detector):
    """The ring swells back near the shot's level over some 40 ms: loud enough, but it rises too slowly (a few
    dB per 15 ms) for a new blast, so it is the same shot."""
    from scipy.signal import butter, sosfilt

    sr = 32000
    rng = np.random.default_rng(seed)
    shot = _pistol_shot(sr)
    wave = np.zeros(3 * sr)
    wave[sr // 2:sr // 2 + len(shot)] += shot
    t = np.arange(sr) / sr
    ring = sosfilt(butter(2, [200, 2000], btype="band", fs=sr, output="sos"), rng.standard_normal(sr))
    ring *= 10 ** (-t) + 2.0 * np.exp(-0.5 * ((t - 0.35) / 0.04) ** 2)
    ring *= 0.35 * np.abs(shot).max() / np.abs(ring[: sr // 20]).max()
    start = sr // 2 + sr // 50
    wave[start:start + sr] += ring
    wave += 1e-4 * rng.standard_normal(len(wave))
    shots = detector(wave, sr)
    assert len(shots) == 1 and abs(shots[0] - 0.5) < 0.01


@pytest.mark.parametrize("detector", [find_shots, detect_shots])
@pytest.mark.parametrize(("seed", "second"), [(0, 1.2), (1, 1.2), (2, 1.2), (3, 1.2), (0, 2.2)])
def test_a_second_shot_in_the_first_ones_rumble_counts(seed, second, detector):
    """As loud as the first, it rises from the rumble, not from silence: its rise is far smaller than the
    first shot's, and must still count."""
    sr = 32000
    wave, shot = _rumbling_shot(sr, seed)
    at = int(second * sr)
    wave[at:at + len(shot)] += shot
    shots = detector(wave, sr)
    assert len(shots) == 2 and np.abs(shots - [0.5, second]).max() < 0.01


def _burst(shot: np.ndarray, times: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    """3 s of copies of `shot` at `times`, each 1 dB louder or softer at random, over faint noise."""
    wave = np.zeros(3 * sr)
    for t in times:
        wave[int(t * sr):int(t * sr) + len(shot)] += shot[: len(wave) - int(t * sr)] * 10 ** (rng.uniform(-1, 1) / 20)
    return wave + 1e-4 * rng.standard_normal(len(wave))


@pytest.mark.parametrize("detector", [find_shots, detect_shots])
@pytest.mark.parametrize("rpm", [600, 900])
def test_a_burst_of_one_shot_counts_every_shot_and_its_rate(rpm, detector):
    sr = 32000
    rng = np.random.default_rng(rpm)
    shot = _layered_shot(sr)
    times = 0.5 + np.arange(8) * 60.0 / rpm
    wave = _burst(shot, times, sr, rng)
    shots = detector(wave, sr)
    assert len(shots) == len(times)
    assert np.all(np.abs(shots - times) < 0.05)
    assert 60.0 / np.median(np.diff(shots)) == pytest.approx(rpm, rel=0.05)


def _echoing_shot(sr: int, rng: np.random.Generator) -> np.ndarray:
    """A 12 ms blast, its echoes 4-8 dB down at 70, 140 and 210 ms, and a ring that lasts a second."""
    n = int(1.5 * sr)
    decay = np.exp(-np.arange(n) / (0.012 * sr))
    blast = rng.standard_normal(n) * decay
    shot = blast.copy()
    for delay, gain in ((0.07, 0.6), (0.14, 0.5), (0.21, 0.4)):
        shot[int(delay * sr):] += gain * blast[: n - int(delay * sr)]
    return shot + 0.25 * rng.standard_normal(n) * np.exp(-np.arange(n) / (0.5 * sr))


@pytest.mark.parametrize("detector", [find_shots, detect_shots])
@pytest.mark.parametrize(("seed", "rpm"), [(1, 800), (2, 1000), (3, 1200)])
def test_a_burst_ends_at_its_last_shot_while_its_echoes_go_on(seed, rpm, detector):
    """Six shots whose echoes keep arriving at about the burst's interval after the last one: they rise like
    shots, but the sound stops adding up (a whole blast is missing from each interval), so they are none."""
    sr = 32000
    rng = np.random.default_rng(seed)
    shot = _echoing_shot(sr, rng)
    times = 0.5 + np.arange(6) * 60.0 / rpm
    wave = _burst(shot, times, sr, rng)
    shots = detector(wave, sr)
    assert len(shots) == len(times) and np.all(np.abs(shots - times) < 0.02)


def test_repeat_detector_counts_a_shot_at_the_very_start_once():
    sr = 32000
    wave = np.zeros(2 * sr)
    shot = _layered_shot(sr)
    wave[: len(shot)] += shot
    wave += 1e-4 * np.random.default_rng(0).standard_normal(len(wave))
    shots = detect_shots(wave, sr)
    assert len(shots) == 1 and shots[0] < 0.05


@pytest.mark.parametrize("sr", [8000, 11025, 16000, 22050, 32000, 44100, 48000])
def test_repeat_detector_times_a_shot_at_its_muzzle_blast(sr):
    """Within 5 ms (one frame) at any rate: the detector's frames are timed at their window's centre, not its
    start (which put every shot 10.7 ms early)."""
    times = [0.5, 1.7, 3.05]
    wave = np.zeros(4 * sr)
    for seed, t in enumerate(times):
        shot = _pistol_shot(sr, seed)[: sr // 2]
        wave[int(t * sr):int(t * sr) + len(shot)] += shot
    wave += 1e-4 * np.random.default_rng(sr).standard_normal(len(wave))
    shots = detect_shots(wave, sr)
    assert len(shots) == len(times)
    assert np.max(np.abs(shots - times)) <= 0.005 + 1e-9


@pytest.mark.parametrize("gap", [0.07, 0.1])
def test_a_burst_whose_first_shot_hides_the_next_counts_every_shot(gap):
    """Three different shots out of digital silence, each with a loud body under the next: the repeat detector
    reads one shot (the first rises by some 100 dB, the next ones by a few dB on the body), the scorer's
    detector takes the steady run of blasts."""
    sr = 32000
    rng = np.random.default_rng(1)
    times = np.arange(3) * gap
    wave = np.zeros(2 * sr)
    for seed, t in enumerate(times):
        shot = np.zeros(sr // 2)
        blast = _pistol_shot(sr, seed)[: sr // 2]
        shot[: len(blast)] += blast
        shot += 0.25 * np.abs(blast).max() * rng.standard_normal(sr // 2) * np.exp(-np.arange(sr // 2) / (0.2 * sr))
        wave[int(t * sr):int(t * sr) + len(shot)] += shot
    assert len(detect_shots(wave, sr)) == 1
    shots = find_shots(wave, sr)
    assert len(shots) == len(times) and np.all(np.abs(shots - times) < 0.01)


@pytest.mark.parametrize(("onsets", "runs"), [
    ([0.0, 0.1, 0.2, 0.3], [(0, 3)]),
    ([0.0, 0.1, 0.2, 1.0, 1.1, 1.2], [(0, 2), (3, 5)]),
    ([0.0, 0.1, 0.25, 0.35], []),  # intervals of 100 and 150 ms: no steady rate
    ([0.0, 0.02, 0.04, 0.06], []),  # faster than 1500 rounds per minute
    ([0.0, 0.3, 0.6, 0.9], []),  # slower than 240
    ([0.0, 0.1], []),  # two blasts are no run
])
def test_steady_runs(onsets, runs):
    assert steady_runs(np.array(onsets), shortest=0.04, longest=0.25, spread=1.3, min_shots=3) == runs


def test_steady_runs_allow_the_frames_rounding():
    """Blasts timed to 5 ms frames: 1500 rounds per minute (40 ms) may come out a little shorter."""
    blasts = np.array([0.0, 0.038, 0.076, 0.114])
    assert steady_runs(blasts, shortest=0.04, longest=0.25, spread=1.3, min_shots=3) == []
    assert steady_runs(blasts, shortest=0.04, longest=0.25, spread=1.3, min_shots=3, slack=0.0025) == [(0, 3)]


RUN = np.array([1.0, 1.1, 1.2, 1.3])  # a steady run of four blasts


@pytest.mark.parametrize(("shots", "peaks", "taken"), [
    ([1.0], [-20, -21, -20, -22], [(0, 3)]),  # detect_shots heard the first shot only: the run's blasts
    ([1.0, 1.1, 1.2, 1.3], [-20, -21, -20, -22], []),  # it heard them all: its own shots stand
    ([1.0, 1.2, 1.3], [-20, -21, -20, -22], [(0, 3)]),  # it missed one of four
    ([1.1], [-20, -21, -20, -22], [(0, 3)]),  # anchored on a later blast (it took that as the loudest)
    ([5.0], [-20, -21, -20, -22], []),  # no shot of detect_shots in the run: not anchored
    ([0.9, 1.0], [-20, -21, -20, -22], []),  # a shot 100 ms ahead: the run is its layers or echoes
    ([1.0], [-20, -30, -20, -22], []),  # a blast 10 dB down in the middle: not automatic fire
    ([1.1], [-35, -21, -20, -22], [(1, 3)]),  # a quieter click ahead of the run is left out of it
    ([1.0], [-20, -21, -20, -40], [(0, 2)]),  # so is a fading last blast
    ([1.0], [-20, -21, -40, -40], []),  # but never below three blasts
])
def test_runs_to_take(shots, peaks, taken):
    assert runs_to_take(np.array(shots), RUN, np.array(peaks, dtype=float), [(0, 3)], min_shots=3, even_db=6.0,
                        tolerance=0.015, before=0.25, after=0.04, reflections=0.13) == taken


@pytest.mark.parametrize(("blasts", "taken"), [
    ([1.0, 1.05, 1.1], []),  # three blasts within 130 ms of one shot: the shot and its first reflections
    ([1.0, 1.06, 1.12], []),
    ([1.0, 1.07, 1.14], [(0, 2)]),  # spanning more: three shots (857 rounds per minute)
    ([1.0, 1.04, 1.08, 1.12], [(0, 3)]),  # four blasts are more than a shot's reflections
])
def test_runs_to_take_leaves_a_shot_and_its_first_reflections(blasts, taken):
    peaks = np.full(len(blasts), -20.0)
    assert runs_to_take(np.array([1.0]), np.array(blasts), peaks, [(0, len(blasts) - 1)], min_shots=3,
                        even_db=6.0, tolerance=0.015, before=0.25, after=0.04, reflections=0.13) == taken


@pytest.mark.parametrize(("sr", "rate"), [(96000, 12000), (48000, 12000), (44100, 11025), (32000, 16000),
                                          (22050, 11025), (16000, 16000), (11025, 11025), (8000, 8000)])
def test_decimate_keeps_the_band_and_the_frames(sr, rate):
    """The lowest rate of at least 10 kHz whose factor divides a 5 ms frame; a 1 kHz tone keeps its level and
    a tone that would fold into the band at the new rate is gone."""
    t = np.arange(sr) / sr
    low, got = decimate(np.sin(2 * np.pi * 1000 * t), sr)
    assert got == rate and len(low) == int(np.ceil(sr * rate / sr))
    assert np.sqrt(np.mean(low[rate // 10:-rate // 10] ** 2)) == pytest.approx(np.sqrt(0.5), rel=0.02)
    if rate < sr:
        folding = np.sin(2 * np.pi * (rate - 2000) * t)  # would land at 2 kHz
        assert np.sqrt(np.mean(decimate(folding, sr)[0][rate // 10:-rate // 10] ** 2)) < 0.01


@pytest.mark.parametrize("rows", [1, 2, 59, 60, 61, 300])
def test_columns_rolling_quantile_is_pandas_rolling_quantile_per_column(rows):
    values = np.random.default_rng(rows).normal(size=(rows, 5)) * 20
    expected = pd.DataFrame(values).rolling(60, min_periods=1).quantile(0.1).to_numpy()
    assert np.array_equal(columns_rolling_quantile(values, 60, 0.1), expected)


@pytest.mark.parametrize("sr, frame", [(48000, 240), (44100, 220), (16000, 80)])
def test_blasts_a_minimum_gap_apart_are_judged_alike_wherever_the_read_starts(sr, frame):
    """Blasts exactly `min_gap` apart in frames: one decision wherever the read begins (seconds counted from
    the read's start made it a matter of float rounding, so two chunks counted one burst differently)."""
    from gunsound.onsets import blast_onsets

    gap = round(0.03 * sr / frame)  # whole frames as close as min_gap allows
    counts = set()
    for first in (300, 1001, 4567, 12345, 20000):
        level = np.full(first + 400, -60.0)
        for k in range(5):  # five blasts, each `gap` frames after the last, a frame loud then fading
            level[first + k * gap] = 0.0
            level[first + k * gap + 1: first + k * gap + 3] = -20.0
        times, _ = blast_onsets(level, frame, sr, min_gap=gap * frame / sr)
        counts.add(len(times))
    assert len(counts) == 1, counts
