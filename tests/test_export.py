"""The exported pipeline: real files shipped beside score.py, run without Ray or gunsound, scoring a file as
`predict_file` does (the Ray job's comparison is in test_scoring.py)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from gunsound.config import load_config
from gunsound.export import SCORER_FILES, export_pipeline
from gunsound.features import FeatureParams
from gunsound.inference import load_scoring_model
from gunsound.model import ModelArtifact, build_model
from gunsound.scoring import predict_file, scoring_config
from gunsound.synthesis import generate_archive
from tests.conftest import FAST, LAPTOP_CONFIG

GUARD = Path(__file__).parent / "guard"  # its sitecustomize.py blocks imports of ray and gunsound
SETTINGS = ["prediction.inference_chunk_method=Sliding", "scoring.hop_seconds=1.0", "scoring.read_seconds=5",
            "prediction.probability_threshold=0.0"]


def test_exported_scorer_is_real_files_and_scores_as_predict_does_without_ray_or_gunsound(tmp_path):
    cfg = load_config(LAPTOP_CONFIG, FAST)
    torch.manual_seed(0)
    classes = ["a", "b", "c"]
    ModelArtifact(classes=classes, features=FeatureParams.from_config(cfg.audio, sample_rate=16000),
                  chunk_seconds=2.0, architecture=cfg.architecture, loss_function="BCE",
                  state_dict=build_model(cfg.architecture, len(classes), pretrained=False).state_dict(),
                  ).save(str(tmp_path / "model.pt"))
    spec = export_pipeline(str(tmp_path / "model.pt"), str(tmp_path / "pipeline"), SETTINGS)
    shipped = sorted(p.name for p in (tmp_path / "pipeline").iterdir())
    assert shipped == sorted(["model.pt2", "pipeline.json", *(f.name for f in SCORER_FILES)])
    for source in SCORER_FILES:  # the package's own files, as they are
        assert (tmp_path / "pipeline" / source.name).read_bytes() == source.read_bytes()
    assert spec["scoring"]["read_seconds"] == 5.0

    audio = tmp_path / "audio"
    generate_archive(audio / "long.wav", minutes=0.2, bursts_per_minute=10, seed=1)
    wave, sr = sf.read(audio / "long.wav")
    sf.write(audio / "stereo.flac", np.stack([wave[: sr * 3], wave[: sr * 3]], axis=1), sr)
    (audio / "corrupt.wav").write_bytes(b"RIFF" + b"\x01" * 200)
    files = [audio / "long.wav", audio / "stereo.flac", audio / "corrupt.wav"]
    result = subprocess.run([sys.executable, "score.py", *map(str, files), "--out", str(tmp_path / "out")],
                            cwd=tmp_path / "pipeline", env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(GUARD)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr  # corrupt.wav is an error, not a crash
    assert "corrupt.wav: error" in result.stderr
    exported = {t: pd.read_csv(tmp_path / "out" / f"{t}.csv", keep_default_na=t != "files")
                for t in ("windows", "files", "events")}

    model = load_scoring_model(str(tmp_path / "model.pt"))
    run_cfg = scoring_config(str(tmp_path / "model.pt"), SETTINGS)
    for path in files[:2]:
        row, events, windows = predict_file(model, str(path), run_cfg)
        got = exported["windows"][exported["windows"]["file"] == str(path)]
        np.testing.assert_allclose(got["start"], windows["start"])
        np.testing.assert_allclose(got[[f"prob_{c}" for c in classes]].to_numpy(), np.stack(windows["probs"]),
                                   atol=1e-4)
        file_row = exported["files"].set_index("file").loc[str(path)]
        assert (file_row["windows"], file_row["shots"], file_row["top_class"]) == \
            (row["windows"], row["shots"], row["top_class"])
        shots = exported["events"][exported["events"]["file"] == str(path)]
        np.testing.assert_allclose(shots["time"], [e["time"] for e in events], atol=1e-6)
    assert len(exported["events"]) > 0
