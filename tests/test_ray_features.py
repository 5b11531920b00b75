"""Features through Ray Data on a local Ray."""

import numpy as np
import pandas as pd
import pytest
import torch

from gunsound import audio
from gunsound.config import AudioConfig
from gunsound.features import FeatureParams, LogMelSpectrogram
from gunsound.ray_features import feature_dataset
from gunsound.ray_runtime import start_ray_data_helpers, warm_up_workers

pytestmark = pytest.mark.ray


def test_features_match_the_module_and_bad_files_become_error_rows(ray_local, synth_dir, tmp_path):
    frame = pd.read_parquet(synth_dir / "train.pq").head(12)
    paths = [str(synth_dir / "Gun_Classifier" / p) for p in frame["image"]]
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF" + b"\x00" * 100)
    paths += [str(corrupt), str(tmp_path / "missing.wav")]
    params = FeatureParams.from_config(AudioConfig(mel_frequency_bins=64, stft_window_size=1024))
    clips = pd.DataFrame({"row": range(len(paths)), "path": paths})

    out = feature_dataset(clips, params, chunk_seconds=2.0).to_pandas().sort_values("row")

    # Its scheduling settings stay with this dataset; other pipelines keep Ray Data's defaults.
    assert ray_local.data.DataContext.get_current().op_resource_reservation_enabled

    assert list(out["row"]) == list(range(len(paths)))  # every input row comes out exactly once
    errors = dict(zip(out["path"], out["error"], strict=True))
    assert "corrupt.wav" in errors[str(corrupt)] and "missing.wav" in errors[str(tmp_path / "missing.wav")]
    assert all(errors[p] == "" for p in paths[:12])
    wave, _ = audio.read(paths[0], 48000)
    expected = LogMelSpectrogram(params)(torch.from_numpy(audio.fit_length(wave, 96000))[None])[0, 0].numpy()
    got = np.asarray(out.iloc[0]["features"])
    assert got.shape == (64, 188)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_warm_up_starts_ray_data_helpers_on_this_ray(ray_local):
    # The helpers are found through Ray Data internals: this fails when a Ray upgrade moves them.
    assert start_ray_data_helpers()
    ray_local.get(warm_up_workers())
    from ray.data._internal.stats import STATS_ACTOR_NAME, STATS_ACTOR_NAMESPACE

    ray_local.get_actor(STATS_ACTOR_NAME, namespace=STATS_ACTOR_NAMESPACE)
    ray_local.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")


def test_ray_workers_read_clips_inside_a_zip(ray_local, synth_dir, tmp_path):
    # The archive is read in place: workers open it themselves, as they would on another node of a cluster.
    from gunsound import storage
    from tests.conftest import zip_folder

    archive = zip_folder(synth_dir, tmp_path / "data.zip", prefix="")
    rel = list(pd.read_parquet(synth_dir / "train.pq")["image"].head(4))
    params = FeatureParams.from_config(AudioConfig(mel_frequency_bins=64, stft_window_size=1024))
    plain = pd.DataFrame({"row": range(4), "path": [str(synth_dir / "Gun_Classifier" / r) for r in rel]})
    zipped = plain.assign(path=[storage.zip_location(str(archive), "Gun_Classifier/" + r) for r in rel])
    expected = feature_dataset(plain, params, chunk_seconds=2.0).to_pandas().sort_values("row")
    got = feature_dataset(zipped, params, chunk_seconds=2.0).to_pandas().sort_values("row")
    assert list(got["error"]) == [""] * 4
    for a, b in zip(got["features"], expected["features"], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
