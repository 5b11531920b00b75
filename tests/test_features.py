"""The log-mel module against an independent float64 NumPy reference."""

import numpy as np
import pytest
import torch

from gunsound.config import AudioConfig
from gunsound.features import FeatureParams, LogMelSpectrogram, mel_frames
from tests.conftest import reference_log_mel


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
