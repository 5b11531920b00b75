"""Shared by the benchmarks: peak memory of this process, its children and the processes of the Ray it is
connected to, sampled while a block of work runs, and the scratch folder for generated data.

Three measures are kept. Summed RSS counts every shared page once per process that maps it (torch's
libraries, Ray's object store mapped in every worker), so it overstates what a set of processes takes.
Summed PSS (a page mapped by n processes counts 1/n in each) splits shared pages with every process of the
machine, other people's included: on a shared machine it understates, and drifts with what else runs (a
loop's PSS went from 843 to 643 MiB between two runs while its RSS stayed at 873). The distinct physical
pages mapped by the set (`unique`, from /proc/PID/pagemap; needs root) count each page once whoever else
maps it: that is what the set costs the machine, and what targets use where it can be read.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

_PAGE = os.sysconf("SC_PAGE_SIZE")
_PRESENT = np.uint64(1 << 63)
_PFN = np.uint64((1 << 55) - 1)


class PeakMemory:
    """`with PeakMemory() as mem: ...` then `mem.peak` (summed RSS, bytes), `mem.peak_pss` (summed PSS) and
    `mem.peak_unique` (distinct pages; None where pagemap gives no frame numbers, i.e. without root).

    RSS is read every `interval` seconds (cheap). PSS and the distinct pages need the kernel to walk each
    process's page tables (PSS about 1 ms per process here, the pages some 10 ms), so they are read every
    `pss_interval` seconds, and not at all with `pss=False` (for timed runs whose speed should not pay)."""

    def __init__(self, interval: float = 0.05, pss_interval: float = 0.5, pss: bool = True,
                 root: psutil.Process | None = None):
        self.root = root  # whose tree to measure: this process by default, or a job started as a subprocess
        self.peak = 0
        self.peak_pss = 0
        self.peak_unique: int | None = 0 if pss else None
        self._outside: list[psutil.Process] = []
        self._scanned = float("-inf")
        self._interval = interval
        self._pss_interval = pss_interval if pss else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def processes(ray_session: bool = True, root: psutil.Process | None = None) -> list[psutil.Process]:
        """`root` (default: this process), its descendants and, with `ray_session`, any process of this
        process's Ray session that is not one of them (a local Ray started by ray.init runs as descendants of
        the process that started it; a Ray started otherwise does not)."""
        me = root or psutil.Process()
        try:
            procs = {p.pid: p for p in [me, *me.children(recursive=True)]}
        except psutil.Error:  # the root exited
            return []
        session = _ray_session_name() if ray_session else None
        if session:
            for p in psutil.process_iter():
                if p.pid in procs:
                    continue
                try:
                    if any(session in arg for arg in p.cmdline()):
                        procs[p.pid] = p
                except psutil.Error:
                    pass
        return list(procs.values())

    @staticmethod
    def total(procs: list[psutil.Process] | None = None) -> int:
        """Summed RSS, bytes."""
        return _summed(procs if procs is not None else PeakMemory.processes(), lambda p: p.memory_info().rss)

    @staticmethod
    def total_pss(procs: list[psutil.Process] | None = None) -> int:
        """Summed PSS, bytes."""
        return _summed(procs if procs is not None else PeakMemory.processes(), lambda p: p.memory_full_info().pss)

    @staticmethod
    def total_unique(procs: list[psutil.Process] | None = None) -> int | None:
        """Bytes of the distinct physical pages that the processes map (each counted once); None where the
        kernel hides frame numbers (without CAP_SYS_ADMIN)."""
        frames = []
        for p in procs if procs is not None else PeakMemory.processes():
            try:
                frames.append(_resident_frames(p.pid))
            except (OSError, ValueError):  # exited, or not ours to read
                pass
        if not frames:
            return 0
        frames = np.concatenate(frames)
        if len(frames) and not frames.any():
            return None
        return int(len(np.unique(frames))) * _PAGE

    def _sample(self, with_pss: bool) -> None:
        # Listing every process of the machine costs more than an RSS sample: the session's processes outside
        # this tree are looked up with each PSS sample (or every second without PSS) and reused in between.
        tree = self.processes(ray_session=False, root=self.root)
        now = time.monotonic()
        if with_pss or now - self._scanned >= 1.0:
            self._scanned = now
            mine = {p.pid for p in tree}
            self._outside = [p for p in self.processes(root=self.root) if p.pid not in mine]
        procs = [*tree, *self._outside]
        self.peak = max(self.peak, self.total(procs))
        if with_pss:
            self.peak_pss = max(self.peak_pss, self.total_pss(procs))
            if self.peak_unique is not None:
                unique = self.total_unique(procs)
                self.peak_unique = None if unique is None else max(self.peak_unique, unique)

    def _run(self) -> None:
        last_pss = time.monotonic()
        while not self._stop.wait(self._interval):
            now = time.monotonic()
            with_pss = self._pss_interval is not None and now - last_pss >= self._pss_interval
            if with_pss:
                last_pss = now
            self._sample(with_pss)

    def __enter__(self) -> PeakMemory:
        self._sample(self._pss_interval is not None)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(self._pss_interval is not None)


# Processes that a local Ray runs whatever the work: its services, agents and monitors, and Ray Data's helper
# actors. Everything else named "ray::" is a worker of the job.
RAY_OWN = ("gcs_server", "raylet", "dashboard.py", "monitor.py", "log_monitor.py", "ray::DashboardAgent",
           "ray::RuntimeEnvAgent", "ray::_StatsActor", "ray::_AutoscalingCoordinatorActor",
           "ray::ActorLocationTracker")


def private_by_role(procs: list[psutil.Process], driver_pid: int) -> dict[str, list[int]]:
    """Each process's private bytes (USS: pages no other process maps), grouped as "driver", "Ray's own" and
    "workers": where a Ray path's memory goes beyond the pages its processes share (torch's libraries)."""
    roles: dict[str, list[int]] = {"driver": [], "Ray's own": [], "workers": []}
    for p in procs:
        try:
            line = " ".join(p.cmdline())
            uss = p.memory_full_info().uss
        except psutil.Error:
            continue
        role = "driver" if p.pid == driver_pid else "Ray's own" if any(n in line for n in RAY_OWN) else "workers"
        roles[role].append(uss)
    return roles


def mib(value: int | None) -> str:
    """Bytes as whole MiB for the benchmarks' tables; "n/a" for a figure that could not be read."""
    return "n/a" if not value else f"{value / 2**20:.0f}"


def describe_roles(roles: dict[str, list[int]]) -> str:
    return "; ".join(f"{name} {sum(sizes) / 2**20:.0f} MiB" + (f" ({len(sizes)} processes)" if len(sizes) > 1 else "")
                     for name, sizes in roles.items() if sizes)


def _summed(procs: list[psutil.Process], measure) -> int:
    total = 0
    for p in procs:
        try:
            total += measure(p)
        except psutil.Error:  # a worker that exited between listing and reading
            pass
    return total


def _resident_frames(pid: int) -> np.ndarray:
    """Page frame numbers of a process's resident pages: its mappings with resident pages (from smaps),
    looked up in its pagemap (bit 63: present; bits 0-54: frame number)."""
    ranges, start, end = [], 0, 0
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            if line.startswith("Rss:"):
                if int(line.split()[1]) > 0:
                    ranges.append((start, end))
            elif not line[0].isupper():  # a mapping's header: "start-end perms offset dev inode [path]"
                first, _, rest = line.partition("-")
                try:
                    start, end = int(first, 16), int(rest.split(" ", 1)[0], 16)
                except ValueError:
                    continue
    out = []
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
        for start, end in ranges:
            pagemap.seek(start // _PAGE * 8)
            entries = np.frombuffer(pagemap.read((end - start) // _PAGE * 8), dtype=np.uint64)
            out.append(entries[(entries & _PRESENT) != 0] & _PFN)
    return np.concatenate(out) if out else np.empty(0, dtype=np.uint64)


def _ray_session_name() -> str | None:
    """The session folder's name of the Ray this process is connected to, which Ray's processes carry in
    their command lines; None without Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        from ray._private.worker import _global_node
    except ImportError:
        return None
    if _global_node is None:
        return None
    return os.path.basename(_global_node.get_session_dir_path())


def scratch_dir(workdir: str | None, prefix: str) -> Path:
    """--workdir when given (kept, so a rerun reuses its generated data); otherwise a temporary folder that is
    removed when the benchmark exits, so runs do not pile up generated audio in /tmp."""
    if workdir:
        return Path(workdir)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, True)
    return work
