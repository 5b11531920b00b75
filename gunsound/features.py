"""The log-mel front end: one torch module, shared by training, scoring and the exported pipeline."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torchaudio.functional as AF
from torch import nn

from gunsound.config import AudioConfig

LOG_FLOOR = 1e-10
# How far below its loudest bin a peak-relative spectrogram reaches: 80 dB, in natural log of power.
PEAK_RANGE = 8 * math.log(10)


@dataclass(frozen=True)
class FeatureParams:
    """What the front end needs; saved beside every model so scoring computes the same features."""

    sample_rate: int
    n_fft: int
    hop_length: int
    n_mels: int
    f_min: float
    f_max: float
    normalize: bool
    relative_to_peak: bool = False

    @classmethod
    def from_config(cls, audio: AudioConfig, sample_rate: int | None = None) -> FeatureParams:
        sr = sample_rate or audio.sample_rate
        return cls(
            sample_rate=sr,
            n_fft=audio.stft_window_size,
            hop_length=audio.hop_size,
            n_mels=audio.mel_frequency_bins,
            f_min=float(audio.minimum_frequency),
            # The configured maximum may lie above Nyquist for data at a lower rate.
            f_max=float(min(audio.maximum_frequency, sr / 2)),
            normalize=audio.spectrogram_normalization == "Yes",
            relative_to_peak=audio.spectrogram_normalization == "Peak",
        )

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.hop_length + 1  # centred STFT

    def unnormalized(self) -> FeatureParams:
        """The same log-mel left in natural-log power: what training computes ahead of time, so that the
        augmentations act on sound (a mix of two clips is a sum of powers) before `normalized` is applied."""
        return replace(self, normalize=False, relative_to_peak=False)


FLAT_STD = 1e-4  # natural-log units: a spectrogram whose values spread less than this is flat


def normalized(spec: torch.Tensor, *, normalize: bool, relative_to_peak: bool) -> torch.Tensor:
    """Natural-log mel spectrograms (..., mels, frames), each normalised as `LogMelSpectrogram` describes:
    measured from its peak (`relative_to_peak`), standardised (`normalize`), or left as they are."""
    if relative_to_peak:
        peak = spec.amax(dim=(-2, -1), keepdim=True)
        return (spec - peak).clamp_min(-PEAK_RANGE) / (PEAK_RANGE / 2) + 1.0
    if normalize:
        mean = spec.mean(dim=(-2, -1), keepdim=True)
        std = spec.std(dim=(-2, -1), keepdim=True)
        # A flat picture (digital silence) is 0: its std is float rounding, which varies with the picture's
        # size and the batch, so dividing by it gave training and scoring different constants for silence.
        return torch.where(std > FLAT_STD, (spec - mean) / (std + 1e-5), torch.zeros_like(spec))
    return spec


class LogMelSpectrogram(nn.Module):
    """Waveform (batch, samples) -> log-mel (batch, 1, n_mels, frames).

    Power mel spectrogram from a centred, Hann-windowed STFT with an HTK mel filterbank (torchaudio's),
    then natural log. With `normalize`, each spectrogram is standardised to zero mean and unit variance.
    With `relative_to_peak`, each is measured from its loudest bin, floored `PEAK_RANGE` below it and scaled to
    [-1, 1]: recorder gain and distance drop out as with standardising, and a sound's picture does not depend
    on how much of the window is silence or padding (a standardised 0.1 s click in a 4 s window is a far
    brighter column than the same click in a 0.5 s one).
    The power is taken as re^2 + im^2 of the bins the filterbank uses, which is 2-3x faster on a CPU than
    |z|^2 of every bin and gives the same numbers.
    """

    def __init__(self, params: FeatureParams):
        super().__init__()
        self.params = params
        fb = AF.melscale_fbanks(
            n_freqs=params.n_fft // 2 + 1, f_min=params.f_min, f_max=params.f_max, n_mels=params.n_mels,
            sample_rate=params.sample_rate, norm=None, mel_scale="htk",
        )
        used = int(torch.nonzero(fb.sum(dim=1)).max()) + 1  # bins above f_max carry no weight
        self.register_buffer("filterbank", fb[:used].T.contiguous(), persistent=False)  # (mels, bins)
        # clone: hann_window returns a view of an n_fft + 1 storage, which torch.export.save warns about.
        self.register_buffer("window", torch.hann_window(params.n_fft).clone(), persistent=False)
        self.used_bins = used

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        p = self.params
        # The STFT runs in fp32 even under autocast: fp16 power spectra overflow and underflow.
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spec = torch.stft(wave.float(), p.n_fft, p.hop_length, p.n_fft, self.window, center=True,
                              pad_mode="reflect", return_complex=True)
            parts = torch.view_as_real(spec[:, : self.used_bins])
            power = parts[..., 0].square() + parts[..., 1].square()  # (batch, bins, frames)
            mel = torch.matmul(self.filterbank, power)
            spec = normalized(torch.log(mel.clamp_min(LOG_FLOOR)), normalize=p.normalize,
                              relative_to_peak=p.relative_to_peak)
        return spec.unsqueeze(1)


def mel_frames(seconds: float, params: FeatureParams) -> int:
    return params.num_frames(int(math.ceil(seconds * params.sample_rate)))
