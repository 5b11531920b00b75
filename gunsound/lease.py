"""One job at a time writes an OUTPUT folder: it holds the folder's lease, OUTPUT/lease.json, while it runs.

The lease names its holder (command, host, pid, start time) and carries a heartbeat that a thread refreshes
while the job runs. Taking it is atomic: locally the file is created with O_CREAT|O_EXCL (its mtime is the
heartbeat); on S3 with a conditional PUT (`If-None-Match: *`), the heartbeat rewriting it conditional on the
ETag of the holder's last write. pyarrow's S3 filesystem cannot make conditional writes, so the lease
goes through boto3 (`storage.s3_client`: the endpoint and region `storage` uses, the standard AWS credential chain).

A lease whose holder is gone is stale and is taken over: where the holder's pid means the same process as here
(same host, boot and pid namespace) when that process no longer exists (pid and process start time), anywhere
when its heartbeat is older than `stale_after`. Taking over is atomic too (locally under a flock of the folder,
on S3 a PUT conditional on the stale lease's ETag), so of two jobs recovering one lease only one wins. The
lease is released when the job ends, by an exception too.

On S3 a lease is ours when it carries our token: a conditional PUT that S3 applied but whose response was lost
is resent by botocore and fails its own condition, so a failed condition is followed by reading the lease back.
A store that ignores the conditions guards nothing: taking the lease checks that it refuses a second
conditional PUT, and each heartbeat reads the lease back. Errors of the lease's S3 calls are LeaseStoreError
(an OSError) naming the lease's URI and the S3 error code.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psutil

from gunsound import storage

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
HEARTBEAT_S = 30.0
# A holder on another host is presumed gone after this long without a heartbeat (ten missed beats).
STALE_AFTER_S = 300.0


class LeaseHeld(Exception):
    """Another job holds OUTPUT's lease."""


class LeaseLost(RuntimeError):
    """The lease was taken over while this job held it (its heartbeat had stopped for longer than allowed)."""


class LeaseStoreError(OSError):
    """The store of OUTPUT's lease failed a call, or cannot guard the lease (it ignores conditional writes)."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _process_view() -> dict:
    """What a pid means here: containers with host networking share the hostname but not the pid namespace,
    and a namespace's inode repeats from boot to boot and host to host (the initial one's is fixed)."""
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid_namespace": _pid_namespace()}


def _holder(command: str) -> dict:
    pid = os.getpid()
    return {"command": command, **_process_view(), "pid": pid,
            "pid_started": psutil.Process(pid).create_time(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "heartbeat": time.time(), "token": uuid.uuid4().hex}


def _same_process_view(holder: dict) -> bool:
    """The holder's pid names a process this one can look at. A lease written before these fields were is not
    the same (the heartbeat's age decides, as for another host); where the system has no /proc (macOS) both
    sides record no boot id or namespace, and the host alone tells."""
    return all(key in holder and holder[key] == value for key, value in _process_view().items())


def _process_gone(holder: dict) -> bool:
    """The holder ran where its pid means what it means here, and its process is gone (or the pid now belongs
    to another process)."""
    if not _same_process_view(holder) or not isinstance(holder.get("pid"), int):
        return False
    try:
        started = psutil.Process(holder["pid"]).create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # not ours to inspect: alive
        return False
    return abs(started - float(holder.get("pid_started", started))) > 1.0


def describe(holder: dict, age: float) -> str:
    return (f"{holder.get('command', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')}, last heartbeat {age:.0f} s ago)")


class _LocalLease:
    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LEASE_FILE)

    @contextlib.contextmanager
    def _exclusive(self):
        """A flock of the folder: taking over, refreshing and removing the lease exclude one another."""
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def create(self, holder: dict) -> object | None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(holder))
        return holder["token"]

    def read(self) -> tuple[dict, float, object] | None:
        """(holder, seconds since its heartbeat, version) or None when there is no lease."""
        try:
            with open(self.path) as f:
                text = f.read()
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:  # being written this instant, or cut short by a crash: judged by its age alone
            holder = {}
        return holder, age, holder.get("token")

    def take_over(self, stale_version: object, holder: dict) -> object | None:
        with self._exclusive():
            current = self.read()
            if current is not None:
                if current[2] != stale_version:  # someone else took it over first
                    return None
                os.unlink(self.path)
            return self.create(holder)

    def refresh(self, version: object, holder: dict) -> object | None:
        with self._exclusive():
            current = self.read()
            if current is None or current[2] != version:
                return None
            os.utime(self.path)
            return version

    def remove(self, version: object, holder: dict) -> None:
        with self._exclusive():
            current = self.read()
            if current is not None and current[2] == version:
                os.unlink(self.path)


# A failed condition, or no lease to match (its key is gone): the answer is "not ours", not an error.
_CONDITION_FAILED = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404")
_NOT_IMPLEMENTED = ("NotImplemented", "501")
_VERB = {"put_object": "write", "get_object": "read", "delete_object": "delete"}
# An ETag no object has: a PUT conditional on it must fail on a store that enforces If-Match.
_NO_ETAG = '"' + "0" * 32 + '"'


class _S3Lease:
    def __init__(self, folder: str):
        self.folder = folder
        self.uri = storage.join(folder, LEASE_FILE)
        self.bucket, self.key = storage.split_s3(self.uri)
        self.client = storage.s3_client()

    @contextlib.contextmanager
    def _errors(self, method: str):
        """boto3's errors as LeaseStoreError naming the lease and the S3 error code."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "?"))
            raise LeaseStoreError(f"{self.uri}: could not {_VERB[method]} the output's lease on S3: {code} "
                                  f"({error.get('Message', exc)})", code) from exc
        except BotoCoreError as exc:
            code = type(exc).__name__
            raise LeaseStoreError(f"{self.uri}: could not {_VERB[method]} the output's lease on S3: {code} "
                                  f"({exc})", code) from exc

    def _call(self, method: str, **params) -> dict | None:
        """client.<method> on the lease's key; None when its condition failed or the key is absent."""
        from botocore.exceptions import ClientError

        with self._errors(method):
            try:
                return getattr(self.client, method)(Bucket=self.bucket, Key=self.key, **params)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _CONDITION_FAILED:
                    return None
                raise

    def _put(self, holder: dict, **condition) -> dict | None:
        return self._call("put_object", Body=json.dumps(holder).encode(), ContentType="application/json",
                          **condition)

    def _ours(self, holder: dict) -> object | None:
        """The lease's ETag when it carries our token (a write of ours whose response was lost included)."""
        current = self.read()
        if current is not None and current[0].get("token") == holder["token"]:
            return current[2]
        return None

    def _write(self, holder: dict, **condition) -> object | None:
        put = self._put(holder, **condition)
        # botocore resends a PUT whose response was lost; if S3 had applied it, the resend fails its own condition
        return put["ETag"] if put is not None else self._ours(holder)

    def _check_guarded(self, holder: dict) -> None:
        """Refuse a store that ignores If-None-Match / If-Match: it would let two jobs hold the lease. Both probes
        write the lease's own body, so a store that lets them through changes nothing but its ETag."""
        for header, condition in (("If-None-Match", {"IfNoneMatch": "*"}), ("If-Match", {"IfMatch": _NO_ETAG})):
            if self._put(holder, **condition) is not None:
                with contextlib.suppress(LeaseStoreError):  # the refusal matters more than a lease left behind
                    self.remove(None, holder)
                raise LeaseStoreError(
                    f"{self.uri}: the S3 store at {self.client.meta.endpoint_url or 'AWS'} ignores {header} on "
                    f"PutObject, so it cannot keep two jobs from writing {self.folder} at once; write outputs to "
                    "a store that enforces conditional writes (AWS S3 does), or to a local folder")

    def create(self, holder: dict) -> object | None:
        version = self._write(holder, IfNoneMatch="*")
        if version is not None:
            self._check_guarded(holder)
        return version

    def read(self) -> tuple[dict, float, object] | None:
        got = self._call("get_object")
        if got is None:
            return None
        with self._errors("get_object"):
            body = got["Body"].read()
        try:
            holder = json.loads(body)
        except ValueError:
            holder = {}
        beat = holder.get("heartbeat") if isinstance(holder.get("heartbeat"), (int, float)) else \
            got["LastModified"].timestamp()
        return holder, time.time() - beat, got["ETag"]

    def take_over(self, stale_version: object, holder: dict) -> object | None:
        version = self._write(holder, IfMatch=stale_version)
        if version is not None:
            self._check_guarded(holder)
        return version

    def refresh(self, version: object, holder: dict) -> object | None:
        if self._write({**holder, "heartbeat": time.time()}, IfMatch=version) is None:
            return None
        # Read back: another job's write landing on ours (a store letting a stale If-Match through) shows here
        return self._ours(holder)

    def remove(self, version: object, holder: dict) -> None:
        """Ours by its token rather than `version`: a heartbeat that failed after S3 applied it leaves the ETag we
        hold behind the lease's."""
        etag = self._ours(holder)
        if etag is None:
            return
        try:
            self._call("delete_object", IfMatch=etag)  # a lease taken over since we read it is not ours to remove
        except LeaseStoreError as exc:
            if exc.code not in _NOT_IMPLEMENTED:
                raise
            self._call("delete_object")  # a store without conditional deletes: ours a moment ago


class OutputLease:
    """`with OutputLease(output, "gunsound score"):` holds OUTPUT's lease for the block, or raises LeaseHeld
    naming the job that holds it. Raises LeaseLost on leaving the block if another job took it over meanwhile."""

    def __init__(self, output: str, command: str, *, stale_after: float = STALE_AFTER_S,
                 heartbeat_s: float = HEARTBEAT_S):
        if storage.is_zip(output):
            raise ValueError(f"{output}: zip archives are read-only inputs; write outputs to a folder or s3:// prefix")
        self.output, self.command = output, command
        self.stale_after, self.heartbeat_s = stale_after, heartbeat_s
        self.uri = storage.join(output, LEASE_FILE)
        self.store = _S3Lease(output) if storage.is_s3(output) else _LocalLease(str(Path(output).absolute()))
        self.holder: dict = {}
        self.version: object | None = None
        self.lost: str = ""
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        if storage.is_local(self.output):
            Path(self.output).mkdir(parents=True, exist_ok=True)
        self.holder = _holder(self.command)
        for _ in range(3):  # a lease released or taken over between our steps: look again
            self.version = self.store.create(self.holder)
            if self.version is not None:
                break
            current = self.store.read()
            if current is None:
                continue
            holder, age, version = current
            gone = _process_gone(holder)
            if not gone and age <= self.stale_after:
                raise LeaseHeld(f"{self.output} is in use by {describe(holder, age)}; wait for it to end, or "
                                f"score/train into another folder (a lease with no live holder is recovered "
                                f"after {self.stale_after:.0f} s; its file is {self.uri})")
            why = "its process is gone" if gone else f"no heartbeat for {age:.0f} s"
            self.version = self.store.take_over(version, self.holder)
            if self.version is not None:
                log.warning("%s: recovered the lease of %s: %s", self.output, describe(holder, age), why)
                break
        else:
            raise LeaseHeld(f"{self.output}: another job is taking its lease at the same time ({self.uri})")
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="output-lease", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                version = self.store.refresh(self.version, self.holder)
            except Exception as exc:  # a store hiccup: the next beat tries again
                log.warning("%s: lease heartbeat failed (%s)", self.output, exc)
                continue
            if version is None:
                self.lost = self._taker()
                log.error("%s: this job's lease was taken over by %s", self.output, self.lost)
                return
            self.version = version

    def _taker(self) -> str:
        try:
            current = self.store.read()
        except Exception as exc:  # lost all the same: the job must hear of it
            return f"another job (its lease {self.uri} could not be read: {exc})"
        return describe(*current[:2]) if current else "nobody (the lease file was removed)"

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if self.lost:
            raise LeaseLost(f"{self.output}: this job's lease was taken over by {self.lost} while it ran; "
                            "outputs written since then may mix with that job's")
        try:
            self.store.remove(self.version, self.holder)
        except Exception as exc:  # the job's own outcome matters more; a stale lease is recovered later
            log.error("%s: could not release the lease %s (%s)", self.output, self.uri, exc)

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
