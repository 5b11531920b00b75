"""Many short files through the scoring job: read groups that mix files (error files among them), each file
committed exactly once with its own windows, and resume after a partial run."""

import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from gunsound import scoring, storage
from gunsound.cli import main
from gunsound.config import load_config
from gunsound.features import FeatureParams
from gunsound.inference import WindowScorer, load_scoring_model
from gunsound.model import ModelArtifact, build_model
from gunsound.scoring import plan_shards, predict_file, read_groups, scoring_config
from gunsound.windows import window_starts
from tests.conftest import FAST, LAPTOP_CONFIG

SAMPLE_RATE = 16000
# 1 s windows every 0.5 s; shards of 16 files; read groups of up to 32 windows, so one read call holds many files.
SETTINGS = ["prediction.inference_chunk_method=Sliding", "scoring.window_seconds=1.0", "scoring.hop_seconds=0.5",
            "scoring.shard_files=16", "scoring.batch_size=32"]
ARGS = [a for kv in SETTINGS for a in ("--set", kv)]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    cfg = load_config(LAPTOP_CONFIG, FAST)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    ModelArtifact(classes=["a", "b", "c"], features=FeatureParams.from_config(cfg.audio, sample_rate=SAMPLE_RATE),
                  chunk_seconds=1.0, architecture=cfg.architecture, loss_function="BCE",
                  state_dict=build_model(cfg.architecture, 3, pretrained=False).state_dict()).save(str(path))
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """300 clips of 0.3 to 2 s (noise with a click or two, so files differ), a corrupt and a truncated file
    named to sort among them, and a text file."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(11)
    durations = {}
    for i in range(300):
        seconds = float(rng.uniform(0.3, 2.0))
        wave = rng.normal(0, 0.02, int(seconds * SAMPLE_RATE))
        for t in rng.uniform(0, seconds, rng.integers(1, 3)):
            at = int(t * SAMPLE_RATE)
            wave[at:at + 400] += rng.normal(0, 0.5, len(wave[at:at + 400]))
        path = root / f"clip{i:03d}.wav"
        sf.write(path, np.clip(wave, -1, 1), SAMPLE_RATE, subtype="PCM_16")
        durations[str(path)] = sf.info(path).duration
    (root / "clip050x_corrupt.wav").write_bytes(b"RIFF" + b"\x01" * 300)
    whole = (root / "clip120.wav").read_bytes()
    (root / "clip120x_truncated.wav").write_bytes(whole[: len(whole) // 2])
    (root / "clip200x_notes.txt").write_text("not audio")
    errors = {str(root / "clip050x_corrupt.wav"), str(root / "clip120x_truncated.wav")}
    return root, durations, errors


def test_a_read_group_mixes_files_and_keeps_each_files_windows_its_own(model_file, clips):
    root, durations, errors = clips
    paths = sorted([*durations, *errors])[40:80]  # clip040 to clip077, the corrupt file among them
    planned = plan_shards({"shard": np.array([3]), "part": np.array([0]), "parts": np.array([1]),
                           "paths": np.array([np.array(paths, dtype=object)], dtype=object)},
                          window_seconds=1.0, hop_seconds=0.5, read_seconds=60.0, batch_windows=32,
                          s3=storage.current_settings())
    groups = [json.loads(g) for g in planned["chunks"]]
    assert all(len({c["path"] for c in g}) > 5 for g in groups[:-1])  # full groups hold many files
    assert [c["path"] for g in groups for c in g] == paths  # each file once, in order
    expected_rows = sum(len(window_starts(durations[p], 1.0, 0.5)) if p in durations else 1 for p in paths)
    assert set(planned["shard_rows"]) == {expected_rows} and set(planned["shard"]) == {3}

    model = load_scoring_model(str(model_file))
    scorer = WindowScorer(model, batch_size=32)
    scored = [scorer(read_groups({k: v[[i]] for k, v in planned.items()}, sample_rate=SAMPLE_RATE,
                                 window_seconds=1.0, onset_detection=True, onset_threshold_db=12.0,
                                 s3=storage.current_settings())) for i in range(len(groups))]
    rows = {k: np.concatenate([b[k] for b in scored]) for k in ("path", "index", "probs", "error")}
    assert len(rows["path"]) == expected_rows
    mixed_error = [p for p in errors if p in paths]
    assert mixed_error  # an error file sits inside a group of ok files: one row, its error, no probabilities
    for p in mixed_error:
        mine = rows["path"] == p
        assert mine.sum() == 1 and rows["index"][mine][0] == -1 and rows["error"][mine][0]
        assert np.isnan(rows["probs"][mine]).all()
    cfg = scoring_config(str(model_file), SETTINGS)
    for p in [q for q in paths if q in durations][:6]:
        _, _, alone = predict_file(model, p, cfg)  # the file scored by itself, its windows in a batch of their own
        mine = rows["path"] == p
        np.testing.assert_array_equal(rows["index"][mine], alone["index"])
        np.testing.assert_allclose(rows["probs"][mine], np.stack(alone["probs"]), atol=1e-5)


@pytest.mark.parametrize("given", [True, False])
def test_planning_reads_headers_only_where_the_unit_does_not_carry_them(tmp_path, given):
    """A small run reads their headers in the driver (to size the pool) and hands them to
    the planners, which must not read them again (on S3, a GET per planning part)."""
    path = str(tmp_path / "elsewhere.wav")  # no such file: only a header from the unit lets it be planned
    unit = {"shard": np.array([0]), "part": np.array([0]), "parts": np.array([1]),
            "paths": np.array([np.array([path], dtype=object)], dtype=object)}
    if given:
        unit["headers"] = np.array([json.dumps({path: [3.0, ""]})], dtype=object)
    planned = plan_shards(unit, window_seconds=1.0, hop_seconds=0.5, read_seconds=60.0, batch_windows=32,
                          s3=storage.current_settings())
    (group,) = [json.loads(g) for g in planned["chunks"]]
    if given:
        assert group[0]["starts"] == list(window_starts(3.0, 1.0, 0.5)) and "error" not in group[0]
        assert planned["shard_rows"][0] == len(window_starts(3.0, 1.0, 0.5))
    else:
        assert group[0]["starts"] == [] and group[0]["error"] and planned["shard_rows"][0] == 1


@pytest.mark.ray
def test_many_short_files_each_committed_once_and_a_partial_run_resumed(ray_local, model_file, clips, tmp_path):
    root, durations, errors = clips
    out = tmp_path / "scored"
    assert main(["score", str(model_file), str(root), str(out), *ARGS]) == 0
    files = pd.read_parquet(out / "files")
    every = {*durations, *errors, str(root / "clip200x_notes.txt")}
    assert files["file"].is_unique and set(files["file"]) == every
    status = dict(zip(files["file"], files["status"], strict=True))
    assert {p for p, s in status.items() if s == "error"} == errors
    assert status[str(root / "clip200x_notes.txt")] == "skipped"
    windows = pd.read_parquet(out / "windows")
    assert not windows.duplicated(["file", "start"]).any() and not set(windows["file"]) & errors
    counts = windows.groupby("file").size()
    assert all(counts[p] == len(window_starts(d, 1.0, 0.5)) for p, d in durations.items())
    assert len(list((out / "files").glob("*.parquet"))) == 19 + 1  # 302 files in shards of 16, the skipped part

    # Windows in the tables are each file's own: as the file scored by itself in this process.
    model = load_scoring_model(str(model_file))
    cfg = scoring_config(str(model_file), SETTINGS)
    for p in sorted(durations)[::60]:
        _, _, alone = predict_file(model, p, cfg)
        mine = windows[windows["file"] == p].sort_values("start")
        np.testing.assert_allclose(mine["start"], alone["start"])
        np.testing.assert_allclose(mine[["prob_a", "prob_b", "prob_c"]].to_numpy(), np.stack(alone["probs"]),
                                   atol=1e-5)

    # What a kill leaves: some shards committed, others with windows/ and events/ parts but no files/ part.
    parts = sorted((out / "files").glob("part-*-0*.parquet"))
    lost = parts[3:9]
    lost_files = set(pd.concat([pd.read_parquet(p) for p in lost])["file"])
    kept = pd.concat([pd.read_parquet(p) for p in parts if p not in lost])
    for p in lost:
        p.unlink()
    (out / "summary.json").unlink()
    assert main(["score", str(model_file), str(root), str(out), *ARGS]) == 0
    again = pd.read_parquet(out / "files")
    assert again["file"].is_unique and set(again["file"]) == every
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_as_finished"] == int((kept["status"] == "ok").sum())  # kept; error rows retried
    assert summary["retried_errors"] == int((kept["status"] == "error").sum())
    assert summary["files"] == len(every) - 1 and summary["errors"] == 2 and summary["skipped_entries"] == 1
    windows = pd.read_parquet(out / "windows")
    assert not windows.duplicated(["file", "start"]).any()
    assert set(windows["file"]) == set(durations) and lost_files


@pytest.mark.ray
def test_the_listing_is_cut_into_shards_page_by_page_and_only_the_first_stay_in_the_driver(ray_local,
                                                                                          monkeypatch):
    import ray

    monkeypatch.setattr(scoring, "SMALL_BLOCKS", 2)  # past two blocks of one shard, blocks of eight
    names = [f"s3://b/p/f{i:03d}.wav" for i in range(60)]
    pages = [[(n, "") for n in names[i:i + 7]] + ([(f"s3://b/p/n{i}.txt", "not audio")] if i % 14 == 0 else [])
             for i in range(0, 60, 7)]
    consumed, committed = [], {}

    def listed_pages():
        for page in pages:
            consumed.append(len(page))
            yield page

    done = {names[4], names[5], "s3://b/p/n0.txt"}
    listed = scoring._list_shards(listed_pages(), done=done, retry={names[7], "s3://b/p/gone.wav"}, shard_files=3,
                                  hold=2, skipped=lambda entries, part: committed.update({part: entries}))
    todo = [n for n in names if n not in done]
    shards = [todo[i:i + 3] for i in range(0, len(todo), 3)]
    assert listed.held == shards[:2] and (listed.shards, listed.files, listed.finished) == (len(shards), 60, 2)
    assert listed.skipped == 5 and set(committed[0]) == {f"s3://b/p/n{i}.txt" for i in (14, 28, 42, 56)}
    assert list(committed) == [0] and listed.retried == {names[7]}  # a file listed again; one no longer listed
    tables = [ray.get(ref) for ref in listed.blocks]
    assert [t.num_rows for t in tables] == [1, 1, 8, 8] and len(consumed) == len(pages)
    rows = [row for t in tables for row in t.to_pylist()]
    assert [r["shard"] for r in rows] == list(range(2, len(shards)))
    assert [r["paths"] for r in rows] == shards[2:] and {(r["part"], r["parts"], r["headers"]) for r in rows} == {
        (0, 1, "")}


@pytest.mark.ray
def test_an_s3_prefix_listed_over_several_pages_is_scored_once_per_file_and_resumed(ray_local, s3_server, model_file,
                                                                                   clips, tmp_path, monkeypatch):
    import boto3

    root, durations, errors = clips
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="gunsound-many")
    names = sorted(durations)[:21] + sorted(errors) + [str(root / "clip200x_notes.txt")]
    for name in names:
        client.upload_file(name, "gunsound-many", "archive/" + name.rsplit("/", 1)[-1])
    monkeypatch.setattr(storage, "LIST_PAGE_ENTRIES", 5)  # 24 keys: five ListObjectsV2 pages
    args = ["score", str(model_file), "s3://gunsound-many/archive", str(tmp_path / "out"), *ARGS, "--set",
            "scoring.shard_files=4", "--set", f"storage.endpoint_url={s3_server}"]
    assert main(args) == 0
    files = pd.read_parquet(tmp_path / "out" / "files")
    expected = {"s3://gunsound-many/archive/" + n.rsplit("/", 1)[-1] for n in names}
    assert files["file"].is_unique and set(files["file"]) == expected
    status = files.set_index("file")["status"]
    assert (status == "skipped").sum() == 1 and (status == "error").sum() == 2 and (status == "ok").sum() == 21
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["files"], summary["files_ok"], summary["skipped_entries"]) == (23, 21, 1)
    assert main(args) == 0  # again: every file finished, the two errors tried again
    again = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (again["files"], again["skipped_as_finished"], again["retried_errors"]) == (23, 21, 2)
    assert pd.read_parquet(tmp_path / "out" / "files")["file"].is_unique


@pytest.mark.ray
def test_an_output_inside_the_input_folder_is_not_listed_as_input(ray_local, model_file, clips, tmp_path):
    import shutil

    root, durations, _ = clips
    for path in sorted(durations)[:3]:
        shutil.copy(path, tmp_path)
    out = tmp_path / "scores"
    for _ in range(2):  # the second run lists the first run's parts under the input
        assert main(["score", str(model_file), str(tmp_path), str(out), *ARGS]) == 0
    files = pd.read_parquet(out / "files")
    assert sorted(files["file"]) == sorted(str(tmp_path / p.rsplit("/", 1)[-1]) for p in sorted(durations)[:3])
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["files"], summary["skipped_as_finished"], summary["skipped_entries"]) == (3, 3, 0)


@pytest.mark.parametrize(("scorers", "shards", "parts"), [(2, 1, 2), (8, 1, 8), (16, 1, 8), (8, 3, 3), (2, 10, 1),
                                                          (64, 39_063, 1)])
def test_a_shard_is_split_among_scorers_only_when_there_are_fewer_shards_than_scorers(scorers, shards, parts):
    # Each part reads its shard's headers again: a large archive must read every header once.
    assert scoring._planning_parts(scorers, shards) == parts


@pytest.mark.parametrize(("files", "actors", "pool", "headers_read"), [
    (10, 3, 1, True),     # a few short files: one read group, one scorer
    (60, 3, 3, True),     # more groups than scorers: every scorer
    (60, 40, 4, True),    # fewer groups than a large cluster's scorers: as many as there are groups
    (300, 3, 3, False),   # more files than the driver reads headers for: every scorer, no header read
])
def test_a_small_run_starts_only_the_scorers_its_read_groups_need(model_file, clips, files, actors, pool,
                                                                   headers_read):
    root, durations, _ = clips
    todo = sorted(durations)[:files]
    s = scoring.ScoringSettings.from_config(scoring_config(str(model_file), SETTINGS), model_chunk_seconds=1.0)
    size, headers = scoring._pool_size(todo, actors, s)
    assert size == pool and bool(headers) == headers_read
    if headers_read:
        assert headers == scoring.read_headers(todo)


def test_one_long_file_gets_every_scorer(model_file, tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, np.random.default_rng(0).normal(0, 0.05, 300 * SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")
    s = scoring.ScoringSettings.from_config(scoring_config(str(model_file), SETTINGS), model_chunk_seconds=1.0)
    assert scoring._pool_size([str(path)], 4, s)[0] == 4
