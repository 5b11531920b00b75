"""One job at a time writes an OUTPUT folder: it holds the folder's lease, OUTPUT/lease.json, while it runs.

The lease names its holder (command, host, pid, start time) and carries a heartbeat that a thread refreshes
while the job runs. Taking it is atomic: locally the file is created with O_CREAT|O_EXCL (its mtime is the
heartbeat); on S3 with a conditional PUT (`If-None-Match: *`), the heartbeat rewriting it conditional on the
ETag of the holder's last write. pyarrow's S3 filesystem cannot make conditional writes, so the lease
goes through boto3 (`storage.s3_client`: the endpoint and region `storage` uses, the standard AWS credential chain).

A lease whose holder is gone is stale and is taken over: on the holder's own host when its process no longer
exists (pid and process start time), anywhere when its heartbeat is older than `stale_after`. Taking over is
atomic too (locally under a flock of the folder, on S3 a PUT conditional on the stale lease's ETag), so of
two jobs recovering one lease only one wins. The lease is released when the job ends, by an exception too.
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


def _holder(command: str) -> dict:
    pid = os.getpid()
    return {"command": command, "host": socket.gethostname(), "pid": pid,
            "pid_started": psutil.Process(pid).create_time(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "heartbeat": time.time(), "token": uuid.uuid4().hex}


def _process_gone(holder: dict) -> bool:
    """The holder ran on this host and its process is gone (or the pid now belongs to another process)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
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

    def remove(self, version: object) -> None:
        with self._exclusive():
            current = self.read()
            if current is not None and current[2] == version:
                os.unlink(self.path)


class _S3Lease:
    def __init__(self, folder: str):
        self.bucket, self.key = storage.split_s3(storage.join(folder, LEASE_FILE))
        self.client = storage.s3_client()

    @staticmethod
    def _precondition_failed(exc: Exception) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
            "PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404")

    def _put(self, holder: dict, **condition) -> object | None:
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(holder).encode(),
                                          ContentType="application/json", **condition)["ETag"]
        except Exception as exc:
            if self._precondition_failed(exc):
                return None
            raise

    def create(self, holder: dict) -> object | None:
        return self._put(holder, IfNoneMatch="*")

    def read(self) -> tuple[dict, float, object] | None:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        try:
            holder = json.loads(got["Body"].read())
        except ValueError:
            holder = {}
        beat = holder.get("heartbeat") if isinstance(holder.get("heartbeat"), (int, float)) else \
            got["LastModified"].timestamp()
        return holder, time.time() - beat, got["ETag"]

    def take_over(self, stale_version: object, holder: dict) -> object | None:
        return self._put(holder, IfMatch=stale_version)

    def refresh(self, version: object, holder: dict) -> object | None:
        return self._put({**holder, "heartbeat": time.time()}, IfMatch=version)

    def remove(self, version: object) -> None:
        current = self.read()
        if current is not None and current[2] == version:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


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
                current = self.store.read()
                self.lost = describe(*current[:2]) if current else "nobody (the lease file was removed)"
                log.error("%s: this job's lease was taken over by %s", self.output, self.lost)
                return
            self.version = version

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if self.lost:
            raise LeaseLost(f"{self.output}: this job's lease was taken over by {self.lost} while it ran; "
                            "outputs written since then may mix with that job's")
        try:
            self.store.remove(self.version)
        except Exception as exc:  # the job's own outcome matters more; a stale lease is recovered later
            log.error("%s: could not release the lease %s (%s)", self.output, self.uri, exc)

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
