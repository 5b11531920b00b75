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


@pytest.fixture(scope="module")
def odd(resumable) -> SimpleNamespace:
    """Files the job and the exported scorer must row alike: a recording, one shorter than a window, one
    without samples, one that is no audio, one whose samples are NaN, and one that is not there."""
    folder = resumable.audio.parent / "odd"
    folder.mkdir()
    rng = np.random.default_rng(1)
    sf.write(folder / "ok.wav", rng.normal(0, 0.1, 16000 * 3).astype(np.float32), 16000)
    sf.write(folder / "short.wav", rng.normal(0, 0.1, 1600).astype(np.float32), 16000)
    sf.write(folder / "empty.wav", np.zeros((0, 1), np.float32), 16000)
    (folder / "notaudio.wav").write_bytes(b"hello")
    wave = np.zeros(16000 * 3, np.float32)
    wave[1000] = np.nan
    sf.write(folder / "nan.wav", wave, 16000, subtype="FLOAT")
    names = ["ok.wav", "short.wav", "empty.wav", "notaudio.wav", "nan.wav", "missing.wav"]
    return SimpleNamespace(folder=folder, files=[str(folder / n) for n in names],
                           model=str(resumable.pipeline.parent / "model.pt"))


def job_files_rows(model_path: str, files: list[str], out: Path) -> pd.DataFrame:
    """The files/ rows the scoring job commits for `files`: its own stages (plan_shards, read_groups, the window
    scorer, ShardCommitter) run in this process, without Ray."""
    from gunsound import storage
    from gunsound.inference import WindowScorer
    from gunsound.scoring import ScoringSettings, plan_shards, read_groups
    from gunsound.shards import ShardCommitter

    model = load_scoring_model(model_path)
    s = ScoringSettings.from_config(scoring_config(model_path, SETTINGS), model_chunk_seconds=model.chunk_seconds)
    s3 = storage.current_settings()
    paths = np.empty(1, dtype=object)
    paths[0] = files
    groups = plan_shards({"shard": np.array([0]), "part": np.array([0]), "parts": np.array([1]), "paths": paths},
                         window_seconds=s.window_seconds, hop_seconds=s.hop_seconds, read_seconds=s.read_seconds,
                         batch_windows=s.batch_size, s3=s3)
    scorer = WindowScorer(model, mixed_precision=False, batch_size=s.batch_size)
    committer = ShardCommitter(str(out), "local", model.classes, shards=1, window_seconds=s.window_seconds,
                               method=s.method, threshold=s.threshold)
    for i in range(len(groups["chunks"])):
        scored = scorer(read_groups({k: v[i:i + 1] for k, v in groups.items()}, sample_rate=model.features.sample_rate,
                                    window_seconds=s.window_seconds, onset_detection=s.onset_detection,
                                    onset_threshold_db=s.onset_threshold_db, s3=s3))
        for k in ("model_seconds", "device", "scorer"):
            scored.pop(k)
        committer.add(scored)
    committer.finish()
    return pd.read_parquet(out / "files").set_index("file")


def test_exported_and_predict_rows_are_the_jobs_for_short_empty_unreadable_and_missing_files(resumable, odd,
                                                                                            tmp_path):
    """Error rows had a made-up 0 s duration (the job: the header's, NaN where it could not be read), a short
    file lacked the job's note, and a missing file said only 'System error.'."""
    job = job_files_rows(odd.model, odd.files, tmp_path / "job")
    result = score_into(resumable, tmp_path / "exported", *odd.files)
    assert result.returncode == 0, result.stderr
    exported = pd.read_csv(tmp_path / "exported" / "files.csv", keep_default_na=False,
                           na_values={"duration": [""]}).set_index("file")
    model, cfg = load_scoring_model(odd.model), scoring_config(odd.model, SETTINGS)
    predicted = pd.DataFrame([predict_file(model, f, cfg)[0] for f in odd.files]).set_index("file")
    assert job.loc[odd.files[1], "note"] == "shorter than a window (0.10 s < 1 s): zero-padded"
    for f in odd.files:
        want = job.loc[f]
        for got in (exported.loc[f], predicted.loc[f]):
            assert got["status"] == want["status"], f
            np.testing.assert_equal(float(got["duration"]), float(want["duration"]), err_msg=f)
            assert got["note"] == want["note"], f
            if f.endswith("missing.wav"):  # the job's reader (pyarrow) words it its own way
                assert "No such file or directory" in want["error"] and "No such file or directory" in got["error"]
            else:
                assert got["error"] == want["error"], f
            assert int(got["windows"]) == int(want["windows"]), f
    assert f"error: {odd.files[-1]}: unreadable audio: [Errno 2] No such file or directory" in result.stderr


def test_predict_reports_an_empty_file_as_the_job_does(odd, capsys):
    """A file of no samples crashed predict with KeyError: 'error'."""
    from gunsound.cli import main

    empty = odd.files[2]
    row, events, windows = predict_file(load_scoring_model(odd.model), empty, scoring_config(odd.model, SETTINGS))
    assert (row["status"], row["error"], row["duration"], row["windows"]) == ("error", "empty: no samples", 0.0, 0)
    assert events == [] and len(windows) == 0
    assert main(["predict", odd.model, empty, *(a for s in SETTINGS for a in ("--set", s))]) == 2
    assert f"error: {empty}: empty: no samples" in capsys.readouterr().err


def test_exported_scorer_strict_counts_the_error_rows_committed_before(resumable, odd, tmp_path):
    """A rerun with --strict exited 0 although files.csv held an error row of a listed file."""
    notaudio, short = odd.files[3], odd.files[1]
    first = score_into(resumable, tmp_path / "out", notaudio, short, "--strict")
    assert first.returncode == 3, first.stderr
    again = score_into(resumable, tmp_path / "out", notaudio, short, "--strict")
    assert (again.returncode, again.stdout) == (3, ""), again.stderr  # nothing scored again, the error still there
    other = score_into(resumable, tmp_path / "out", short, "--strict")
    assert other.returncode == 0, other.stderr  # an error row of a file not listed is not this run's


def test_exported_scorer_scores_a_file_whose_name_is_not_utf8(resumable, odd, tmp_path):
    """A valid WAV named in latin-1 was 'unreadable audio: UnicodeEncodeError', and writing its row then ended
    the run (exit 1) before the files after it, on every rerun."""
    latin = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.wav")  # the name as Python gets it from argv
    Path(latin).write_bytes(Path(odd.files[0]).read_bytes())
    out = tmp_path / "out"
    result = score_into(resumable, out, latin, odd.files[0])
    assert result.returncode == 0, result.stderr
    shown = f"{tmp_path}/caf\\xe9.wav"  # the byte that is not UTF-8 written as \xNN: the tables stay UTF-8
    assert result.stdout.startswith(f"{shown}: 3.0 s")
    files = pd.read_csv(out / "files.csv", keep_default_na=False)
    assert list(files["file"]) == [shown, odd.files[0]] and list(files["status"]) == ["ok", "ok"]
    windows = pd.read_csv(out / "windows.csv")
    assert (windows["file"] == shown).sum() == (windows["file"] == odd.files[0]).sum() == 3
    again = score_into(resumable, out, latin, odd.files[0])
    assert (again.returncode, again.stdout) == (0, ""), again.stderr  # both committed: neither scored again


def test_exported_scorer_goes_on_after_a_file_whose_rows_cannot_be_written(resumable, odd, tmp_path):
    """A file whose rows fail to be written (here: past a file size limit) leaves none of them, and the files
    after it are scored and committed; the run says so and exits 1, and a rerun scores that file."""
    import resource

    long = tmp_path / "long.wav"
    sf.write(long, np.random.default_rng(2).normal(0, 0.1, 16000 * 40).astype(np.float32), 16000)
    out = tmp_path / "out"
    limit = 3000  # bytes per file: the long file's 40 windows do not fit in windows.csv, one window does

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, str(resumable.pipeline / "score.py"), str(long), odd.files[1],
                             "--out", str(out)], env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(GUARD)},
                            preexec_fn=limited, capture_output=True, text=True, timeout=240)
    assert result.returncode == 1, result.stderr
    assert f"error: {long}: its rows could not be written" in result.stderr
    assert list(pd.read_csv(out / "files.csv")["file"]) == [odd.files[1]]
    assert set(pd.read_csv(out / "windows.csv")["file"]) == {odd.files[1]}  # none of the long file's rows
    rerun = score_into(resumable, out, str(long), odd.files[1])
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.startswith(f"{long}: 40.0 s")
    assert_whole_rows_once(out, [str(long), odd.files[1]])
    assert (pd.read_csv(out / "windows.csv")["file"] == str(long)).sum() == 40
