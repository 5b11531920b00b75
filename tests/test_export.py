"""The exported pipeline: real files shipped beside score.py, run without Ray or gunsound, scoring a file as
`predict_file` does (the Ray job's comparison is in test_scoring.py)."""

import csv
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
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
    assert result.returncode == 0, result.stderr  # corrupt.wav is an error row, not a failure
    assert f"error: {audio / 'corrupt.wav'}: unreadable audio" in result.stderr
    assert spec["models"] == [f"{tmp_path.name}/model.pt"]  # where the models lay stays with the exporter
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


def test_exported_scorer_writes_file_by_file_resumes_after_a_crash_and_escapes_formulas(tmp_path):
    cfg = load_config(LAPTOP_CONFIG, FAST)
    ModelArtifact(classes=["=cmd", "b"], features=FeatureParams.from_config(cfg.audio, sample_rate=16000),
                  chunk_seconds=1.0, architecture=cfg.architecture, loss_function="BCE",
                  state_dict=build_model(cfg.architecture, 2, pretrained=False).state_dict(),
                  ).save(str(tmp_path / "model.pt"))
    export_pipeline(str(tmp_path / "model.pt"), str(tmp_path / "pipeline"), SETTINGS)
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    names = ["first.wav", "=HYPERLINK(1).wav", "@sum.wav", "+1.wav", "'quoted.wav"]
    for name in names:
        sf.write(audio / name, rng.normal(0, 0.1, 16000 * 3).astype(np.float32), 16000)
    os.mkfifo(audio / "stuck.wav")  # opening it blocks for ever: the scorer is killed there
    out = tmp_path / "out"

    def scorer(pipeline: Path, *files: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(pipeline / "score.py"), *files, "--out", str(out), *extra],
                                cwd=audio, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(GUARD)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    stuck = scorer(tmp_path / "pipeline", names[0], "stuck.wav", *names[1:])
    deadline = time.monotonic() + 240
    while not ((out / "files.csv").exists() and "first.wav" in (out / "files.csv").read_text()):
        assert stuck.poll() is None and time.monotonic() < deadline, stuck.communicate()
        time.sleep(0.2)
    time.sleep(1.0)
    stuck.kill()
    stuck.communicate()
    assert list(pd.read_csv(out / "files.csv", dtype=str)["file"]) == ["first.wav"]  # kept through the crash

    (audio / "stuck.wav").unlink()
    (audio / "broken.wav").write_bytes(b"RIFF" + b"\x01" * 100)
    finish = scorer(tmp_path / "pipeline", *names, "broken.wav", extra=("--strict",))
    stdout, stderr = finish.communicate(timeout=240)
    assert finish.returncode == 3, stderr  # --strict: an error row gives its own exit status
    assert "first.wav" not in stdout  # already in files.csv: not scored again
    tables = {t: pd.read_csv(out / f"{t}.csv", dtype=str, keep_default_na=False) for t in ("windows", "files")}
    unquoted = {t: table["file"].map(lambda v: v[1:] if v.startswith("'") else v) for t, table in tables.items()}
    assert sorted(unquoted["files"]) == sorted([*names, "broken.wav"])  # each file exactly once
    assert unquoted["windows"].value_counts().to_dict() == {n: 3 for n in names}
    assert "'=HYPERLINK(1).wav" in set(tables["files"]["file"]) and "''quoted.wav" in set(tables["files"]["file"])
    for table in tables.values():  # no cell a spreadsheet would run as a formula
        assert not [c for c in table.to_numpy().ravel() if c.startswith(("=", "+", "@"))]

    other = tmp_path / "other"  # another pipeline may not append to these tables
    export_pipeline(str(tmp_path / "model.pt"), str(other), [*SETTINGS, "scoring.hop_seconds=0.5"])
    refused = scorer(other, names[0])
    _, stderr = refused.communicate(timeout=240)
    assert refused.returncode != 0 and "another pipeline" in stderr


@pytest.fixture(scope="module")
def resumable(tmp_path_factory) -> SimpleNamespace:
    """An exported pipeline (untrained weights), three recordings with shots, and the tables one uninterrupted
    run writes for them: what a resumed run must end with."""
    root = tmp_path_factory.mktemp("resumable")
    cfg = load_config(LAPTOP_CONFIG, FAST)
    torch.manual_seed(0)
    ModelArtifact(classes=["a", "b"], features=FeatureParams.from_config(cfg.audio, sample_rate=16000),
                  chunk_seconds=1.0, architecture=cfg.architecture, loss_function="BCE",
                  state_dict=build_model(cfg.architecture, 2, pretrained=False).state_dict(),
                  ).save(str(root / "model.pt"))
    export_pipeline(str(root / "model.pt"), str(root / "pipeline"), SETTINGS)
    names = ["one.wav", "two.wav", "three.wav"]
    for seed, name in enumerate(names):
        generate_archive(root / "audio" / name, minutes=0.1, bursts_per_minute=30, sample_rate=16000, seed=seed)
    setup = SimpleNamespace(pipeline=root / "pipeline", audio=root / "audio", names=names)
    clean = score_into(setup, root / "clean", *names)
    assert clean.returncode == 0, clean.stderr
    setup.tables = read_tables(root / "clean")
    assert len(setup.tables["events"]) > 0  # so that a duplicated shot would show
    return setup


def score_into(setup: SimpleNamespace, out: Path, *names: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(setup.pipeline / "score.py"), *names, "--out", str(out)],
                          cwd=setup.audio, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(GUARD)},
                          capture_output=True, text=True, timeout=240)


def read_tables(out: Path) -> dict[str, pd.DataFrame]:
    """The three tables as text, rows in a fixed order (a resumed run scores files in another order)."""
    tables = {t: pd.read_csv(out / f"{t}.csv", dtype=str, keep_default_na=False) for t in ("windows", "files", "events")}
    return {t: table.sort_values(list(table.columns)).reset_index(drop=True) for t, table in tables.items()}


def assert_whole_rows_once(out: Path, names: list[str]) -> None:
    """files.csv: every row on a line of its own with every column, each file once, ending with a line end."""
    text = (out / "files.csv").read_text()
    assert text.endswith("\n")
    header, *rows = list(csv.reader(io.StringIO(text, newline="")))
    assert [len(r) for r in rows] == [len(header)] * len(rows)
    assert sorted(r[header.index("file")] for r in rows) == sorted(names)


def test_exported_scorer_resumes_from_an_empty_files_table(resumable):
    out = resumable.audio.parent / "out_empty"
    assert score_into(resumable, out, resumable.names[0]).returncode == 0
    (out / "files.csv").write_bytes(b"")  # a kill between opening files.csv and writing its first row
    resumed = score_into(resumable, out, *resumable.names)
    assert resumed.returncode == 0, resumed.stderr
    assert [line.split(":")[0] for line in resumed.stdout.splitlines()] == resumable.names  # none was committed
    assert_whole_rows_once(out, resumable.names)
    for table, clean in resumable.tables.items():  # one.wav's windows and shots once, as an uninterrupted run
        pd.testing.assert_frame_equal(read_tables(out)[table], clean)


def test_exported_scorer_scores_again_a_file_whose_files_row_was_cut(resumable):
    out = resumable.audio.parent / "out_cut"
    one, two, three = resumable.names
    assert score_into(resumable, out, one, two).returncode == 0
    text = (out / "files.csv").read_bytes()
    last = text.rstrip(b"\n").rsplit(b"\n", 1)[1]
    assert last.startswith(two.encode())
    (out / "files.csv").write_bytes(text[:len(text) - 1 - len(last) // 2])  # a kill half-way through two's row
    resumed = score_into(resumable, out, *resumable.names)
    assert resumed.returncode == 0, resumed.stderr
    assert [line.split(":")[0] for line in resumed.stdout.splitlines()] == [two, three]  # two is no commit
    assert_whole_rows_once(out, resumable.names)
    for table, clean in resumable.tables.items():  # two's windows and shots once, its cut row gone
        pd.testing.assert_frame_equal(read_tables(out)[table], clean)
    again = score_into(resumable, out, *resumable.names)
    assert (again.returncode, again.stdout) == (0, ""), again.stderr  # every file committed
    for table, clean in resumable.tables.items():
        pd.testing.assert_frame_equal(read_tables(out)[table], clean)
