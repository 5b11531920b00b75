"""A corpus of odd and broken inputs, made here, scored through the job's listing, header reader and chunk
reader (no Ray): every entry under the input is accounted for exactly once, as "ok", "error: <reason>" or
"skipped: <reason>", and no read of one file fails the task. Scoring manifests are checked as training's are."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from gunsound import scoring, storage
from gunsound.cli import main
from gunsound.config import load_config
from gunsound.features import FeatureParams
from gunsound.inputs import InputManifestError, list_inputs
from gunsound.model import ModelArtifact, build_model
from gunsound.shards import SKIPPED, WINDOW_COLUMNS, commit_shard, resume
from tests.conftest import FAST, LAPTOP_CONFIG

SETTINGS = scoring.ScoringSettings(method="Sliding", window_seconds=1.0, hop_seconds=1.0, read_seconds=600.0,
                                   threshold=0.5)
SAMPLE_RATE = 8000  # the model's rate: most files are resampled


def tone(sr: int, seconds: float = 1.0, channels: int = 1) -> np.ndarray:
    mono = 0.5 * np.sin(2 * np.pi * 440.0 * np.arange(int(round(sr * seconds))) / sr)
    return mono if channels == 1 else np.repeat(mono[:, None], channels, axis=1)


def encoded(data: np.ndarray, sr: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    out = io.BytesIO()
    sf.write(out, data, sr, format=fmt, subtype=subtype)
    return out.getvalue()


def with_sample_rate(wav: bytes, rate: int) -> bytes:
    data = bytearray(wav)
    at = data.find(b"fmt ") + 12  # the fmt chunk's sample rate field
    data[at:at + 4] = struct.pack("<I", rate)
    return bytes(data)


def with_data_size(wav: bytes, size: int, riff_size: int | None = None) -> bytes:
    data = bytearray(wav)
    at = data.find(b"data") + 4
    data[at:at + 4] = struct.pack("<I", size)
    if riff_size is not None:
        data[4:8] = struct.pack("<I", riff_size)
    return bytes(data)


def sparse_wav(path: Path, sr: int, seconds: float) -> None:
    """An 8-bit WAV of `seconds` whose data are zeros the filesystem does not store."""
    head = with_data_size(encoded(np.zeros(1), sr, subtype="PCM_U8"), 0)
    at = head.find(b"data")
    size = int(sr * seconds)
    with open(path, "wb") as f:
        f.write(with_data_size(head[:at + 8], size, riff_size=at + size))
        f.truncate(at + 8 + size)


def build_corpus(root: Path) -> dict[str, str]:
    """The corpus under `root`; returns each entry's expected status ("ok", or how "error: ..." and
    "skipped: ..." begin)."""
    expect: dict[str, str] = {}

    def put(name: str, data: bytes, status: str) -> None:
        (root / name).write_bytes(data)
        expect[name] = status

    bad_rate = "error: unsupported header: sample rate"
    put("pcm16_16k.wav", encoded(tone(16000), 16000), "ok")
    put("stereo_44k1.wav", encoded(tone(44100, channels=2), 44100), "ok")
    put("rate_44101.wav", encoded(tone(44101), 44101), "ok")  # torchaudio's kernel for it wanted 16.9 GB
    put("rate_768k.wav", encoded(tone(768000, 0.05), 768000), "ok")
    quarter = encoded(tone(16000, 0.25), 16000)
    put("rate_1hz.wav", with_sample_rate(quarter, 1), f"{bad_rate} 1 Hz")  # 4,000 samples would be 4,000 s
    put("rate_999hz.wav", with_sample_rate(quarter, 999), f"{bad_rate} 999 Hz")
    put("rate_800k.wav", with_sample_rate(quarter, 800_000), f"{bad_rate} 800000 Hz")
    put("rate_0hz.wav", with_sample_rate(quarter, 0), "error: unreadable audio")
    for ext, fmt, subtype in [("wav", "WAV", "PCM_16"), ("ogg", "OGG", "VORBIS"), ("mp3", "MP3", "MPEG_LAYER_III"),
                              ("flac", "FLAC", "PCM_16"), ("aiff", "AIFF", "PCM_16"), ("au", "AU", "PCM_16")]:
        whole = encoded(tone(16000, 5.0, channels=2), 16000, fmt, subtype)
        # An MP3's header holds no byte count: its cut shows when the frames decoded fall short of the header's
        # count. A FLAC cut short loses its decoder's sync where it ends: an error, in libFLAC's words.
        put(f"truncated.{ext}", whole[:len(whole) * 6 // 10],
            "error: decode failed:" if ext in ("mp3", "flac") else "error: truncated")
    put("header_claims_2h.wav", with_data_size(encoded(tone(8000), 8000), 8000 * 2 * 7200), "error: truncated")
    nan, inf = tone(16000), tone(16000)
    nan[500], inf[500] = np.nan, np.inf
    put("nan.wav", encoded(nan, 16000, subtype="FLOAT"), "error: decode failed:")
    put("inf.wav", encoded(inf, 16000, subtype="FLOAT"), "error: decode failed:")
    put("ch8.wav", encoded(tone(16000, channels=8), 16000), "ok")
    put("ch64.wav", encoded(tone(8000, 0.5, channels=64), 8000), "ok")
    put("ch65.wav", encoded(tone(8000, 0.5, channels=65), 8000), "error: unsupported header: 65 channels")
    sparse_wav(root / "claims_25h.wav", 1000, 25 * 3600)
    expect["claims_25h.wav"] = "error: unsupported header: 25.0 h long"
    sparse_wav(root / "long_2h.wav", 1000, 2 * 3600)
    expect["long_2h.wav"] = "ok"
    put("zero_bytes.wav", b"", "error: unreadable audio")
    put("header_only.wav", encoded(np.zeros((0, 1)), 16000), "error: empty")
    put("text.wav", b"this is not audio\n" * 50, "error: unreadable audio")
    # In a local folder (or a zip) an extensionless file is a README far more often than audio; S3 keys, which
    # often have no extension, are tried (tests/test_inputs.py).
    put("no_extension", encoded(tone(16000), 16000), "skipped: no extension")
    put("no_extension_text", b"not audio either", "skipped: no extension")
    (root / "folder.wav").mkdir()
    expect["folder.wav"] = "skipped: a folder named like an audio file"
    os.symlink(root / "gone.wav", root / "broken_link.wav")
    expect["broken_link.wav"] = "skipped: not a readable file"
    put("clip.aiff", encoded(tone(22050), 22050, "AIFF"), "ok")
    put("clip.aif", encoded(tone(22050), 22050, "AIFF"), "ok")
    put("clip.au", encoded(tone(8000), 8000, "AU", "ULAW"), "ok")
    put("clip.m4a", b"\x00\x00\x00\x20ftypM4A " + bytes(200), "skipped: not an audio format libsndfile reads (.m4a)")
    put("clip.wv", b"wvpk" + bytes(200), "skipped: not an audio format libsndfile reads (.wv)")
    put("notes.txt", b"recorded on a tuesday\n", "skipped: not an audio format libsndfile reads (.txt)")
    for name in ("with space.wav", "ünïcode_枪.wav", "=cmd.wav", "-leading-dash.wav", "new\nline.wav", "UPPER.WAV"):
        put(name, encoded(tone(16000, 0.5), 16000), "ok")
    for subtype in ("PCM_U8", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW"):
        put(f"depth_{subtype.lower()}.wav", encoded(tone(16000, 0.5), 16000, subtype=subtype), "ok")
    put("one_sample.wav", encoded(np.array([0.25]), 16000), "ok")
    put("silence.wav", encoded(np.zeros(16000), 16000), "ok")
    put("clipping.wav", encoded(np.sign(tone(16000)) * 1.5, 16000, subtype="FLOAT"), "ok")
    put("shorter_than_a_window.wav", encoded(tone(16000, 0.1), 16000), "ok")
    put("ok.flac", encoded(tone(48000, channels=2), 48000, "FLAC", "PCM_24"), "ok")
    put("ok.ogg", encoded(tone(44100), 44100, "OGG", "VORBIS"), "ok")
    put("ok.mp3", encoded(tone(44100), 44100, "MP3", "MPEG_LAYER_III"), "ok")
    put("ok.opus", encoded(tone(48000), 48000, "OGG", "OPUS"), "ok")
    # Sizes a streaming writer leaves unknown, junk after the data, a container size left stale by an editor.
    put("streamed.wav", with_data_size(encoded(tone(16000), 16000), 0xFFFFFFFF, 0xFFFFFFFF), "ok")
    put("trailing_junk.wav", encoded(tone(16000), 16000) + b"JUNK" * 100, "ok")
    stale = encoded(tone(16000), 16000)
    put("stale_riff_size.wav", with_data_size(stale, len(stale) - 44, riff_size=len(stale) + 500), "ok")
    return expect


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("bad inputs")
    return root, build_corpus(root)


def account(location: str) -> dict[str, str]:
    """Each entry's status as the scoring job gives it: listing, headers, then every chunk read."""
    inputs = list_inputs(location)
    assert len(set(inputs.files)) == len(inputs.files) and not set(inputs.files) & set(inputs.skipped)
    status = {path: f"{SKIPPED}{why}" for path, why in inputs.skipped.items()}
    headers = scoring.read_headers(inputs.files)
    for path in inputs.files:
        duration, error = headers[path]
        if error:
            status[path] = f"error: {error}"
            continue
        errors = []
        for chunk in SETTINGS.plan(path, duration):
            batch = {k: np.array([v], dtype=object) for k, v in chunk.items()}
            cut = scoring.read_chunks(batch, sample_rate=SAMPLE_RATE, window_seconds=SETTINGS.window_seconds,
                                      onset_detection=True, onset_threshold_db=12.0, s3=storage.current_settings())
            assert cut["wave"].shape == (len(chunk["starts"]), SAMPLE_RATE) and np.isfinite(cut["wave"]).all()
            errors += [e for e in cut["error"] if e]
        status[path] = f"error: decode failed: {errors[0]}" if errors else "ok"
    return status


@pytest.fixture(scope="module")
def statuses(corpus) -> dict[str, str]:
    return account(str(corpus[0]))


def test_every_entry_is_accounted_for_once_with_its_expected_status(corpus, statuses):
    root, expect = corpus
    assert len(expect) >= 30
    status = statuses
    entries = sorted(str(p) for p in root.iterdir())  # files, the folder named like audio, the broken link
    assert sorted(status) == entries  # none missing, none twice
    wrong = {Path(p).name: s for p, s in status.items()
             if not (s == "ok" if expect[Path(p).name] == "ok" else s.startswith(expect[Path(p).name]))}
    assert wrong == {}, "\n".join(f"{n!r}: {s} (expected {expect[n]})" for n, s in wrong.items())


def test_errors_name_the_file_and_never_a_file_object(statuses):
    for path, text in statuses.items():
        assert "NativeFile" not in text and "<" not in text, text
        if text.startswith("error: decode failed:"):  # a chunk's error keeps the file's name
            assert path in text


def test_truncated_files_are_flagged_alike_in_every_format(corpus, statuses):
    root, _ = corpus
    for ext in ("wav", "ogg", "mp3", "aiff", "au"):
        assert "truncated" in statuses[str(root / f"truncated.{ext}")]
    assert "flac decoder lost sync" in statuses[str(root / "truncated.flac")]


def test_a_zip_of_the_corpus_lists_the_same_files(corpus, tmp_path):
    import zipfile

    root, expect = corpus
    archive = tmp_path / "corpus.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in root.iterdir():
            if path.is_file() and path.stat().st_size < 1 << 20:  # the sparse files stay out
                zf.write(path, path.name)
    status = account(str(archive))
    names = {u.rsplit("!/", 1)[1]: s for u, s in status.items()}
    assert set(names) == {p.name for p in root.iterdir() if p.is_file() and p.stat().st_size < 1 << 20}
    for name, s in names.items():
        assert (s == "ok") if expect[name] == "ok" else s.startswith(expect[name]), (name, s)


def test_skipped_entries_are_committed_as_skipped_rows_and_not_retried(corpus, tmp_path):
    root, _ = corpus
    inputs = list_inputs(str(root))
    out = str(tmp_path / "out")
    skipped = {p: (float("nan"), f"{SKIPPED}{why}") for p, why in inputs.skipped.items()}
    commit_shard(out, "part-test-skipped.parquet", list(skipped), skipped, pd.DataFrame(columns=WINDOW_COLUMNS),
                 ["a", "b"], window_seconds=1.0, method="Sliding", threshold=0.5)
    files = pd.read_parquet(tmp_path / "out" / "files")
    assert sorted(files["file"]) == sorted(inputs.skipped) and (files["status"] == "skipped").all()
    assert files.set_index("file").loc[str(root / "clip.m4a"), "error"].startswith("skipped: not an audio format")
    earlier = resume(out, inputs.files + list(inputs.skipped))
    assert earlier.done == set(inputs.skipped) and not earlier.retried


@pytest.mark.ray
def test_the_scoring_job_accounts_for_every_entry_once_and_exits_0(ray_local, corpus, statuses, tmp_path):
    root, _ = corpus
    inputs = tmp_path / "inputs"  # the corpus but its two-hour file (minutes of CPU for nothing new)
    shutil.copytree(root, inputs, symlinks=True, ignore=shutil.ignore_patterns("long_2h.wav"))
    expected = {str(inputs / Path(p).name): s.split(":", 1)[0] for p, s in statuses.items()
                if Path(p).name != "long_2h.wav"}
    cfg = load_config(LAPTOP_CONFIG, FAST)
    ModelArtifact(classes=["a", "b"], features=FeatureParams.from_config(cfg.audio, sample_rate=SAMPLE_RATE),
                  chunk_seconds=1.0, architecture=cfg.architecture, loss_function="BCE",
                  state_dict=build_model(cfg.architecture, 2, pretrained=False).state_dict(),
                  ).save(str(tmp_path / "model.pt"))
    out = tmp_path / "out"
    settings = ["prediction.inference_chunk_method=Sliding", "scoring.hop_seconds=1.0", "scoring.shard_files=8"]
    assert main(["score", str(tmp_path / "model.pt"), str(inputs), str(out),
                 *[a for kv in settings for a in ("--set", kv)]]) == 0  # error rows are accounted for: exit 0
    files = pd.read_parquet(out / "files")
    assert files["file"].is_unique and set(files["file"]) == set(expected)  # none missing, none twice
    assert dict(zip(files["file"], files["status"], strict=True)) == expected
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_entries"] == sum(s == "skipped" for s in expected.values())
    assert summary["files_ok"] == sum(s == "ok" for s in expected.values())
    assert main(["score", str(tmp_path / "model.pt"), str(inputs), str(out), "--strict",
                 *[a for kv in settings for a in ("--set", kv)]]) == 3  # nothing left to score, errors remain


# ---------------------------------------------------------------- scoring manifests


def write_manifest(folder: Path, rows: list, name: str = "inputs.csv", column: str = "path") -> str:
    frame = pd.DataFrame({column: rows})
    path = folder / name
    frame.to_csv(path, index=False) if name.endswith(".csv") else frame.to_parquet(path)
    return str(path)


@pytest.fixture
def clips(tmp_path) -> Path:
    folder = tmp_path / "clips"
    (folder / "sub").mkdir(parents=True)
    for name in ("NA", "0012", "sub/a.wav", "null"):
        sf.write(folder / name, tone(8000, 0.2), 8000, format="WAV")
    return folder


def test_manifest_paths_are_read_as_text(clips):
    # read_csv's defaults made NA a missing value and 0012 the number 12.
    listed = list_inputs(write_manifest(clips, ["NA", "0012", "sub/a.wav", "null"])).files
    assert listed == [str(clips / n) for n in ("NA", "0012", "sub/a.wav", "null")]


def test_a_manifest_without_a_path_column_is_an_error_naming_it_and_its_columns(clips):
    location = write_manifest(clips, ["sub/a.wav"], column="file")
    with pytest.raises(InputManifestError, match=r"inputs\.csv: .*'path' column.*\['file'\]"):
        list_inputs(location)


@pytest.mark.parametrize("name", ["inputs.csv", "inputs.parquet"])
def test_empty_cells_and_duplicates_are_errors_naming_their_rows(clips, name):
    rows = ["sub/a.wav", "", None, "sub/a.wav", "./sub/a.wav"] if name.endswith(".parquet") else \
        ["sub/a.wav", "", "  ", "sub/a.wav", "./sub/a.wav"]
    with pytest.raises(InputManifestError) as caught:
        list_inputs(write_manifest(clips, rows, name))
    message = str(caught.value)
    assert "4 bad row(s)" in message
    assert "row 1: empty path" in message and "row 2: empty path" in message
    assert "row 3: 'sub/a.wav' is listed again (first in row 0)" in message and "row 4:" in message


@pytest.mark.parametrize("name", ["inputs.csv", "inputs.parquet"])
def test_a_manifest_without_rows_is_an_error_naming_it(clips, name):
    location = write_manifest(clips, [], name)
    with pytest.raises(InputManifestError, match=rf"{name}: the manifest has no rows"):
        list_inputs(location)


def test_locations_outside_the_manifests_folder_need_allow_outside(clips, tmp_path):
    outside = tmp_path / "elsewhere.wav"
    sf.write(outside, tone(8000, 0.2), 8000)
    rows = [str(outside), "../other.wav", "s3://another-bucket/x.wav", "sub/../sub/a.wav"]
    location = write_manifest(clips, rows)
    with pytest.raises(InputManifestError) as caught:
        list_inputs(location)
    message = str(caught.value)
    assert "3 bad row(s)" in message and "outside the manifest's folder" in message and "--allow-outside" in message
    assert list_inputs(location, allow_outside=True).files == [
        str(outside), str(tmp_path / "other.wav"), "s3://another-bucket/x.wav", str(clips / "sub" / "a.wav")]


def test_one_file_named_as_another_format_is_skipped_and_a_missing_input_is_an_error(tmp_path):
    (tmp_path / "talk.m4a").write_bytes(b"\x00" * 100)
    inputs = list_inputs(str(tmp_path / "talk.m4a"))
    assert inputs.files == [] and "m4a" in inputs.skipped[str(tmp_path / "talk.m4a")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_inputs(str(tmp_path / "missing"))


def test_training_reports_bad_clips_in_the_words_scoring_uses(tmp_path):
    import logging

    from gunsound.config import load_config
    from gunsound.dataset import ManifestError, load_manifest
    from tests.conftest import SEED_CONFIG

    for label in ("AK-47", "M4"):
        (tmp_path / label).mkdir()
        for i in range(3):
            sf.write(tmp_path / label / f"{i}.wav", tone(16000, 0.5), 16000)
    whole = encoded(tone(16000, 2.0), 16000)
    (tmp_path / "M4" / "cut.wav").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "M4" / "one_hertz.wav").write_bytes(with_sample_rate(whole, 1))
    (tmp_path / "M4" / "voice memo.m4a").write_bytes(bytes(100))
    cfg = load_config(SEED_CONFIG, ["architecture.pretrained=false", "dataset.train_dataframe=", "dataset.data_folder="])
    with pytest.raises(ManifestError) as caught:
        load_manifest(cfg, str(tmp_path))
    reasons = {p.path: p.reason for p in caught.value.problems}
    assert reasons["M4/cut.wav"].startswith("truncated: the header claims")
    assert reasons["M4/one_hertz.wav"].startswith("unsupported header: sample rate 1 Hz")
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("gunsound.dataset").addHandler(handler)
    try:
        manifest = load_manifest(cfg, str(tmp_path), drop_bad_rows=True)
    finally:
        logging.getLogger("gunsound.dataset").removeHandler(handler)
    assert len(manifest.frame) == 6
    assert any("voice memo.m4a" in w for w in warnings)  # left out, and said so
