"""Shared by the benchmarks: peak resident memory of this process and its children (Ray's workers), sampled
every 50 ms, and the scratch folder for generated data."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil


class PeakMemory:
    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def total() -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.total())
            time.sleep(0.05)

    def __enter__(self):
        self.peak = self.total()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def scratch_dir(workdir: str | None, prefix: str) -> Path:
    """--workdir when given (kept, so a rerun reuses its generated data); otherwise a temporary folder that is
    removed when the benchmark exits, so runs do not pile up generated audio in /tmp."""
    if workdir:
        return Path(workdir)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, True)
    return work
