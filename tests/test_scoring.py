"""The scoring job: settings, the chunk reader, a scored archive with odd files, resume, predict, export."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from gunsound import audio, scoring, storage
from gunsound.cli import main
from gunsound.config import ConfigError, load_config
from gunsound.inference import CPU_MODEL_WINDOWS, WindowScorer, load_scoring_model
from gunsound.inputs import list_inputs
from gunsound.synthesis import generate_archive
from gunsound.windows import plan_chunks, window_starts
from tests.conftest import LAPTOP_CONFIG


@pytest.mark.parametrize(("hop", "heard"), [(2.0, (0.9, 0.2, 0.0)), (1.0, (0.9, 0.2, 0.0)), (2.0, (0.2, 0.2, 0.6))])
def test_shots_are_searched_only_where_they_can_be_reported(tmp_path, hop, heard):
    """A chunk none of whose windows reaches the threshold keeps no shots (none could be reported); one whose
    window does gets exactly what the reader would have found; a later chunk whose shots the previous chunk's
    window also covers (hop shorter than the window) is always searched."""
    path = tmp_path / "archive.wav"
    generate_archive(path, minutes=1, bursts_per_minute=6, seed=3)
    chunks = plan_chunks(str(path), 60.0, window_seconds=2.0, hop_seconds=hop, read_seconds=20.0)[:3]
    batch = {k: np.array([c[k] for c in chunks], dtype=object) for k in chunks[0]}
    read = {"sample_rate": 48000, "window_seconds": 2.0, "onset_detection": True, "onset_threshold_db": 12.0,
            "s3": storage.current_settings()}
    always = scoring.read_chunks(batch, **read)
    pending = []
    groups = {"shard": np.array([0]), "shard_rows": np.array([len(always["path"])]),
              "chunks": np.array([json.dumps([{**c, "starts": list(c["starts"])} for c in chunks])], dtype=object)}
    scored = scoring.read_groups(groups, **read, pending=pending)
    assert len(pending) == 3 and all(len(o) == 0 for o in scored["onsets"])
    firsts = [row for row, _, _ in pending]
    scored["probs"] = np.zeros((len(scored["path"]), 2), dtype=np.float32)
    for row, level in zip(firsts, heard, strict=True):
        scored["probs"][row + 1, 1] = level  # one window of the chunk, not its first
    scoring.detect_where_heard(scored, pending, sample_rate=48000, window_seconds=2.0, threshold=0.5,
                               onset_threshold_db=12.0)
    expected_rows = np.flatnonzero([len(o) > 0 for o in always["onsets"]])
    assert len(expected_rows) == 3  # every chunk of this archive holds shots
    for k, (row, level) in enumerate(zip(firsts, heard, strict=True)):
        searched = level >= 0.5 or (k > 0 and hop < 2.0)
        expected = always["onsets"][expected_rows[k]] if searched else np.zeros(0)
        np.testing.assert_array_equal(scored["onsets"][row], expected)


@pytest.mark.parametrize(("audio_parameters", "window"), [("Auto", 2.0), ("Manual", 60.0)])
def test_fix_windows_are_the_training_chunk_that_auto_chose(audio_parameters, window):
    # The seed's Fix/60 s around a model trained on the 2 s chunk Auto chose would score padding, not shots.
    from tests.conftest import SEED_CONFIG

    cfg = load_config(SEED_CONFIG, [f"audio.audio_parameters={audio_parameters}"])
    s = scoring.ScoringSettings.from_config(cfg, model_chunk_seconds=2.0)
    assert (s.method, s.window_seconds, s.hop_seconds) == ("Fix", window, window)


def test_the_chunk_reader_cuts_windows_and_carries_the_chunks_onsets_as_float_arrays(tmp_path):
    path = tmp_path / "archive.wav"
    truth = generate_archive(path, minutes=1, bursts_per_minute=4, seed=3)
    chunk = plan_chunks(str(path), 60.0, window_seconds=2.0, hop_seconds=1.0, read_seconds=20.0)[0]
    batch = {k: np.array([v], dtype=object) for k, v in chunk.items()}
    found = {db: scoring.read_chunks(batch, sample_rate=48000, window_seconds=2.0, onset_detection=True,
                                     onset_threshold_db=db, s3=storage.current_settings()) for db in (12.0, 200.0)}
    cut = found[12.0]
    assert cut["wave"].shape == (20, 96000) and cut["index"].tolist() == list(range(20))
    assert all(o.dtype == np.float64 for o in cut["onsets"]) and all(len(o) == 0 for o in cut["onsets"][1:])
    in_chunk = truth["time"][truth["time"] < chunk["starts"][-1] + 1.0]
    assert len(cut["onsets"][0]) >= 0.9 * len(in_chunk) > 0 and len(found[200.0]["onsets"][0]) == 0


@pytest.mark.parametrize("bad", ["scoring.actors=0", "scoring.onset_threshold_db=0", "scoring.batch_size=0",
                                 "scoring.shard_files=0", "scoring.read_seconds=0", "scoring.hop_seconds=-1"])
def test_scoring_settings_are_checked_with_the_key_named(bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config(LAPTOP_CONFIG, [bad])


# trained_run: the session's shared small run (two folds of FAST, tests/conftest.py); read here, never changed.


@pytest.fixture(scope="module")
def archive(tmp_path_factory, synth_dir):
    root = tmp_path_factory.mktemp("archive")
    truth = generate_archive(root / "street" / "long.wav", minutes=2, bursts_per_minute=3, seed=5)
    wave, sr = sf.read(synth_dir / "Gun_Classifier" / pd.read_parquet(synth_dir / "train.pq")["image"][0])
    sf.write(root / "short.flac", wave[: sr // 2], sr)                      # shorter than a window
    sf.write(root / "clip.mp3", wave, sr, format="MP3")
    (root / "corrupt.wav").write_bytes(b"RIFF" + b"\x01" * 200)
    sf.write(root / "empty.wav", np.zeros((0, 1)), 48000)
    return root, truth


def test_inputs_inside_a_zip_are_listed_and_read_in_place(archive, tmp_path):
    from tests.conftest import zip_folder

    root, _ = archive
    zipped = zip_folder(root, tmp_path / "recordings.zip", prefix="")
    inputs = list_inputs(str(zipped)).files
    assert [u.rsplit("!/", 1)[1] for u in inputs] == ["clip.mp3", "corrupt.wav", "empty.wav", "short.flac",
                                                      "street/long.wav"]
    assert audio.info(inputs[-1]).duration == pytest.approx(120.0)


SLIDING = ["--set", "prediction.inference_chunk_method=Sliding", "--set", "scoring.hop_seconds=1.0",
           "--set", "scoring.read_seconds=20", "--set", "prediction.probability_threshold=0.0"]


@pytest.fixture(scope="module")
def scored_archive(trained_run, archive, tmp_path_factory):
    """The archive scored once by the job with SLIDING settings: its output folder and the exit status. Read by
    the tests below, never changed."""
    root, _ = archive
    out = tmp_path_factory.mktemp("scored-archive") / "scored"
    return out, main(["score", str(trained_run), str(root), str(out), *SLIDING])


@pytest.mark.ray
def test_every_file_once_with_status_windows_and_events(scored_archive, archive):
    root, truth = archive
    out, code = scored_archive
    assert code == 0  # every input accounted for; the unreadable ones as error rows
    files = pd.read_parquet(out / "files")
    assert sorted(files["file"]) == sorted(str(p) for p in root.rglob("*") if p.is_file())
    status = dict(zip(files["file"].map(lambda f: f.rsplit("/", 1)[-1]), files["status"], strict=True))
    assert status == {"long.wav": "ok", "short.flac": "ok", "clip.mp3": "ok", "corrupt.wav": "error",
                      "empty.wav": "error"}
    errors = files.set_index(files["file"].map(lambda f: f.rsplit("/", 1)[-1]))["error"]
    assert "unreadable" in errors["corrupt.wav"] and "empty" in errors["empty.wav"]
    windows = pd.read_parquet(out / "windows")
    long = windows[windows["file"].str.endswith("long.wav")].sort_values("start")
    np.testing.assert_allclose(long["start"], window_starts(120.0, 2.0, 1.0))  # chunk edges: once each
    probs = long[[c for c in long.columns if c.startswith("prob_")]].to_numpy()
    assert np.all((probs >= 0) & (probs <= 1))
    events = pd.read_parquet(out / "events")
    long_events = events[events["file"].str.endswith("long.wav")]
    hits = [np.abs(long_events["time"] - t).min() < 0.02 for t in truth["time"]]
    assert np.mean(hits) >= 0.7
    assert (long_events["rounds_per_minute"].dropna() > 0).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"] == 5 and summary["errors"] == 2 and summary["events"] == len(events)
    # One actor for the local Ray's two CPUs, scoring in two threads: the long file's chunks are shared out.
    assert (summary["scorer_actors"], summary["calls_per_actor"]) == (1, 2)
    row = files[files["file"].str.endswith("long.wav")].iloc[0]
    assert row["shots"] == len(long_events) and row["windows"] == len(long)


@pytest.mark.ray
def test_window_scorer_scores_any_number_of_windows_in_model_batches(trained_run):
    model = load_scoring_model(str(trained_run))
    waves = np.random.default_rng(0).normal(0, 0.1, (150, int(model.chunk_seconds * model.features.sample_rate)))
    batch = {"index": np.arange(150), "wave": waves.astype(np.float32)}
    scorer = WindowScorer(model, batch_size=64, mixed_precision=False)
    # On a CPU the model takes a few windows at a time; a GPU takes the whole batch.
    assert scorer.batch_size == (64 if scorer.device.type == "cuda" else CPU_MODEL_WINDOWS)
    split = scorer(dict(batch))
    with torch.inference_mode():  # all 150 windows in one call of the same model
        whole = scorer.model(torch.from_numpy(batch["wave"]).to(scorer.device)).float().cpu().numpy()
    assert split["probs"].shape == (150, len(model.classes)) and len(split["model_seconds"]) == 150
    np.testing.assert_allclose(split["probs"], whole, atol=1e-5)


@pytest.mark.ray
def test_default_scoring_reproduces_the_folds_validation_predictions(trained_run, tmp_path):
    # The job with the run's own settings (the seed's Fix method) must see what validation saw: same windows,
    # same features, same probabilities.
    manifest = pd.read_parquet(trained_run / "manifest.parquet")
    valid = pd.read_parquet(trained_run / "fold_0" / "valid_predictions.parquet").merge(manifest, on="row")
    clips = valid[np.isclose(valid["duration"], 2.0)]                # a file of exactly one training chunk
    assert len(clips) >= 10
    clips[["path"]].to_csv(tmp_path / "clips.csv", index=False)
    assert main(["score", str(trained_run / "fold_0"), str(tmp_path / "clips.csv"), str(tmp_path / "out"),
                 "--allow-outside"]) == 0  # the manifest names the dataset's files by absolute path
    files = pd.read_parquet(tmp_path / "out" / "files").set_index("file").loc[clips["path"]]
    assert (files["windows"] == 1).all()
    classes = [c.removeprefix("prob_") for c in valid.columns if c.startswith("prob_")]
    for c in classes:
        np.testing.assert_allclose(files[f"mean_{c}"].to_numpy(), clips[f"prob_{c}"].to_numpy(), atol=1e-4)


@pytest.mark.ray
def test_rerun_after_a_kill_skips_finished_files_and_keeps_each_once(trained_run, archive, tmp_path):
    root, _ = archive
    out = tmp_path / "scored"
    args = ["score", str(trained_run), str(root), str(out), "--set", "scoring.shard_files=2"]
    assert main(args) == 0  # its error rows (corrupt.wav, empty.wav) are results, not a failed job
    parts = sorted((out / "files").glob("*.parquet"))
    assert len(parts) == 3
    # What a kill during the last shard leaves: its windows and events written, its files part not.
    parts[-1].unlink()
    (out / "summary.json").unlink()
    assert main(args) == 0
    files = pd.read_parquet(out / "files")
    assert sorted(files["file"]) == sorted(str(p) for p in root.rglob("*") if p.is_file())  # each exactly once
    summary = json.loads((out / "summary.json").read_text())
    # The two committed ok files are kept; the two error rows (corrupt.wav, empty.wav) are scored again.
    assert summary["skipped_as_finished"] == 2 and summary["retried_errors"] == 2
    windows = pd.read_parquet(out / "windows")
    assert not windows.duplicated(["file", "start"]).any()


def test_predict_prints_classes_and_events_and_draws_a_timeline(trained_run, archive, tmp_path, capsys):
    root, _ = archive
    png = tmp_path / "timeline.png"
    assert main(["predict", str(trained_run / "fold_0"), str(root / "street" / "long.wav"), "--png", str(png),
                 "--set", "prediction.inference_chunk_method=Sliding"]) == 0
    out = capsys.readouterr().out
    assert "top class" in out and "shots" in out
    assert png.stat().st_size > 10_000


@pytest.mark.ray
def test_exported_pipeline_matches_the_ray_job_without_ray_or_the_repo(trained_run, archive, scored_archive,
                                                                       tmp_path):
    import subprocess
    import sys

    root, _ = archive
    assert main(["export", str(trained_run), str(tmp_path / "pipeline"), *SLIDING]) == 0
    files = [root / "street" / "long.wav", root / "clip.mp3", root / "short.flac", root / "corrupt.wav"]
    guard = Path(__file__).parent / "guard"  # its sitecustomize.py blocks imports of ray and gunsound
    result = subprocess.run([sys.executable, "score.py", *map(str, files), "--out", str(tmp_path / "exported")],
                            cwd=tmp_path / "pipeline", env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(guard)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr                # corrupt.wav is an error row, not a failure
    assert "error: " in result.stderr and "corrupt.wav: unreadable audio" in result.stderr
    assert "shots" in result.stdout
    exported = {t: pd.read_csv(tmp_path / "exported" / f"{t}.csv", keep_default_na=t != "files")
                for t in ("windows", "files", "events")}
    job_out, _ = scored_archive  # the job's output with the same settings: `main(["score", run, root, ...])`
    job = {t: pd.read_parquet(job_out / t) for t in ("windows", "files", "events")}
    job = {t: f[f["file"].isin(map(str, files))] for t, f in job.items()}

    merged = exported["windows"].merge(job["windows"], on=["file", "start"], suffixes=("_exported", "_job"))
    assert len(merged) == len(exported["windows"]) == len(job["windows"])
    classes = [c.removeprefix("prob_").removesuffix("_job") for c in merged.columns if c.endswith("_job")
               and c.startswith("prob_")]
    for c in classes:
        np.testing.assert_allclose(merged[f"prob_{c}_exported"], merged[f"prob_{c}_job"], atol=1e-4)

    per_file = exported["files"].merge(job["files"], on="file", suffixes=("_exported", "_job"))
    assert len(per_file) == 4
    for column in ("status", "windows", "top_class", "shots", "gunshot_windows"):
        assert list(per_file[f"{column}_exported"]) == list(per_file[f"{column}_job"]), column
    assert len(exported["events"]) == len(job["events"]) > 0            # the same shots, the same classes
    shots = [f.sort_values(["file", "time"]).reset_index(drop=True) for f in (exported["events"], job["events"])]
    np.testing.assert_allclose(shots[0]["time"], shots[1]["time"], atol=1e-4)
    assert list(shots[0]["class"]) == list(shots[1]["class"])
    assert list(shots[0]["burst"]) == list(shots[1]["burst"])


@pytest.mark.ray
def test_a_killed_scoring_job_run_again_ends_with_each_file_once(trained_run, archive, tmp_path):
    from tests.conftest import run_then_kill

    root, _ = archive
    out = tmp_path / "scored"
    args = [str(trained_run), str(root), str(out), "--set", "scoring.shard_files=1"]
    # Killed at its first commit: shards come out of the pipeline in bursts (three, then two, within a second
    # on 2 cores), so waiting for a second one could see the last burst land before the kill.
    run_then_kill(["ray_jobs.score", *args], lambda: len(list((out / "files").glob("*.parquet"))) >= 1,
                   tmp_path / "job.log")
    committed = len(list((out / "files").glob("*.parquet")))
    assert 1 <= committed < 5
    ok_before = int((pd.read_parquet(out / "files")["status"] == "ok").sum())
    assert main(["score", *args]) == 0  # the killed job's lease is recovered: its process is gone
    files = pd.read_parquet(out / "files")
    assert sorted(files["file"]) == sorted(str(p) for p in root.rglob("*") if p.is_file())
    assert json.loads((out / "summary.json").read_text())["skipped_as_finished"] >= ok_before
    assert not pd.read_parquet(out / "windows").duplicated(["file", "start"]).any()
