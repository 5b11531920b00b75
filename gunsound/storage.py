"""One filesystem layer for local paths, s3:// URIs and members of zip archives (pyarrow.fs underneath).

Every read and write of data, checkpoints and outputs goes through `resolve`, so local runs, AWS S3 and
S3-compatible stores share one code path. S3 credentials come from the standard AWS chain (environment,
profile, instance role); only the endpoint may be configured, and it is never logged with secrets.

A zip archive (local or on S3) is read in place, never extracted: `zip_location(archive)` names its root as
`zip://ARCHIVE!/`, and every function here reads members through it from the archive where it lies (range
reads: its directory, then each member; members up to 64 MiB in one read).
So a zipped dataset on S3 is readable from every node of a cluster, and nothing is left on any disk.

Reads from S3 are retried: a transient error (throttling, a 5xx, a reset connection, a timeout) is tried
again with exponential backoff (`RETRY`) and a persistent one raised naming the object; a read returns every
byte asked for up to the end of the object (a short read is continued), so a decoder never takes a flaky
stream for the end of a file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import random
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls, endpoint_url: str | None = None, region: str | None = None) -> S3Settings:
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return cls(endpoint_url=endpoint or None, region=region or None)


_settings = S3Settings.from_env()


def configure_s3(endpoint_url: str | None = None, region: str | None = None) -> S3Settings:
    """Set the S3 endpoint for this process (config `storage` section or AWS_ENDPOINT_URL).

    The endpoint is also exported as AWS_ENDPOINT_URL_S3 so that Ray workers started later resolve the same
    store; credentials are left to the AWS environment and never copied.
    """
    global _settings
    _settings = S3Settings.from_env(endpoint_url, region)
    if _settings.endpoint_url:
        os.environ["AWS_ENDPOINT_URL_S3"] = _settings.endpoint_url
    if _settings.region:
        os.environ.setdefault("AWS_REGION", _settings.region)
    return _settings


def current_settings() -> S3Settings:
    """The settings to hand to Ray tasks and actors, which may run in processes started before them."""
    return _settings


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// URI, split as text: the bucket up to the first "/", the key the rest as it is.
    A key is opaque, and urlparse would cut it at a "#" (a fragment) or a "?" (a query) that S3 keeps."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


ZIP_SCHEME = "zip://"


def is_zip(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(ZIP_SCHEME)


def is_local(uri: str | os.PathLike) -> bool:
    """A plain local path (not S3, not inside a zip)."""
    return not (is_s3(uri) or is_zip(uri))


def zip_location(archive: str, member: str = "") -> str:
    """The location of a member (file or folder; "" for the root) inside a local or S3 zip archive:
    zip://ARCHIVE!/MEMBER, so that the member's name ends the URI as a file's name ends a path."""
    if not archive.lower().endswith(".zip"):
        raise ValueError(f"{archive}: a zip archive's name ends with .zip")
    return f"{ZIP_SCHEME}{absolute(archive)}!/{member.strip('/')}"


_ZIP_PARTS = re.compile(r"zip://(.+?\.zip)!/(.*)", re.IGNORECASE | re.DOTALL)


def _split_zip(uri: str) -> tuple[str, str]:
    """(member, archive) of a zip location."""
    match = _ZIP_PARTS.fullmatch(uri)
    if not match:
        raise ValueError(f"{uri}: a zip location is zip://ARCHIVE.zip!/MEMBER")
    return match.group(2).strip("/"), match.group(1)


@lru_cache(maxsize=8)
def _open_zip(archive: str, settings: S3Settings):
    """fsspec's filesystem over one archive, opened once per process (workers reuse it for every clip)."""
    from fsspec.implementations.zip import ZipFileSystem

    fs, path = _resolve_plain(archive, settings)
    try:
        handle = RetryingInput(lambda: fs.open_input_file(path), archive) if is_s3(archive) else \
            fs.open_input_file(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"zip archive {archive} does not exist") from exc
    try:
        # skip_instance_cache: fsspec would otherwise share instances between archives whose handles look alike.
        return ZipFileSystem(fo=handle, skip_instance_cache=True)
    except zipfile.BadZipFile as exc:
        handle.close()
        raise refusal(f"zip archive {archive}", exc, "not a readable zip file") from exc


def refusal(where: str, exc: BaseException, what_it_is_not: str) -> OSError | ValueError:
    """The error to raise where a parser refused a file (`where` names it): an OSError saying it could not be
    read when a storage read failed underneath, which a retry may mend, else a ValueError saying what the file
    is not. zipfile, for one, reports a failed read of an archive's directory as "File is not a zip file",
    which would pass a read fault off as a bad file."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return OSError(f"{where}: could not be read ({seen})")
        seen = seen.__cause__ or seen.__context__
    return ValueError(f"{where}: {what_it_is_not} ({type(exc).__name__}: {exc})")


@lru_cache(maxsize=8)
def _zip_filesystem(archive: str, settings: S3Settings) -> pafs.FileSystem:
    """The same archive as a (read-only) pyarrow filesystem, so every function here treats it like the others."""
    return pafs.PyFileSystem(pafs.FSSpecHandler(_open_zip(archive, settings)))


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter, over the AWS SDK's own retries inside Arrow (which give up
    after three tries, too soon for throttling at cluster scale)."""

    attempts: int = 6
    first_delay: float = 0.25
    max_delay: float = 8.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure in a row (1, 2, ...)."""
        return min(self.max_delay, self.first_delay * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


RETRY = RetryPolicy()

# Arrow names AWS errors "AWS Error SLOW_DOWN during GetObject operation: ..." (or "UNKNOWN (HTTP status
# 503)"); curl's own failures name a curlCode.
_TRANSIENT = re.compile(
    r"\b(SLOW_DOWN|THROTTLING|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|REQUEST_TIMEOUT|NETWORK_CONNECTION)\b"
    r"|HTTP status 5\d\d|SlowDown|Throttl|Service Unavailable|InternalError|RequestTimeout|reduce your request rate"
    r"|timed out|Connection reset|Connection refused|Connection aborted|Broken pipe|curlCode"
    r"|ended at byte"
    # boto3's names for the same (its ClientError carries the S3 error code)
    r"|ServiceUnavailable|Could not connect|Read timeout|Connect timeout|Connection was closed")


def is_transient(exc: BaseException) -> bool:
    """An error worth trying again: throttling, a server error, a dropped or slow connection."""
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return (isinstance(exc, OSError) or _from_aws_sdk(exc)) and bool(_TRANSIENT.search(str(exc)))


def _from_aws_sdk(exc: BaseException) -> bool:
    """Raised by boto3's botocore, whose errors are not OSErrors."""
    return type(exc).__module__.startswith("botocore")


def with_retries(call: Callable, what: str, policy: RetryPolicy | None = None):
    """call(), tried again after transient errors (RETRY's attempts and backoff); the last error is raised as
    an OSError naming `what` and the attempts made."""
    policy = policy or RETRY
    attempt = 1
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt >= policy.attempts:
                raise OSError(f"{what}: {exc} (gave up after {attempt} attempts)") from exc
            delay = policy.delay(attempt)
            log.warning("%s: %s; trying again in %.2f s (%d of %d)", what, exc, delay, attempt + 1,
                        policy.attempts)
            time.sleep(delay)
            attempt += 1


# A read of an S3 input fetches at least this much and serves the next reads from it: a decoder reads a few
# kilobytes at a time (libsndfile's WAV reads are 8 KiB, its MP3 reads 4 and 92 bytes), and each read of
# Arrow's S3 file is a request of its own.
READ_AHEAD_BYTES = 1 << 20


class RetryingInput(io.RawIOBase):
    """A seekable input file that reads every byte asked for up to the end of the file, ahead in blocks of
    READ_AHEAD_BYTES, tried again after transient errors: the failed handle is dropped and the file opened
    again where the read stopped (an HTTP stream that broke stays broken). A stream that ends before the
    file's size is such an error."""

    def __init__(self, opener: Callable[[], pafs.NativeFile], what: str, policy: RetryPolicy | None = None):
        self._opener, self.what, self.policy = opener, what, policy or RETRY
        self._file = with_retries(opener, what, self.policy)
        self.size = self._file.size()
        self.position = 0
        self._ahead, self._ahead_at = b"", 0  # bytes read ahead, and where they start

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def _read_at(self, count: int, position: int) -> bytes:
        if self._file is None:  # dropped after a failure
            self._file = self._opener()
        try:
            data = self._file.read_at(count, position)
            if not data:
                raise OSError(f"{self.what}: the stream ended at byte {position} of {self.size}")
        except Exception:
            self._drop()
            raise
        return data

    def _drop(self) -> None:
        handle, self._file = self._file, None
        with contextlib.suppress(Exception):
            handle.close()

    def _fetch(self, count: int) -> bytes:
        """`count` bytes from the position (fewer at the end of the file), the position left where it is."""
        pieces, at, end = [], self.position, min(self.position + count, self.size)
        while at < end:
            data = with_retries(lambda n=end - at, p=at: self._read_at(n, p), self.what, self.policy)
            pieces.append(data)
            at += len(data)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def read(self, size: int | None = -1) -> bytes:
        count = max(0, self.size - self.position)
        if size is not None and size >= 0:
            count = min(count, size)
        offset = self.position - self._ahead_at
        if count >= READ_AHEAD_BYTES and not 0 <= offset < len(self._ahead):  # large: as it comes, no copy
            data = self._fetch(count)
            self.position += len(data)
            return data
        buffer = bytearray(count)
        return bytes(buffer[:self.readinto(buffer)])

    def readall(self) -> bytes:
        return self.read()

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        end = min(len(view), max(0, self.size - self.position))
        done = 0
        while done < end:
            offset = self.position - self._ahead_at
            if not 0 <= offset < len(self._ahead):
                self._ahead, self._ahead_at, offset = self._fetch(max(end - done, READ_AHEAD_BYTES)), self.position, 0
            n = min(end - done, len(self._ahead) - offset)
            view[done:done + n] = self._ahead[offset:offset + n]
            done += n
            self.position += n
        return done

    def close(self) -> None:
        if self._file is not None:
            self._drop()
        self._ahead = b""
        super().close()


def s3_filesystem(settings: S3Settings | None = None) -> pafs.S3FileSystem:
    settings = settings or _settings
    kwargs: dict = {}
    if settings.region:
        kwargs["region"] = settings.region
    if settings.endpoint_url:
        parsed = urlparse(settings.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        kwargs.setdefault("region", "us-east-1")
    # Keys, when present in the environment, are read by Arrow's default AWS credential chain.
    return pafs.S3FileSystem(**kwargs)


def s3_client(settings: S3Settings | None = None):
    """A boto3 S3 client for what Arrow has no call for (listing a page at a time, conditional writes), with
    the same endpoint and region; credentials from the standard AWS chain."""
    import boto3

    settings = settings or _settings
    return boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region)


def _resolve_plain(uri: str, settings: S3Settings) -> tuple[pafs.FileSystem, str]:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_filesystem(settings), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path, an s3:// URI or a zip member."""
    text = str(uri)
    if is_zip(text):
        member, archive = _split_zip(text)
        return _zip_filesystem(archive, _settings), member
    return _resolve_plain(text, _settings)


def absolute(uri: str) -> str:
    """A local path made absolute (Ray Train workers run in their own working directory); URIs unchanged."""
    return str(Path(uri).expanduser().absolute()) if is_local(uri) else uri


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path, an s3:// URI or a zip location."""
    if is_zip(base):
        member, archive = _split_zip(base)
        return zip_location(archive, posixpath.join(member, *parts))
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return str(Path(base).joinpath(*parts))


def relative(uri: str, root: str) -> str:
    """The posix path of `uri` under the folder `root` (both of one kind, as list_files returns them)."""
    if is_zip(root):
        (member, _), (root_member, _) = _split_zip(uri), _split_zip(root)
        return posixpath.relpath(member, root_member or ".")
    if is_s3(root):
        return posixpath.relpath(uri, root)
    return Path(uri).relative_to(root).as_posix()


def _stat(uri: str, fs: pafs.FileSystem, what):
    """fs.get_file_info(what), tried again after transient errors where `uri` is remote."""
    return fs.get_file_info(what) if is_local(uri) else with_retries(lambda: fs.get_file_info(what), uri)


def file_info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    return _stat(uri, fs, path)


def escapes_folder(rel: str) -> bool:
    """A manifest's path that does not stay under the manifest's folder: absolute, a URI (another bucket, a
    zip), or climbing out with ../."""
    norm = posixpath.normpath(rel.replace("\\", "/"))
    return rel.startswith(("/", "\\")) or "://" in rel or norm == ".." or norm.startswith("../")


def exists(uri: str) -> bool:
    return file_info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return file_info(uri).type == pafs.FileType.Directory


def file_infos(uris: list[str]) -> list[pafs.FileInfo]:
    """Stat many files at once (one request batch per filesystem)."""
    if not uris:
        return []
    fs, _ = resolve(uris[0])
    return _stat(uris[0], fs, [resolve(u)[1] for u in uris])


# S3's largest ListObjectsV2 page.
LIST_PAGE_ENTRIES = 1000


def entry_pages(uri: str, recursive: bool = True,
                page_entries: int | None = None) -> Iterator[list[tuple[str, pafs.FileInfo]]]:
    """Everything under a folder (files, folders, broken links) as (URI of the same kind as `uri`, info), a page
    at a time, so that a listing of millions of entries is never held whole: on S3 a page is one ListObjectsV2
    request (keys in S3's order, folders inferred from the keys as Arrow infers them); a local folder is walked
    a folder at a time, each folder's entries sorted, and a link to a folder the listing holds anyway is
    reported (a SkippedEntry) but not entered (see `_listed_already`); a zip's directory, read whole anyway, is
    paged. Nothing under `uri`: no pages."""
    page_entries = page_entries or LIST_PAGE_ENTRIES
    if is_s3(uri):
        yield from _s3_pages(uri, recursive, page_entries)
        return
    fs, root = resolve(uri)
    if is_zip(uri):  # the archive's directory is in memory, and each folder's listing would scan all of it
        infos = sorted(fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True)),
                       key=lambda info: info.path)
        entries = [(join(uri, info.path[len(root):].lstrip("/") if root else info.path), info) for info in infos]
        yield from (entries[i:i + page_entries] for i in range(0, len(entries), page_entries))
        return
    page: list[tuple[str, pafs.FileInfo]] = []
    folders = [root]
    real_root, root_key = os.path.realpath(root), _folder_key(root)
    listed = {root_key} if root_key else set()
    while folders:
        folder = folders.pop()
        infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False, allow_not_found=True))
        infos += _broken_links(folder, {info.path for info in infos})
        below = []
        for info in sorted(infos, key=lambda info: info.path):
            if recursive and info.type == pafs.FileType.Directory:
                if reason := _listed_already(info.path, folder, real_root, listed):
                    info = SkippedEntry(info.path, reason)
                else:
                    below.append(info.path)
            page.append((join(uri, os.path.relpath(info.path, root)), info))
            if len(page) >= page_entries:
                yield page
                page = []
        folders.extend(reversed(below))  # a folder's entries, then its subfolders', in name order
    if page:
        yield page


class SkippedEntry(pafs.FileInfo):
    """An entry that a listing reports but does not enter, with the reason (Arrow's FileInfo has no field for
    one); its type is Unknown, so it is neither a file nor a folder to readers that only look at the type."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, pafs.FileType.Unknown)
        self.reason = reason


def _folder_key(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the folder a path leads to, links followed; None where it cannot be read."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino) if stat.st_ino else None  # 0: the file system gives no identity


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _listed_already(path: str, folder: str, real_root: str, listed: set[tuple[int, int]]) -> str:
    """Why the folder `path` (an entry of `folder`) is not entered in the listing of the root whose real path is
    `real_root`; "" to enter it, its key then added to `listed` (the folders entered so far). A link whose
    target is listed anyway (under its own name, below the root) or holds the link is not entered: a link to
    "." or ".." would list the same files again without end. A link to a folder outside the root is entered,
    once."""
    key = _folder_key(path)
    link = os.path.islink(path)
    if key in listed:
        return "a link to a folder already listed" if link else "a folder already listed under another name"
    if link:
        target = os.path.realpath(path)
        if _within(target, real_root):
            return "a link to a folder already listed"
        if _within(os.path.realpath(folder), target):
            return "a link to a folder above it (a loop)"
    if key is not None:
        listed.add(key)
    return ""


def _s3_pages(uri: str, recursive: bool, page_entries: int) -> Iterator[list[tuple[str, pafs.FileInfo]]]:
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/")
    prefix = f"{prefix}/" if prefix else ""
    client = s3_client()
    request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_entries}
    if not recursive:
        request["Delimiter"] = "/"
    folders: set[str] = set()  # inferred so far; a folder's keys may span pages
    while True:
        try:
            reply = with_retries(lambda: client.list_objects_v2(**request), f"listing {uri}")
        except Exception as exc:
            if _from_aws_sdk(exc):
                raise _s3_error(f"listing {uri}", exc) from exc
            raise
        page = []
        names = [item["Key"][len(prefix):] for item in reply.get("Contents", [])]
        names += [common["Prefix"][len(prefix):] for common in reply.get("CommonPrefixes", [])]
        sizes = [item["Size"] for item in reply.get("Contents", [])]
        for i, rel in enumerate(names):
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth])
                if folder and folder not in folders:
                    folders.add(folder)
                    page.append((f"s3://{bucket}/{prefix}{folder}",
                                 pafs.FileInfo(f"{bucket}/{prefix}{folder}", pafs.FileType.Directory)))
            if rel and not rel.endswith("/"):  # the URI from the key itself: a key may hold "//"
                page.append((f"s3://{bucket}/{prefix}{rel}", pafs.FileInfo(
                    f"{bucket}/{prefix}{rel}", pafs.FileType.File, size=sizes[i] if i < len(sizes) else None)))
        if page:
            yield page
        if not reply.get("IsTruncated"):
            return
        request["ContinuationToken"] = reply["NextContinuationToken"]


def _s3_error(what: str, exc: Exception) -> Exception:
    """An AWS SDK error as the OSError it means, naming what failed."""
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    if code in ("NoSuchBucket", "NoSuchKey", "404"):
        return FileNotFoundError(f"{what}: {exc}")
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AllAccessDisabled") \
            or type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return PermissionError(f"{what}: {exc} (S3 credentials come from the standard AWS chain)")
    return OSError(f"{what}: {exc}")


def list_entries(uri: str, recursive: bool = True) -> list[tuple[str, pafs.FileInfo]]:
    """Everything under a folder (files, folders, broken links), as (URI of the same kind as `uri`, info),
    sorted by URI (`entry_pages`, gathered)."""
    return sorted((entry for page in entry_pages(uri, recursive) for entry in page), key=lambda entry: entry[0])


def _broken_links(folder: str, listed: set[str]) -> list[pafs.FileInfo]:
    """Links to nothing in a local folder, which Arrow's listing leaves out."""
    if not os.path.isdir(folder):
        return []
    with os.scandir(folder) as entries:
        return [pafs.FileInfo(entry.path, pafs.FileType.NotFound) for entry in entries
                if entry.path not in listed and entry.is_symlink() and not os.path.exists(entry.path)]


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """All files under a folder, as URIs of the same kind as `uri`, sorted."""
    return [u for u, info in list_entries(uri, recursive) if info.type == pafs.FileType.File]


# A zip member up to this size is read whole: a compressed member cannot be range-read (a backward seek
# decompresses it again from its start, and a decoder seeks), and on S3 one request beats many small ones.
ZIP_MEMBER_WHOLE_READ_BYTES = 64 << 20


def open_input(uri: str) -> io.RawIOBase:
    """A seekable binary file, so audio can be read by frame range without fetching the whole object."""
    fs, path = resolve(uri)
    if is_zip(uri):
        size = fs.get_file_info(path).size  # from the archive's central directory: no read
        if size is not None and size <= ZIP_MEMBER_WHOLE_READ_BYTES:
            return io.BytesIO(_open_zip(_split_zip(uri)[1], _settings).zip.read(path))
    if is_s3(uri):
        return RetryingInput(lambda: fs.open_input_file(path), uri)
    return fs.open_input_file(path)


def read_bytes(uri: str) -> bytes:
    with open_input(uri) as f:
        return f.read()


def read_torch(uri: str):
    """A file written with torch.save (our own checkpoints and model files), loaded onto the CPU. Only tensors
    and plain values load (`weights_only=True`): a planted pickle cannot run code."""
    import torch  # here, so that storage stays importable without torch's import cost

    return torch.load(io.BytesIO(read_bytes(uri)), map_location="cpu", weights_only=True)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically where the filesystem allows it (temp name, then rename)."""
    _check_writable(uri)
    fs, path = resolve(uri)
    if is_s3(uri):  # an S3 PUT is atomic already
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def write_parquet(frame, uri: str, schema=None) -> None:
    """A pandas DataFrame as one Parquet file, written whole (see write_bytes). A schema keeps the column
    types of empty frames, so the parts of one dataset always share them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), buffer)
    write_bytes(uri, buffer.getvalue())


def read_arrow_table(uri: str, columns: list[str] | None = None):
    """A Parquet file as a pyarrow Table (`columns`: those only). A file that is not readable Parquet, or lacks
    a column, is a ValueError naming it; a failed read stays an OSError (see `refusal`)."""
    import pyarrow.parquet as pq

    data = read_bytes(uri)  # a failed read raises here; past it, whatever the parser says is about the bytes
    try:
        return pq.read_table(io.BytesIO(data), columns=columns)
    except Exception as exc:  # pyarrow calls corrupt data an OSError too
        what = f"not a readable Parquet file{' with columns ' + str(columns) if columns else ''}"
        raise ValueError(f"{uri}: {what} ({type(exc).__name__}: {_one_line(exc)})") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())  # a parser's message may run over lines (pandas ends one with "\n)")


def read_parquet(uri: str, columns: list[str] | None = None):
    """A Parquet file as a pandas DataFrame; errors as `read_arrow_table`'s."""
    return read_arrow_table(uri, columns).to_pandas()


def read_table(uri: str, *, keep_blank_lines: bool = True):
    """A CSV (every cell as text: NA and 0012 are names; with `keep_blank_lines` a blank line is an empty row)
    or Parquet table as a pandas DataFrame. A file that cannot be parsed is a ValueError naming it and saying
    what it is not (pandas and pyarrow name neither), a failed read an OSError."""
    import pandas as pd

    if not uri.lower().endswith(".csv"):
        return read_parquet(uri)
    data = read_bytes(uri)  # a failed read raises here; past it, whatever the parser says is about the bytes
    try:
        return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, skip_blank_lines=not keep_blank_lines)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{uri}: not a readable CSV table: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         "save it as UTF-8") from exc
    except pd.errors.EmptyDataError as exc:
        raise ValueError(f"{uri}: not a readable CSV table: it is empty (no header row)") from exc
    except pd.errors.ParserError as exc:  # its text names the line; the file is ours to name
        raise ValueError(f"{uri}: not a readable CSV table: {_one_line(exc)}") from exc
    except Exception as exc:
        raise ValueError(f"{uri}: not a readable CSV table ({type(exc).__name__}: {_one_line(exc)})") from exc


def _check_writable(uri: str) -> None:
    if is_zip(uri):
        raise ValueError(f"{uri}: zip archives are read-only inputs; write outputs to a folder or s3:// prefix")


def makedirs(uri: str) -> None:
    _check_writable(uri)
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def copy_to_local(uri: str, local_path: str | Path) -> Path:
    """Download a file (or copy a local one, or a zip member) to a local path."""
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    if is_local(uri):
        shutil.copyfile(uri, local_path)
        return local_path
    with open_input(uri) as src, open(local_path, "wb") as dst:
        while chunk := src.read(8 << 20):
            dst.write(chunk)
    return local_path


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder tree to a location (local or S3)."""
    local_dir = Path(local_dir)
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        write_bytes(join(uri, *file.relative_to(local_dir).parts), file.read_bytes())


def storage_path_for_ray(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """Ray Train's (storage_path, storage_filesystem) for an output location."""
    if is_s3(uri):
        fs, path = resolve(uri)
        return path, fs
    return str(Path(uri).expanduser().absolute()), None
