"""Paths as the storage layer names them: an S3 key is opaque ("#" and "?" are part of it, not a fragment or a
query) wherever a key is read, listed or written, and a local listing enters every folder once, whatever links
to folders it meets."""

from __future__ import annotations

import io
import itertools
import os
import re
import zipfile
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
import soundfile as sf

from gunsound import scoring, storage
from gunsound.inputs import list_inputs

BUCKET = "gunsound-paths"
ODD_KEYS = ["in/range 3#2.wav", "in/what?.wav", "in/a?b#c.wav", "in/#.wav", "in/sub#1?x/deep.wav"]
# A listing that runs away is cut here, so that a loop fails a test instead of hanging it.
ENTRY_LIMIT = 1000


def _wav(seconds: float) -> bytes:
    out = io.BytesIO()
    sf.write(out, 0.5 * np.sin(2 * np.pi * 440 * np.arange(int(8000 * seconds)) / 8000), 8000, format="WAV")
    return out.getvalue()


@pytest.fixture(scope="module")
def bucket(s3_server):
    """Objects whose keys hold "#" or "?", beside the objects that urlparse would cut those keys to."""
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=BUCKET)
    for key in ["in/range 3", "in/what", "in/a", "in/", *ODD_KEYS, "dir/a.wav", "dir#1/a.wav", "dir?x/a.wav"]:
        client.put_object(Bucket=BUCKET, Key=key, Body=key.encode())
    return client


@pytest.fixture
def s3(s3_server, bucket):
    storage.configure_s3(s3_server)
    return bucket


@pytest.mark.parametrize(("uri", "bucket_key"), [
    ("s3://b/in/range 3#2.wav", ("b", "in/range 3#2.wav")),
    ("s3://b/what?.wav", ("b", "what?.wav")),
    ("s3://b/a?x=1#y", ("b", "a?x=1#y")),
    ("s3://b/a//c", ("b", "a//c")),
    ("s3://b/", ("b", "")),
    ("s3://b", ("b", "")),
])
def test_an_s3_uri_is_split_as_text(uri, bucket_key):
    assert storage.split_s3(uri) == bucket_key
    assert storage.resolve(uri)[1] == "/".join(bucket_key).rstrip("/")


@pytest.mark.parametrize("key", ODD_KEYS)
def test_a_key_with_hash_or_question_mark_is_read_as_listed(s3, key):
    uri = f"s3://{BUCKET}/{key}"
    assert uri in storage.list_files(f"s3://{BUCKET}/in")
    assert storage.read_bytes(uri) == key.encode()
    assert storage.file_info(uri).size == len(key) and storage.exists(uri)


@pytest.mark.parametrize("folder", ["dir#1", "dir?x"])
def test_a_prefix_with_hash_or_question_mark_lists_its_own_keys(s3, folder):
    assert storage.list_files(f"s3://{BUCKET}/{folder}") == [f"s3://{BUCKET}/{folder}/a.wav"]
    assert storage.list_files(f"s3://{BUCKET}/{folder}/") == [f"s3://{BUCKET}/{folder}/a.wav"]


@pytest.mark.parametrize(("name", "seconds"), [("range 3#2.wav", 7.0), ("what?.wav", 2.0)])
def test_audio_under_a_key_with_hash_or_question_mark_is_its_own(s3, name, seconds):
    s3.put_object(Bucket=BUCKET, Key="audio/range 3", Body=_wav(1.0))
    s3.put_object(Bucket=BUCKET, Key=f"audio/{name}", Body=_wav(seconds))
    uri = f"s3://{BUCKET}/audio/{name}"
    assert uri in list_inputs(f"s3://{BUCKET}/audio").files
    assert scoring.read_headers([uri]) == {uri: (seconds, "")}


@pytest.mark.parametrize("archive", ["zips/set#1.zip", "zips/set?1.zip"])
def test_a_zip_on_s3_with_hash_or_question_mark_is_read_in_place(s3, archive):
    members = {"m#1.wav": b"first", "q?.wav": b"second", "d#?/x.wav": b"third"}
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    s3.put_object(Bucket=BUCKET, Key=archive, Body=data.getvalue())
    root = storage.zip_location(f"s3://{BUCKET}/{archive}")
    assert storage.list_files(root) == sorted(storage.join(root, name) for name in members)
    for name, body in members.items():
        assert storage.read_bytes(storage.join(root, name)) == body


@pytest.mark.parametrize("output", ["out#1/run?2", "out?1/run#2"])
def test_an_output_location_with_hash_or_question_mark_is_written_where_named(s3, output):
    uri = f"s3://{BUCKET}/{output}"
    storage.write_text(storage.join(uri, "a#b?.txt"), "hello")
    assert storage.read_text(storage.join(uri, "a#b?.txt")) == "hello"
    assert storage.list_files(uri) == [storage.join(uri, "a#b?.txt")]
    assert s3.get_object(Bucket=BUCKET, Key=f"{output}/a#b?.txt")["Body"].read() == b"hello"
    path, fs = storage.storage_path_for_ray(uri)
    assert path == f"{BUCKET}/{output}" and fs is not None


LINKED = "a link to a folder already listed"
LOOP = "a link to a folder above it (a loop)"


@pytest.mark.parametrize(("files", "links", "listed", "skipped"), [
    pytest.param(["a.wav"], {"self": "."}, ["a.wav"], {"self": LINKED}, id="link-to-dot"),
    pytest.param(["day1/a.wav"], {"day1/up": "..", "latest": "day1"}, ["day1/a.wav"],
                 {"day1/up": LINKED, "latest": LINKED}, id="two-link-loop"),
    pytest.param(["a.wav"], {"up": ".."}, ["a.wav"], {"up": LOOP}, id="link-to-the-root's-parent"),
    pytest.param(["zeta/c.wav"], {"a_link": "zeta"}, ["zeta/c.wav"], {"a_link": LINKED},
                 id="link-sorted-before-its-target"),
    pytest.param(["x/y/b.wav"], {"x/y/back": "../..", "x/y/here": "../y", "x/y/gone": "nothing"}, ["x/y/b.wav"],
                 {"x/y/back": LINKED, "x/y/here": LINKED}, id="nested-links-and-a-broken-one"),
    pytest.param(["a.wav", "../outside/rec/b.wav"],
                 {"linked": "../outside/rec", "linked2": "../outside/rec", "linked/up": ".."},
                 ["a.wav", "linked/b.wav"], {"linked/up": LOOP, "linked2": LINKED}, id="links-out-of-the-root"),
])
def test_a_local_listing_enters_each_folder_once(tmp_path, files, links, listed, skipped):
    root = tmp_path / "in"
    root.mkdir()
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, np.zeros(800), 8000)
    for rel, target in links.items():
        os.symlink(target, root / rel)
    entries = list(itertools.islice((entry for page in storage.entry_pages(str(root), page_entries=2)
                                     for entry in page), ENTRY_LIMIT))
    assert len(entries) < ENTRY_LIMIT, "the listing did not end"
    rel = {uri: Path(uri).relative_to(root).as_posix() for uri, _ in entries}
    assert sorted(rel[uri] for uri, info in entries if info.type == pafs.FileType.File) == listed
    assert {rel[uri]: info.reason for uri, info in entries if isinstance(info, storage.SkippedEntry)} == skipped
    broken = {rel[uri] for uri, info in entries if info.type == pafs.FileType.NotFound}
    assert broken == {rel for rel, target in links.items() if not (root / rel).exists()}
    inputs = list_inputs(str(root))
    assert inputs.files == [str(root / rel) for rel in listed]
    assert set(inputs.skipped) == {str(root / rel) for rel in [*skipped, *broken]}
    assert {rel: inputs.skipped[str(root / rel)] for rel in skipped} == skipped  # the files/ rows' reasons


def test_a_local_listing_that_is_not_recursive_reports_links_to_folders_as_folders(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"x")
    os.symlink(".", tmp_path / "self")
    entries = [(Path(uri).name, info.type) for page in storage.entry_pages(str(tmp_path), recursive=False)
               for uri, info in page]
    assert entries == [("a.wav", pafs.FileType.File), ("self", pafs.FileType.Directory)]


BAD_TABLES = {  # name: (bytes, what the error says)
    "ragged.csv": (b"path,label\na.wav,x\nb.wav,x,extra\n", "Expected 2 fields in line 3, saw 3"),
    "utf16.csv": ("path\na.wav\n".encode("utf-16"), "not UTF-8 text"),
    "empty.csv": (b"", "it is empty"),
    "cut.parquet": (None, "Parquet file (ArrowInvalid"),
}


@pytest.mark.parametrize("name", sorted(BAD_TABLES))
def test_a_table_that_cannot_be_parsed_is_named_by_every_reader(tmp_path, name):
    """A scoring manifest, a training dataframe and storage's own reader all name the file (pandas and pyarrow
    name a line, or '<Buffer>')."""
    from gunsound.dataset import read_dataframe
    from gunsound.inputs import InputManifestError

    data, says = BAD_TABLES[name]
    if data is None:
        whole = io.BytesIO()
        pd.DataFrame({"path": ["a.wav"] * 50}).to_parquet(whole)
        data = whole.getvalue()[: len(whole.getvalue()) // 2]
    path = tmp_path / name
    path.write_bytes(data)
    for read, error in ((storage.read_table, ValueError), (read_dataframe, ValueError),
                        (list_inputs, InputManifestError)):
        with pytest.raises(error, match=re.escape(f"{path}: not a readable") + ".*" + re.escape(says)):
            read(str(path))


def test_a_file_system_without_inode_numbers_lists_every_folder(tmp_path, monkeypatch):
    """Some network and Windows file systems give every folder inode 0: were that an identity, every folder
    after the first would count as one already listed."""
    for folder in ("a", "b", "b/c"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.wav").write_bytes(b"x")
    real_stat = os.stat

    def no_inodes(path, *args, **kwargs):
        st = real_stat(path, *args, **kwargs)
        return os.stat_result((st.st_mode, 0, *tuple(st)[2:]))

    monkeypatch.setattr(storage.os, "stat", no_inodes)
    files = sorted(Path(uri).relative_to(tmp_path).as_posix() for page in storage.entry_pages(str(tmp_path))
                   for uri, info in page if info.type == pafs.FileType.File)
    assert files == ["a/x.wav", "b/c/x.wav", "b/x.wav"]
