import numpy as np
import pandas as pd
import soundfile as sf
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from gunsound import audio
from gunsound.synthesis import CLASSES, generate_dataset


def test_layout_formats_and_determinism(tmp_path):
    a = generate_dataset(tmp_path / "a", clips_per_class=3, background=2, seed=3)
    b = generate_dataset(tmp_path / "b", clips_per_class=3, background=2, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert set(a["class"]) == set(CLASSES) | {"background"}
    for rel in a["image"]:  # samples, not bytes: float WAVs carry a PEAK chunk with a timestamp
        wave_a, sr_a = sf.read(tmp_path / "a" / "Gun_Classifier" / rel)
        wave_b, sr_b = sf.read(tmp_path / "b" / "Gun_Classifier" / rel)
        assert sr_a == sr_b
        np.testing.assert_array_equal(wave_a, wave_b)
    assert pd.read_parquet(tmp_path / "a" / "train.pq").shape == a.shape
    assert (a.loc[a["class"] == "background", "num_shots"] == 0).all()
    assert (a.loc[a["class"] != "background", "num_shots"] > 0).all()


def test_mixed_rates_channels_and_depths(synth_dir):
    frame = pd.read_parquet(synth_dir / "train.pq")
    infos = [sf.info(synth_dir / "Gun_Classifier" / p) for p in frame["image"]]
    rates = [i.samplerate for i in infos]
    assert max(set(rates), key=rates.count) == 48000 and len(set(rates)) > 1
    assert {i.channels for i in infos} == {1, 2}
    assert len({i.subtype for i in infos}) > 1


def test_classes_are_separable_by_simple_features(tmp_path):
    """Labelled noise would score at chance; the physical model gives classes a real acoustic signature."""
    frame = generate_dataset(tmp_path, clips_per_class=24, seed=11)
    feats = []
    for rel in frame["image"]:
        wave, sr = audio.read(str(tmp_path / "Gun_Classifier" / rel), target_sr=48000, duration=2.0)
        spectrum = np.abs(np.fft.rfft(wave, n=96000)) ** 2
        bands = np.log(np.add.reduceat(spectrum, np.geomspace(20, 40000, 40).astype(int)) + 1e-9)
        env = np.convolve(np.abs(wave), np.ones(480) / 480, mode="same")[::480]
        lag_spectrum = np.abs(np.fft.rfft(env - env.mean(), n=256))[:40]
        feats.append(np.concatenate([bands - bands.max(), np.log(lag_spectrum + 1e-6)]))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
    accuracy = cross_val_score(model, np.array(feats), frame["class"], cv=4).mean()
    assert accuracy > 0.7, accuracy  # 9 classes: chance is 0.11
