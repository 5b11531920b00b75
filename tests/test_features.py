"""The log-mel module against an independent float64 NumPy reference."""

import numpy as np
import pytest
import torch

from gunsound.config import AudioConfig
from gunsound.features import FeatureParams, LogMelSpectrogram, mel_frames


def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)


def reference_log_mel(wave: np.ndarray, p: FeatureParams) -> np.ndarray:
    """float64: reflect-padded centred frames, periodic Hann, |rfft|^2, triangular HTK mel filters, log."""
    x = np.pad(wave.astype(np.float64), p.n_fft // 2, mode="reflect")
    n_frames = 1 + (len(x) - p.n_fft) // p.hop_length
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(p.n_fft) / p.n_fft)
    frames = np.stack([x[i * p.hop_length : i * p.hop_length + p.n_fft] * window for i in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (frames, bins)
    bin_hz = np.linspace(0, p.sample_rate / 2, p.n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(p.f_min), hz_to_mel(p.f_max), p.n_mels + 2))
    fb = np.zeros((len(bin_hz), p.n_mels))
    for m in range(p.n_mels):
        lo, centre, hi = edges[m], edges[m + 1], edges[m + 2]
        up = (bin_hz - lo) / (centre - lo)
        down = (hi - bin_hz) / (hi - centre)
        fb[:, m] = np.maximum(0, np.minimum(up, down))
    mel = power @ fb
    return np.log(np.maximum(mel, 1e-10)).T  # (mels, frames)


@pytest.mark.parametrize("normalize", ["No", "Yes"])
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
