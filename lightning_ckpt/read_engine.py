"""Reads a torch zip's storages into memory allocated once, with parallel preads, each range verified as it lands.

Large storages are read around the page cache where they are not in it already: each thread reads
``DIRECT_CHUNK_BYTES`` at a time with ``O_DIRECT`` into its own aligned bounce buffer and copies the exact bytes into
the storage. A cold buffered read fills the page cache with a second copy of the file in memory that is new to the
kernel, which on a VM that hands freed memory back to its host costs as much as the read itself (``benchmarks/
README.md``, profile: load). Chunks the page cache holds already (a file just written, or read before; asked with
``mincore``, which reads nothing) are copied from it instead.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch
import xxhash

from lightning_ckpt import pages
from lightning_ckpt.errors import CheckpointTimeoutError, CorruptCheckpointError
from lightning_ckpt.serialization import storage_view
from lightning_ckpt.manifest import describe_storage
from lightning_ckpt.torch_zip import DIRECT_IO_ALIGNMENT, reopen_direct

# A storage at least this large is read in pieces of PIECE_BYTES by several threads; one of at least BATCH_BYTES is
# read straight into its memory; smaller ones that lie close together in the file are read as one batch (one read
# into the thread's scratch buffer, hashed there while hot, then copied into each storage), at most BATCH_BYTES and
# BATCH_RECORDS per batch.
PIECE_BYTES = 16 << 20
BATCH_BYTES = 4 << 20
BATCH_RECORDS = 4096
_MAX_GAP_BYTES = 64 << 10  # records further apart than this (a partial read skipping others) start a new batch
DEFAULT_READ_THREADS = 4
DIRECT_CHUNK_BYTES = 4 << 20  # one O_DIRECT read into a thread's bounce buffer


@dataclass(slots=True)
class Check:
    """One recorded checksum: the xxh3 of the bytes of ``keys``' storages, concatenated in that order.

    Today's files record one per storage; a format that records one per run of small storages gives several keys.
    Errors name ``name`` if given, else what ``manifest.describe_storage`` makes of the first key and the key
    paths of the tensors on it.
    """

    expected: str
    keys: list[str]
    key_paths: list[tuple] = field(default_factory=list)  # of the tensors on the checked storage, in file order
    name: str | None = None

    def describe(self) -> tuple[str, str]:
        """``(label, key)`` for an error, e.g. ``("tensor 'model.w'", "model.w")`` (built only when one is raised)."""
        if self.name is not None:
            return self.name, self.name
        return describe_storage(self.keys[0], self.key_paths)


@dataclass
class ReadStats:
    """What one read did: bytes read from the file (``direct_bytes`` of them with O_DIRECT, around the page cache;
    whole aligned blocks, so a little more than the records), storages filled, read calls made, seconds."""

    bytes_read: int = 0
    storages: int = 0
    reads: int = 0
    seconds: float = 0.0
    direct_bytes: int = 0


@dataclass(slots=True)
class _Segment:
    key: str
    start: int  # offset in the storage
    length: int
    file_offset: int
    check: int | None = None  # index of the check it belongs to
    done: bool = False


@dataclass(slots=True)
class _Progress:
    """How far one check has hashed (segments must be hashed in order)."""

    segments: list[_Segment] = field(default_factory=list)
    next: int = 0
    hasher: object = None


class StorageReader:
    """Fills one fresh storage per wanted record of an opened torch zip, several reads in flight, hashing as it goes.

    Reads go to the file descriptor given (the file opened once), one ``os.preadv`` per task, and the thread that
    read a range hashes it at once while it is hot in cache (xxhash and ``preadv`` both release the GIL, so the
    hashing overlaps the other threads' reads). ``storages`` is usable right
    after ``start``, before the bytes arrive, so the pickle can be loaded while the reads run.

    Args:
        fd: the open file.
        path: the file's name, for errors.
        spans: ``{storage key: (file offset, size)}`` of the records to read.
        checks: the checksums to verify (each over one or more of those keys, in order).
        threads: reads in flight.
        destinations: storages to read some keys into (of their exact size) instead of new ones.
        direct_io: read large storages' uncached bytes with O_DIRECT (see the module docstring) where the
            filesystem allows it.
    """

    def __init__(self, fd: int, path: str, spans: dict[str, tuple[int, int]], checks: list[Check],
                 threads: int = DEFAULT_READ_THREADS,
                 destinations: dict[str, torch.UntypedStorage] | None = None, direct_io: bool = True) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.fd, self.path, self.threads = fd, path, threads
        self._direct_io = direct_io
        self._direct_fd: int | None = None  # opened by start, closed once the workers are done
        self._residency: pages.FileResidency | None = None  # with the direct descriptor: what is cached
        self._direct_ok = True  # False once an O_DIRECT read is refused
        into = destinations or {}
        for key, storage in into.items():
            if storage.nbytes() != spans[key][1]:
                raise ValueError(f"destination for {key!r} holds {storage.nbytes()} bytes, the record {spans[key][1]}")
        self.storages = {key: into[key] if key in into else torch.UntypedStorage(size)
                         for key, (_, size) in spans.items()}
        self._fresh = {key for key in spans if key not in into}  # new memory: faulted in ahead of each read
        self.stats = ReadStats(storages=len(spans))
        segments = _segments(spans)
        self._progress = _attach_checks(segments, checks, spans)
        self._checks = checks
        self._tasks = _batches(segments)
        self._next_task = 0
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._workers: list = []
        self._t0 = 0.0

    def start(self) -> StorageReader:
        """Start the reads (returns at once)."""
        self._t0 = time.perf_counter()
        for i, p in enumerate(self._progress):
            if p is not None and not p.segments:
                self._compare(i, xxhash.xxh3_64_hexdigest(b""))
        if not self._tasks:
            return self
        if self._direct_io and any(len(t) == 1 and t[0].length >= BATCH_BYTES for t in self._tasks):
            self._direct_fd = reopen_direct(self.fd)
            if self._direct_fd is not None:
                self._residency = pages.FileResidency(self.fd, os.fstat(self.fd).st_size)
        n = min(self.threads, len(self._tasks))
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="lightning_ckpt-read")
        self._workers = [self._pool.submit(self._work) for _ in range(n)]
        return self

    def finish(self, timeout_secs: float) -> ReadStats:
        """Wait for every read and check; raises the first failure (CorruptCheckpointError, OSError).

        Raises:
            CheckpointTimeoutError: the reads did not end within ``timeout_secs``.
        """
        deadline = time.monotonic() + timeout_secs
        try:
            for w in self._workers:
                w.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout as e:
            self.cancel()
            raise CheckpointTimeoutError(f"reading {self.path} took longer than {timeout_secs} s") from e
        except BaseException:  # KeyboardInterrupt while waiting: the queued reads are dropped, not waited for
            self.cancel()
            raise
        finally:
            self._shutdown()
        if self._error is not None:
            raise self._error
        unchecked = [c for c, p in zip(self._checks, self._progress) if p is not None and p.next < len(p.segments)]
        if unchecked:  # a bug, never a file's fault: every segment of every check was read
            raise AssertionError(f"checks never completed: {[c.describe()[0] for c in unchecked[:3]]}")
        self.stats.seconds = time.perf_counter() - self._t0
        return self.stats

    def cancel(self) -> None:
        """Stop handing out reads and wait for the ones in flight (the storages are then to be dropped)."""
        with self._lock:
            self._next_task = len(self._tasks)
        self._shutdown()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None
            self._residency.close()

    def _work(self) -> None:
        scratch: memoryview | None = None  # this thread's batch buffer, allocated once
        bounce: mmap.mmap | None = None  # this thread's O_DIRECT buffer (page-aligned), allocated once
        while True:
            with self._lock:
                if self._error is not None or self._next_task >= len(self._tasks):
                    return
                task = self._tasks[self._next_task]
                self._next_task += 1
            try:
                if len(task) == 1 and task[0].length >= BATCH_BYTES:
                    if bounce is None and self._direct_fd is not None:
                        bounce = mmap.mmap(-1, DIRECT_CHUNK_BYTES + DIRECT_IO_ALIGNMENT)
                    self._read_direct(task[0], bounce)
                else:
                    if scratch is None:
                        scratch = memoryview(bytearray(BATCH_BYTES))
                    self._read_batch(task, scratch)
            except BaseException as e:  # the first failure ends every worker and is raised by finish
                with self._lock:
                    if self._error is None:
                        self._error = e
                return

    def _pread(self, buffer: memoryview, offset: int, key: str) -> None:
        got = 0
        while got < buffer.nbytes:  # a read may return short (signals, huge requests): go on where it stopped
            n = os.preadv(self.fd, [buffer[got:]], offset + got)
            if n == 0:
                raise CorruptCheckpointError(f"corrupt checkpoint {self.path}: record data/{key} is truncated",
                                             path=self.path, key=f"data/{key}")
            got += n
        with self._lock:
            self.stats.reads += 1
            self.stats.bytes_read += got

    def _read_direct(self, seg: _Segment, bounce: mmap.mmap | None) -> None:
        """A large storage (or a piece of one): read into its memory (through ``bounce`` where uncached), hashed
        there as each chunk lands."""
        storage = self.storages[seg.key]
        if seg.key in self._fresh:
            pages.populate_write(storage.data_ptr() + seg.start, seg.length)
        view = storage_view(storage)[seg.start:seg.start + seg.length]
        if bounce is None or self._direct_fd is None:
            self._pread(view, seg.file_offset, seg.key)
            self._verify(seg, view)
            return
        alone = seg.check is not None and self._progress[seg.check] is None  # a check of this one range
        hasher = xxhash.xxh3_64() if alone else None
        address = storage.data_ptr() + seg.start
        pos = 0
        while pos < seg.length:
            chunk = view[pos:pos + DIRECT_CHUNK_BYTES]
            n = 0
            if self._direct_ok and not self._residency.cached(seg.file_offset + pos, chunk.nbytes):
                n = self._read_uncached(address + pos, seg.length - pos, seg.file_offset + pos, seg.key, bounce)
            if n == 0:  # cached (a copy from memory), or O_DIRECT refused
                self._pread(chunk, seg.file_offset + pos, seg.key)
                n = chunk.nbytes
            if hasher is not None:
                hasher.update(view[pos:pos + n])  # just copied: hot in cache
            pos += n
        if hasher is not None:
            self._compare(seg.check, hasher.hexdigest())
        else:
            self._verify(seg, view)

    def _read_uncached(self, address: int, nbytes: int, offset: int, key: str, bounce: mmap.mmap) -> int:
        """Read up to ``DIRECT_CHUNK_BYTES`` at ``offset`` with O_DIRECT: the aligned blocks around it go into
        ``bounce``, the bytes wanted are copied to ``address``. Returns how many were copied."""
        start = offset // DIRECT_IO_ALIGNMENT * DIRECT_IO_ALIGNMENT
        want = min(nbytes, DIRECT_CHUNK_BYTES - (offset - start))
        end = -(-(offset + want) // DIRECT_IO_ALIGNMENT) * DIRECT_IO_ALIGNMENT
        try:
            got = os.preadv(self._direct_fd, [memoryview(bounce)[:end - start]], start)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._direct_ok = False  # opened, but the device wants another alignment: plain reads from here on
            return 0
        usable = min(want, got - (offset - start))
        if usable <= 0:
            raise CorruptCheckpointError(f"corrupt checkpoint {self.path}: record data/{key} is truncated",
                                         path=self.path, key=f"data/{key}")
        ctypes.memmove(address, ctypes.addressof(ctypes.c_char.from_buffer(bounce)) + (offset - start), usable)
        with self._lock:
            self.stats.reads += 1
            self.stats.bytes_read += got
            self.stats.direct_bytes += got
        return usable

    def _read_batch(self, task: list[_Segment], scratch: memoryview) -> None:
        """Neighbouring small storages: one read of their span (headers between them included) into ``scratch``,
        each hashed from there and copied into its storage."""
        base = task[0].file_offset
        span = scratch[:task[-1].file_offset + task[-1].length - base]
        self._pread(span, base, task[-1].key)
        address = ctypes.addressof(ctypes.c_char.from_buffer(span))
        for seg in task:
            at = seg.file_offset - base
            ctypes.memmove(self.storages[seg.key].data_ptr() + seg.start, address + at, seg.length)
            self._verify(seg, span[at:at + seg.length])

    def _verify(self, seg: _Segment, data: memoryview) -> None:
        if seg.check is None:
            return
        progress = self._progress[seg.check]
        if progress is None:  # a check of this one range: only this thread ever touches it
            self._compare(seg.check, xxhash.xxh3_64_hexdigest(data))
            return
        with self._lock:
            seg.done = True
        self._advance(seg.check, progress)

    def _advance(self, index: int, progress: _Progress) -> None:
        with self._lock:  # segments of one check are hashed in order, by whichever thread finds the next one ready
            while progress.next < len(progress.segments) and progress.segments[progress.next].done:
                s = progress.segments[progress.next]
                if progress.hasher is None:
                    progress.hasher = xxhash.xxh3_64()
                progress.hasher.update(storage_view(self.storages[s.key])[s.start:s.start + s.length])
                progress.next += 1
            if progress.next == len(progress.segments):
                self._compare(index, progress.hasher.hexdigest() if progress.hasher else xxhash.xxh3_64_hexdigest(b""))

    def _compare(self, index: int, actual: str) -> None:
        check = self._checks[index]
        if actual != check.expected:
            label, key = check.describe()
            raise CorruptCheckpointError(
                f"corrupt checkpoint {self.path}: {label} checksum mismatch (expected {check.expected}, "
                f"got {actual})", path=self.path, key=key, expected=check.expected, actual=actual)


def _segments(spans: dict[str, tuple[int, int]]) -> list[_Segment]:
    """Every storage as one segment, or pieces of ``PIECE_BYTES`` when large, in file order."""
    out = []
    for key, (offset, size) in sorted(spans.items(), key=lambda kv: kv[1][0]):
        if size == 0:
            continue  # nothing to read; its check (of no bytes) is compared at start
        if size < 2 * PIECE_BYTES:
            out.append(_Segment(key, 0, size, offset))
            continue
        out += [_Segment(key, start, min(PIECE_BYTES, size - start), offset + start)
                for start in range(0, size, PIECE_BYTES)]
    return out


def _attach_checks(segments: list[_Segment], checks: list[Check],
                   spans: dict[str, tuple[int, int]]) -> list[_Progress | None]:
    """Marks each segment with its check; a check over more than one segment (or none) gets a ``_Progress``."""
    by_key: dict[str, list[_Segment]] = {}
    for seg in segments:
        found = by_key.get(seg.key)
        if found is None:
            by_key[seg.key] = [seg]
        else:
            found.append(seg)
    progress: list[_Progress | None] = [None] * len(checks)
    for i, check in enumerate(checks):
        for key in check.keys:
            if key not in spans:
                raise ValueError(f"check {check.describe()[0]} names storage {key!r}, which is not read")
        if len(check.keys) == 1:
            segs = by_key.get(check.keys[0])
            if segs is not None and len(segs) == 1:
                segs[0].check = i
                continue
        p = progress[i] = _Progress()
        for key in check.keys:
            for seg in by_key.get(key, ()):
                seg.check = i
                p.segments.append(seg)
    return progress


def _batches(segments: list[_Segment]) -> list[list[_Segment]]:
    """Group neighbouring small segments into one read each; a piece of a large storage is a read of its own."""
    tasks: list[list[_Segment]] = []
    current: list[_Segment] = []
    for seg in segments:
        if current:
            first, last = current[0], current[-1]
            gap = seg.file_offset - (last.file_offset + last.length)
            span = seg.file_offset + seg.length - first.file_offset
            if (seg.length >= BATCH_BYTES or gap > _MAX_GAP_BYTES or span > BATCH_BYTES
                    or len(current) >= BATCH_RECORDS):
                tasks.append(current)
                current = []
        current.append(seg)
        if seg.length >= BATCH_BYTES:
            tasks.append(current)
            current = []
    if current:
        tasks.append(current)
    return tasks
