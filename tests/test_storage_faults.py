"""S3 read faults: short reads, errors mid-read, throttling responses and dropped streams, injected under the
storage layer over moto's S3 server. Transient faults are retried with backoff and the file decodes whole;
persistent ones are errors naming the file; a cut file is never returned as complete."""

from __future__ import annotations

import http.client
import io
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import urlsplit

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import soundfile as sf

from gunsound import audio, scoring, storage
from gunsound.inputs import list_inputs
from gunsound.windows import plan_chunks

BUCKET = "gunsound-faults"
SECONDS, RATE = 10, 48000
FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"),
           "mp3": ("MP3", "MPEG_LAYER_III")}
TRANSIENT = "AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 56, Failure when receiving data"


def _encoded(ext: str) -> bytes:
    t = np.arange(SECONDS * RATE) / RATE
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 1000 * t)], axis=1)
    out = io.BytesIO()
    sf.write(out, stereo, RATE, format=FORMATS[ext][0], subtype=FORMATS[ext][1])
    return out.getvalue()


@pytest.fixture(scope="module")
def objects(s3_server):
    """The test clips on moto's S3, and each one decoded from its bytes in memory (the reference)."""
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=BUCKET)
    reference = {}
    for ext in FORMATS:
        data = _encoded(ext)
        client.put_object(Bucket=BUCKET, Key=f"clips/tone.{ext}", Body=data)
        reference[ext] = audio.read(f"tone.{ext}", data=data)[0]
    return reference


def uri(ext: str) -> str:
    return f"s3://{BUCKET}/clips/tone.{ext}"


@dataclass
class Faults:
    """What the files opened through FaultyS3 do. Reads are counted from 1 over every file opened."""

    max_bytes: int | None = None  # short reads: at most this many bytes per read
    raise_on: set[int] = field(default_factory=set)  # read numbers that raise `error`
    raise_from: int | None = None  # every read from this number on raises `error`
    empty_from: int | None = None  # every read from this number on returns b"" (a stream that just stops)
    error: str = TRANSIENT
    error_type: type[Exception] = OSError
    reads: int = 0
    opens: int = 0


class FaultyFile:
    """A file of the real S3 filesystem, read through the faults. It fetches 1 MiB ranges of the object and
    hands them out `max_bytes` at a time, so that short reads cost no extra requests to the server."""

    BLOCK = 1 << 20

    def __init__(self, inner: pa.NativeFile, faults: Faults):
        self.inner, self.faults, self.closed = inner, faults, False
        self.position, self.block, self.block_at = 0, b"", 0

    def read(self, nbytes: int = -1) -> bytes:
        f = self.faults
        f.reads += 1
        if f.reads in f.raise_on or (f.raise_from is not None and f.reads >= f.raise_from):
            raise f.error_type(f.error)
        if f.empty_from is not None and f.reads >= f.empty_from:
            return b""
        if nbytes < 0:
            nbytes = self.inner.size() - self.position
        if f.max_bytes is not None:
            nbytes = min(nbytes, f.max_bytes)
        offset = self.position - self.block_at
        if not 0 <= offset < len(self.block) or offset + nbytes > len(self.block):
            self.block, self.block_at, offset = self.inner.read_at(max(nbytes, self.BLOCK), self.position), \
                self.position, 0
        data = self.block[offset:offset + nbytes]
        self.position += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: 0, 1: self.position, 2: self.inner.size()}[whence] + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def size(self) -> int:
        return self.inner.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True
        self.inner.close()


class FaultyS3(pafs.FileSystemHandler):
    """The real (moto) S3 filesystem, whose input files go through FaultyFile."""

    def __init__(self, real: pafs.FileSystem, faults: Faults):
        self.real, self.faults = real, faults

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def get_type_name(self):
        return "faulty-s3"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.real.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.real.get_file_info(selector)

    def open_input_file(self, path):
        self.faults.opens += 1
        return pa.PythonFile(FaultyFile(self.real.open_input_file(path), self.faults), mode="r")

    def open_input_stream(self, path):
        return self.open_input_file(path)

    def _read_only(self, *args):
        raise NotImplementedError("the faulty filesystem is read-only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _read_only
    move = copy_file = open_output_stream = open_append_stream = _read_only


@pytest.fixture
def sleeps(monkeypatch):
    """Retries wait milliseconds here, and every wait storage asks for is recorded."""
    waited: list[float] = []
    monkeypatch.setattr(storage, "RETRY", storage.RetryPolicy(attempts=4, first_delay=0.004, max_delay=0.05))
    monkeypatch.setattr(storage, "time", SimpleNamespace(sleep=waited.append))
    return waited


@pytest.fixture
def faulty(s3_server, objects, monkeypatch, sleeps):
    """Install faults under storage's S3 filesystem (what storage.resolve hands out for s3:// URIs)."""
    storage.configure_s3(s3_server)
    real = storage.s3_filesystem

    def install(faults: Faults) -> Faults:
        monkeypatch.setattr(storage, "s3_filesystem",
                            lambda settings=None: pafs.PyFileSystem(FaultyS3(real(settings), faults)))
        storage._open_zip.cache_clear()
        storage._zip_filesystem.cache_clear()
        return faults

    yield install
    storage._open_zip.cache_clear()
    storage._zip_filesystem.cache_clear()


# libsndfile asks for 8 KiB of a WAV or FLAC, 2 KiB of an Ogg, 4 and 92 bytes of an MP3: the short reads are shorter.
@pytest.mark.parametrize(("ext", "max_bytes"), [("wav", 4000), ("wav", 1000), ("flac", 1000), ("ogg", 1000),
                                                 ("mp3", 50)])
def test_short_reads_decode_the_whole_file(faulty, objects, ext, max_bytes):
    # soundfile took a short read for the end of the file: 64 KB reads decoded 16,384 of a WAV's 480,000 frames.
    faults = faulty(Faults(max_bytes=max_bytes))
    wave, sr = audio.read(uri(ext))
    assert sr == RATE and faults.reads > 1
    np.testing.assert_array_equal(wave, objects[ext])
    assert audio.info(uri(ext)).frames == len(objects[ext])
    part, _ = audio.read(uri(ext), start=4.0, duration=2.0)  # a frame range, as a scoring chunk reads it
    assert len(part) == 2 * RATE


@pytest.mark.parametrize("error_type", [OSError, ConnectionResetError, TimeoutError])
def test_transient_errors_mid_read_are_retried_with_backoff_and_the_file_decodes_whole(
        faulty, objects, sleeps, error_type):
    faults = faulty(Faults(max_bytes=65536, raise_on={3, 4, 9}, error_type=error_type))
    wave, _ = audio.read(uri("wav"))
    np.testing.assert_array_equal(wave, objects["wav"])
    assert len(sleeps) == 3  # reads 3 and 4 in a row, then 9
    assert sleeps[1] > sleeps[0]  # the second wait in a row is longer
    assert faults.opens == 4  # the failed handle is dropped and the object opened again where it stopped


def test_a_stream_that_stops_early_is_retried_not_taken_for_the_end(faulty, objects, sleeps):
    faults = faulty(Faults(max_bytes=65536))
    faults.empty_from = 5
    with pytest.raises(audio.AudioError, match=r"s3://gunsound-faults/clips/tone\.wav.*stream ended"):
        audio.read(uri("wav"))
    assert len(sleeps) == storage.RETRY.attempts - 1


def test_persistent_errors_are_errors_naming_the_file_in_reads_headers_and_chunks(faulty, objects, sleeps):
    faulty(Faults(raise_from=3, max_bytes=16384))
    with pytest.raises(audio.AudioError, match=r"s3://gunsound-faults/clips/tone\.flac: cannot decode audio: read failed: .*"
                                               r"NETWORK_CONNECTION.*gave up after 4 attempts"):
        audio.read(uri("flac"))
    faulty(Faults(raise_from=1))
    headers = scoring.read_headers([uri("wav"), uri("ogg")])
    for path in (uri("wav"), uri("ogg")):
        duration, error = headers[path]
        assert np.isnan(duration) and "unreadable audio" in error and "gave up after 4 attempts" in error
    faulty(Faults(raise_from=4, max_bytes=65536))
    chunks = plan_chunks(uri("wav"), float(SECONDS), window_seconds=2.0, hop_seconds=2.0, read_seconds=10.0)
    batch = {k: np.array([v], dtype=object) for k, v in chunks[0].items()}
    cut = scoring.read_chunks(batch, sample_rate=16000, window_seconds=2.0, onset_detection=True,
                              onset_threshold_db=12.0, s3=storage.current_settings())
    assert len(cut["error"]) == 5  # every window of the chunk is there, each marked with the error
    assert all(uri("wav") in e and "read failed" in e for e in cut["error"])


def test_errors_that_are_not_transient_are_not_retried(faulty, objects, sleeps):
    faulty(Faults(raise_from=2, error="AWS Error ACCESS_DENIED during GetObject operation: Access Denied"))
    with pytest.raises(audio.AudioError, match="ACCESS_DENIED"):
        audio.read(uri("wav"))
    faulty(Faults(raise_from=2, error_type=PermissionError, error="denied"))
    with pytest.raises(audio.AudioError, match="denied"):
        audio.read(uri("wav"))
    assert sleeps == []


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
def test_no_cut_file_is_ever_returned_as_complete(faulty, objects, ext):
    short = {"wav": 262144, "flac": 32768}.get(ext, 8192)
    clean = faulty(Faults(max_bytes=short))
    audio.read(uri(ext))
    for first_bad in range(1, clean.reads + 2):  # every read a persistent fault could start at, and none
        for fault in (Faults(max_bytes=short, raise_from=first_bad), Faults(max_bytes=short, empty_from=first_bad)):
            faulty(fault)
            try:
                wave, _ = audio.read(uri(ext))
            except audio.AudioError as exc:
                assert uri(ext) in str(exc)
            else:
                np.testing.assert_array_equal(wave, objects[ext])


def test_training_decode_never_gets_a_cut_clip(faulty, objects):
    from gunsound.ray_features import decode_clips

    faulty(Faults(max_bytes=65536, raise_from=6))
    out = decode_clips({"path": np.array([uri("wav")], dtype=object)}, 16000, 16000 * SECONDS,
                       storage.current_settings())
    assert uri("wav") in out["error"][0] and not out["wave"].any()


def test_a_zip_on_s3_is_read_through_short_reads_and_retries(faulty, objects, sleeps, s3_server, tmp_path):
    import zipfile

    archive = tmp_path / "clips.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("clips/tone.flac", _encoded("flac"))
    boto3.client("s3", endpoint_url=s3_server).upload_file(str(archive), BUCKET, "zips/clips.zip")
    faulty(Faults(max_bytes=4096, raise_on={2, 7}))
    (member,) = list_inputs(f"s3://{BUCKET}/zips/clips.zip").files
    np.testing.assert_array_equal(audio.read(member)[0], objects["flac"])
    assert len(sleeps) == 2
    # A read that keeps failing is a read fault naming the archive, not a zip said to be bad.
    faulty(Faults(raise_from=1))
    with pytest.raises(OSError, match=rf"zip archive s3://{BUCKET}/zips/clips.zip: could not be read .*gave up after 4"):
        list_inputs(f"s3://{BUCKET}/zips/clips.zip")


SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message><RequestId>1</RequestId></Error>")


@pytest.fixture
def throttling(s3_server, objects, monkeypatch):
    """An HTTP proxy in front of moto that answers the next `budget["left"]` GETs of a clip with S3's 503
    SlowDown, as S3 does under load: the real S3 client of pyarrow gets the throttling responses."""
    target = urlsplit(s3_server)
    budget = {"left": 0, "throttled": 0, "lists_left": 0}

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def forward(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            listing = "list-type=2" in self.path
            if self.command == "GET" and budget["lists_left" if listing else "left"] > 0 and (
                    listing or "/clips/" in self.path):
                budget["lists_left" if listing else "left"] -= 1
                budget["throttled"] += 1
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(SLOW_DOWN)
                return
            upstream = http.client.HTTPConnection(target.hostname, target.port)
            upstream.request(self.command, self.path, body, headers=dict(self.headers.items()))
            response = upstream.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                    self.send_header(key, value)
            length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            self.send_header("Content-Length", length or "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            upstream.close()

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setattr(storage, "_settings", storage.S3Settings(endpoint_url=endpoint, region="us-east-1"))
    yield budget
    proxy.shutdown()
    proxy.server_close()


def test_throttling_responses_are_retried_and_the_file_decodes_whole(throttling, objects, sleeps):
    # pyarrow's S3 client tries a request three times itself; four SlowDowns in a row reach storage's retries.
    throttling["left"] = 4
    wave, _ = audio.read(uri("wav"))
    np.testing.assert_array_equal(wave, objects["wav"])
    assert throttling["throttled"] == 4 and len(sleeps) >= 1


def test_persistent_throttling_is_an_error_naming_the_file(throttling, objects, sleeps, monkeypatch):
    monkeypatch.setattr(storage, "RETRY", storage.RetryPolicy(attempts=2, first_delay=0.001, max_delay=0.001))
    throttling["left"] = 1000
    with pytest.raises(audio.AudioError, match=r"s3://gunsound-faults/clips/tone\.wav.*gave up after 2 attempts"):
        audio.read(uri("wav"))
    assert len(sleeps) == 1


def test_a_throttled_listing_is_retried_and_listed_whole(throttling, objects, sleeps):
    # boto3 tries a request a few times itself (three in its standard mode); six SlowDowns in a row reach
    # storage's retries.
    throttling["lists_left"] = 6
    pages = list(storage.entry_pages(f"s3://{BUCKET}/clips", page_entries=2))
    assert sorted(listed for page in pages for listed, _ in page) == sorted(uri(ext) for ext in FORMATS)
    assert throttling["throttled"] == 6 and len(sleeps) >= 1


def test_persistent_throttling_of_a_listing_is_an_error_naming_the_prefix(throttling, objects, sleeps):
    throttling["lists_left"] = 1000
    with pytest.raises(OSError, match=rf"listing s3://{BUCKET}/clips: .*SlowDown.*gave up after 4 attempts"):
        list(storage.entry_pages(f"s3://{BUCKET}/clips"))
    assert len(sleeps) == 3


@pytest.fixture(scope="module")
def model_on_s3(s3_server, objects) -> str:
    from gunsound.config import ArchitectureConfig
    from gunsound.features import FeatureParams
    from gunsound.model import ModelArtifact, build_model

    arch = ArchitectureConfig(backbone="resnet10t", pretrained=False)
    artifact = ModelArtifact(classes=["pistol", "rifle"], features=FeatureParams(16000, 512, 160, 32, 50.0, 7000.0,
                             False), chunk_seconds=1.0, architecture=arch, loss_function="BCE",
                             state_dict=build_model(arch, 2).state_dict())
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=BUCKET, Key="runs/model.pt", Body=artifact.to_bytes())
    return f"s3://{BUCKET}/runs/model.pt"


def test_a_model_file_is_described_and_loaded_through_faults_and_a_failed_read_is_not_called_a_bad_model(
        faulty, model_on_s3, sleeps):
    from gunsound.model import ModelArtifact
    from gunsound.model_files import describe_model

    faulty(Faults(max_bytes=1000, raise_on={2, 5}))
    described = describe_model([model_on_s3])
    assert described.classes == ["pistol", "rifle"] and described.sample_rate == 16000 and len(sleeps) == 2
    assert ModelArtifact.load(model_on_s3).classes == ["pistol", "rifle"]
    for read in (lambda: describe_model([model_on_s3]), lambda: ModelArtifact.load(model_on_s3)):
        faulty(Faults(raise_from=1))
        with pytest.raises(OSError, match=r"s3://gunsound-faults/runs/model\.pt: could not be read .*gave up after 4"):
            read()
        faulty(Faults(raise_from=1, error="AWS Error ACCESS_DENIED during GetObject operation: Access Denied"))
        with pytest.raises(OSError, match=r"s3://gunsound-faults/runs/model\.pt: could not be read .*ACCESS_DENIED"):
            read()


def test_backbone_weights_that_cannot_be_read_are_a_read_fault_not_a_bad_weights_file(faulty, objects, sleeps,
                                                                                      s3_server):
    import torch

    from gunsound.model import read_backbone_weights

    data = io.BytesIO()
    torch.save({"conv.weight": torch.ones(2, 1, 3, 3)}, data)
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=BUCKET, Key="weights/w.pt", Body=data.getvalue())
    faulty(Faults(max_bytes=100, raise_on={2}))
    assert read_backbone_weights(f"s3://{BUCKET}/weights/w.pt")["conv.weight"].sum() == 18
    faulty(Faults(raise_from=1))
    with pytest.raises(OSError, match=r"architecture.pretrained_weights s3://gunsound-faults/weights/w.pt: could not "
                                      r"be read .*gave up after 4"):
        read_backbone_weights(f"s3://{BUCKET}/weights/w.pt")
