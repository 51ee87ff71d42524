"""Host-memory sampler: a background thread that records the memory of this process and its children every ~10 ms.

Two figures are tracked per sample (both in bytes):

* ``rss``  - the sum of RSS over this process and all its descendants (what ``ps`` shows; counts a shared-memory page
  once per process that maps it, and counts shared libraries of every child).
* ``host`` - the de-duplicated figure used for the targets: the sum of anonymous RSS (``RssAnon``) over the same
  processes plus the growth of system-wide shared memory (``Shmem`` in /proc/meminfo) since the sampler started. A
  shared-memory staging buffer mapped by both the trainer and a writer process is counted once, and a leaked /dev/shm
  segment that nobody maps is still counted.

Only Linux /proc files are read (cheap: no page-table walks), so sampling does not disturb the timed code.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is in the "bench" extra
    psutil = None


@dataclass
class Sample:
    """One reading, in bytes."""

    rss: int
    host: int


def _status_fields(pid: int) -> tuple[int, int]:
    """``(VmRSS, RssAnon)`` of a process in bytes from /proc/<pid>/status (zeros if it is gone)."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    return rss, anon


def _meminfo_shmem() -> int:
    """System-wide ``Shmem`` in bytes from /proc/meminfo (0 if unavailable)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"Shmem:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def available() -> bool:
    """Whether the sampler can work here (Linux /proc plus psutil for child discovery)."""
    return psutil is not None and os.path.exists("/proc/self/status")


class MemorySampler:
    """Samples host memory of this process tree in a daemon thread.

    Use ``start()``, then ``window()`` to get the peak since the previous ``window()`` (or start), and ``stop()``.
    ``baseline()`` reads the current value synchronously.
    """

    def __init__(self, interval_s: float = 0.01, children_every: int = 5) -> None:
        self.interval_s = interval_s
        self.children_every = children_every
        self._pids: list[int] = [os.getpid()]
        self._shmem0 = _meminfo_shmem()
        self._lock = threading.Lock()
        self._peak = Sample(0, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.n_samples = 0

    def _refresh_children(self) -> None:
        if psutil is None:
            return
        try:
            kids = psutil.Process(os.getpid()).children(recursive=True)
            self._pids = [os.getpid(), *(k.pid for k in kids)]
        except Exception:
            self._pids = [os.getpid()]

    def read(self) -> Sample:
        """One synchronous reading of the whole process tree."""
        rss = anon = 0
        for pid in self._pids:
            r, a = _status_fields(pid)
            rss += r
            anon += a
        return Sample(rss=rss, host=anon + max(0, _meminfo_shmem() - self._shmem0))

    def baseline(self) -> Sample:
        """Current reading, after refreshing the list of child processes."""
        self._refresh_children()
        return self.read()

    def _loop(self) -> None:
        i = 0
        while not self._stop.is_set():
            if i % self.children_every == 0:
                self._refresh_children()
            s = self.read()
            with self._lock:
                self._peak = Sample(max(self._peak.rss, s.rss), max(self._peak.host, s.host))
            self.n_samples += 1
            i += 1
            self._stop.wait(self.interval_s)

    def start(self) -> "MemorySampler":
        """Start the sampling thread (idempotent)."""
        if self._thread is None:
            self._peak = self.baseline()
            self._thread = threading.Thread(target=self._loop, name="mem-sampler", daemon=True)
            self._thread.start()
        return self

    def window(self) -> Sample:
        """Peak since the previous ``window()`` call (or since ``start()``), including a reading taken now."""
        now = self.read()
        with self._lock:
            peak = Sample(max(self._peak.rss, now.rss), max(self._peak.host, now.host))
            self._peak = now
        return peak

    def stop(self) -> None:
        """Stop the sampling thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
