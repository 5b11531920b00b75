"""The log-mel module against an independent float64 NumPy reference."""

import math

import numpy as np
import pytest
import torch

from gunsound.config import AudioConfig
from gunsound.features import LOG_FLOOR, PEAK_RANGE, FeatureParams, LogMelSpectrogram, mel_frames, normalized
from tests.conftest import reference_log_mel


@pytest.mark.parametrize("normalize", ["No", "Yes", "Peak"])
def test_log_mel_matches_float64_reference(normalize):
    cfg = AudioConfig(sample_rate=48000, stft_window_size=2048, hop_size=512, mel_frequency_bins=128,
                      minimum_frequency=50, maximum_frequency=16000, spectrogram_normalization=normalize)
    params = FeatureParams.from_config(cfg)
    rng = np.random.default_rng(0)
    t = np.arange(48000) / 48000
    wave = (0.3 * np.sin(2 * np.pi * 1234 * t) + 0.05 * rng.standard_normal(48000)).astype(np.float32)
    got = LogMelSpectrogram(params)(torch.from_numpy(wave)[None])[0, 0].double().numpy()
    ref = reference_log_mel(wave, params)
    if normalize == "Yes":
        ref = (ref - ref.mean()) / ref.std(ddof=1)
    if normalize == "Peak":
        ref = np.maximum(ref - ref.max(), -PEAK_RANGE) / (PEAK_RANGE / 2) + 1
    assert got.shape == ref.shape == (128, mel_frames(1.0, params))
    # float32 STFT against float64: agreement well inside 1e-3 in the log domain where there is energy.
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=0)


def test_maximum_frequency_is_clamped_to_nyquist():
    params = FeatureParams.from_config(AudioConfig(maximum_frequency=16000), sample_rate=16000)
    assert params.f_max == 8000


def test_batch_and_single_agree():
    params = FeatureParams.from_config(AudioConfig(mel_frequency_bins=64, stft_window_size=1024))
    waves = torch.randn(3, 24000)
    module = LogMelSpectrogram(params)
    batched = module(waves)
    assert batched.shape == (3, 1, 64, 24000 // 512 + 1)
    torch.testing.assert_close(batched[1], module(waves[1:2])[0])


def test_peak_relative_picture_of_a_sound_ignores_padding_and_gain():
    """A click followed by 0.4 s or by 3.9 s of silence (a short clip zero-padded to the model's window), at any
    gain: measured from its peak the click's frames are the same; standardised, the longer padding makes it brighter."""
    rng = np.random.default_rng(1)
    click = (rng.standard_normal(4800) * np.exp(-np.arange(4800) / 300)).astype(np.float32)
    short, long_ = np.zeros(24000, np.float32), np.zeros(192000, np.float32)
    short[:4800], long_[:4800] = click, click * 0.01
    frames = 8  # the click's frames, clear of the window's end
    pictures = {}
    for normalize in ("Yes", "Peak"):
        module = LogMelSpectrogram(FeatureParams.from_config(AudioConfig(spectrogram_normalization=normalize)))
        pictures[normalize] = [module(torch.from_numpy(w)[None])[0, 0, :, :frames] for w in (short, long_)]
    torch.testing.assert_close(pictures["Peak"][0], pictures["Peak"][1], atol=1e-3, rtol=0)
    standardised_gap = (pictures["Yes"][1] - pictures["Yes"][0]).abs().mean()
    assert standardised_gap > 0.5, standardised_gap
    assert pictures["Peak"][0].max() == pytest.approx(1.0) and pictures["Peak"][1].min() >= -1.0


@pytest.mark.parametrize("normalize", ["No", "Yes", "Peak"])
def test_training_normalises_its_unnormalised_features_as_the_scorer_does(normalize):
    """Training computes log-mels in natural-log power (`unnormalized`) and normalises each clip on the worker
    after augmentation; the scorer's front end does both at once. The same wave gives the same input."""
    params = FeatureParams.from_config(AudioConfig(sample_rate=16000, stft_window_size=512, hop_size=160,
                                                   mel_frequency_bins=40, spectrogram_normalization=normalize))
    wave = torch.from_numpy(np.random.default_rng(1).standard_normal((3, 16000)).astype(np.float32))
    raw = LogMelSpectrogram(params.unnormalized())(wave)
    assert params.unnormalized().normalize is False and params.unnormalized().relative_to_peak is False
    torch.testing.assert_close(normalized(raw, normalize=params.normalize, relative_to_peak=params.relative_to_peak),
                               LogMelSpectrogram(params)(wave))


@pytest.mark.parametrize("shape", [(1, 16, 40), (4, 16, 40), (2, 128, 401)])
def test_a_silent_clip_standardises_to_zero_whatever_its_size_and_batch(shape):
    silent = torch.full(shape, math.log(LOG_FLOOR))
    assert torch.equal(normalized(silent, normalize=True, relative_to_peak=False), torch.zeros(shape))
