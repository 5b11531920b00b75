import numpy as np
import pytest
import soundfile as sf

from gunsound import audio


def tone(sr: int, seconds: float = 1.0, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    mono = 0.5 * np.sin(2 * np.pi * freq * t)
    return mono if channels == 1 else np.stack([mono, 0.5 * mono], axis=1)


def dominant_frequency(wave: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / sr)[spectrum.argmax()])


@pytest.mark.parametrize(("fmt", "ext", "subtype"), [
    ("WAV", "wav", "PCM_16"), ("FLAC", "flac", "PCM_24"), ("OGG", "ogg", "VORBIS"), ("MP3", "mp3", "MPEG_LAYER_III"),
])
def test_each_format_decodes_to_mono_at_the_target_rate(tmp_path, fmt, ext, subtype):
    path = tmp_path / f"clip.{ext}"
    sf.write(path, tone(44100, channels=2), 44100, format=fmt, subtype=subtype)
    wave, sr = audio.read(str(path), target_sr=48000)
    assert sr == 48000 and wave.ndim == 1 and wave.dtype == np.float32
    assert abs(len(wave) - 48000) < 48000 * 0.05  # MP3 and Vorbis pad a little
    assert dominant_frequency(wave, sr) == pytest.approx(440, abs=3)


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_bit_depths(tmp_path, subtype):
    path = tmp_path / "clip.wav"
    sf.write(path, tone(16000), 16000, subtype=subtype)
    wave, sr = audio.read(str(path))
    assert sr == 16000
    tolerance = 1e-2 if subtype == "PCM_U8" else 1e-4
    np.testing.assert_allclose(wave, tone(16000), atol=tolerance)


@pytest.mark.parametrize("sr", [8000, 11025, 22050, 32000, 44100, 96000, 7350])
def test_odd_sample_rates_resample_keeping_pitch(tmp_path, sr):
    path = tmp_path / "clip.wav"
    sf.write(path, tone(sr, freq=1000.0), sr)
    wave, out_sr = audio.read(str(path), target_sr=48000)
    assert out_sr == 48000 and len(wave) == 48000
    assert dominant_frequency(wave, 48000) == pytest.approx(1000, abs=2)


def test_stereo_is_mixed_to_mono(tmp_path):
    path = tmp_path / "stereo.wav"
    left, right = np.full(100, 0.5), np.full(100, -0.25)
    sf.write(path, np.stack([left, right], axis=1), 8000, subtype="FLOAT")
    wave, _ = audio.read(str(path))
    np.testing.assert_allclose(wave, 0.125, atol=1e-6)


def test_frame_range_read_matches_whole_read(tmp_path):
    path = tmp_path / "long.flac"
    data = np.random.default_rng(0).uniform(-0.5, 0.5, 48000 * 5)
    sf.write(path, data, 48000, subtype="PCM_24")
    whole, _ = audio.read(str(path))
    part, _ = audio.read(str(path), start=2.5, duration=1.0)
    np.testing.assert_array_equal(part, whole[120000:168000])


def test_info_reads_header_only(tmp_path):
    path = tmp_path / "clip.wav"
    sf.write(path, tone(22050, seconds=2, channels=2), 22050, subtype="PCM_24")
    info = audio.info(str(path))
    assert (info.sample_rate, info.channels, info.frames) == (22050, 2, 44100)
    assert info.duration == pytest.approx(2.0)


@pytest.mark.parametrize("content", [b"", b"not audio at all" * 100, b"RIFF\x00\x00\x00\x00WAVEfmt garbage"])
def test_corrupt_files_raise_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    with pytest.raises(audio.AudioError, match="broken.wav"):
        audio.read(str(path))
    with pytest.raises(audio.AudioError, match="broken.wav"):
        audio.info(str(path))


def test_fit_length_pads_and_crops_around_the_loudest_part():
    short = np.ones(10, dtype=np.float32)
    assert audio.fit_length(short, 16).tolist() == [1.0] * 10 + [0.0] * 6
    long = np.zeros(1000, dtype=np.float32)
    long[700:710] = 1.0
    cropped = audio.fit_length(long, 100)
    assert len(cropped) == 100 and cropped.sum() == 10.0
