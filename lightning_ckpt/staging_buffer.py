"""Staging memory: the shared-memory buffers staged tensors are carved from, and the pool that reuses them."""

from __future__ import annotations

import gc
import logging
import mmap
import os
import threading
import time
import weakref
from typing import Any, Callable

import torch

from lightning_ckpt import pages
from lightning_ckpt.errors import CheckpointError, CheckpointTimeoutError
from lightning_ckpt.picklable import PicklableBeforeUse

log = logging.getLogger(__name__)


def accelerator_available() -> bool:
    return torch.cuda.is_available()


class StagingBufferTooLarge(CheckpointError):
    """A state needs more staging memory than the budget or the memory left allows (the message names both)."""


class StagingBuffer:
    """One contiguous region, anonymous shared memory (memfd) or private, that staged tensors are carved from.

    A memfd vanishes with the last descriptor or mapping, so a crash never leaves a ``/dev/shm`` entry behind; a
    buffer dropped without ``close`` gives back its descriptor, mapping and CUDA registration when collected.
    """

    _ids = iter(range(1, 1 << 62))

    def __init__(self, nbytes: int, *, shared: bool, pinned: bool) -> None:
        self.id = next(StagingBuffer._ids)
        self.nbytes = nbytes
        self.users = 0
        self.caller_holds = 0  # holds that their caller gives back (a write in flight), so worth waiting for
        fd = None
        if shared:
            fd = os.memfd_create(f"lightning_ckpt-staging-{self.id}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, nbytes)
                self._mmap = mmap.mmap(fd, nbytes)
            except BaseException:
                os.close(fd)  # no descriptor outlives a failed allocation
                raise
        else:
            self._mmap = mmap.mmap(-1, nbytes)
        self._memory = _Memory(self.id, self._mmap, fd)
        self._finalizer = weakref.finalize(self, self._memory.release)
        self._finalizer.atexit = False  # the process's exit frees it all
        self.base = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self.address = self.base.data_ptr()
        if pinned and accelerator_available():
            err = torch.cuda.cudart().cudaHostRegister(self.address, nbytes, 0)
            if int(err) == 0:
                self._memory.pinned_address = self.address
            else:
                log.warning("cudaHostRegister failed (%s); staging buffer %d stays pageable", err, self.id)

    @property
    def fd(self) -> int | None:
        """The memfd (None: private memory, or closed)."""
        return self._memory.fd

    @property
    def pinned(self) -> bool:
        return self._memory.pinned_address is not None

    @property
    def range(self) -> tuple[int, int]:
        return self.address, self.address + self.nbytes

    def tensor(self, offset: int, nbytes: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        """A tensor whose own storage is exactly ``[offset, offset+nbytes)`` of this buffer."""
        flat = torch.frombuffer(self._mmap, dtype=torch.uint8, count=nbytes, offset=offset)
        return flat.view(dtype).view(shape)

    def prefault(self) -> None:
        """Fault every page in now, so that the first copy into this buffer does not: one
        ``MADV_POPULATE_WRITE`` where the kernel has it, else one byte written per page.

        Both release the GIL: run from a background thread, training goes on meanwhile."""
        if self.base is not None and self.nbytes and not pages.populate_write(self.address, self.nbytes):
            self.base[::mmap.PAGESIZE].fill_(0)

    def forget_pinning(self) -> None:
        """In a forked child: CUDA did not survive the fork, so there is no registration to undo here."""
        self._memory.pinned_address = None

    def close(self) -> None:
        if self.base is None:
            return
        self.base = None  # our own view goes first, so that the mapping can be closed now
        self._finalizer()


class _Memory:
    """What a ``StagingBuffer`` holds outside Python's heap, released once by its ``close`` or its finalizer
    (which must not reference the buffer itself)."""

    def __init__(self, buffer_id: int, mapping: mmap.mmap, fd: int | None) -> None:
        self.buffer_id = buffer_id
        self.mapping = mapping
        self.fd = fd
        self.pinned_address: int | None = None

    def release(self) -> None:
        if self.pinned_address is not None:
            torch.cuda.cudart().cudaHostUnregister(self.pinned_address)
            self.pinned_address = None
        try:
            self.mapping.close()
        except BufferError:
            # A staged tensor still references the mapping; it is unmapped when that tensor dies.
            log.debug("staging buffer %d still referenced at close; leaving the mapping to the GC", self.buffer_id)
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


CGROUP_ROOT = "/sys/fs/cgroup"
PROC_MEMINFO = "/proc/meminfo"
PROC_SELF_CGROUP = "/proc/self/cgroup"
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a huge number
HEADROOM_FRACTION = 0.9  # of the memory left that one new staging buffer may take


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) < _UNLIMITED else None


def _meminfo_available() -> int | None:
    try:
        with open(PROC_MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_dirs() -> list[tuple[str, str, str]]:
    """(directory, limit file, usage file) of this process's memory cgroup, v2 then v1, most specific first."""
    dirs = []
    try:
        with open(PROC_SELF_CGROUP) as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":
                    dirs.append((os.path.join(CGROUP_ROOT, path.lstrip("/")), "memory.max", "memory.current"))
                elif "memory" in controllers.split(","):
                    dirs.append((os.path.join(CGROUP_ROOT, "memory", path.lstrip("/")), "memory.limit_in_bytes",
                                 "memory.usage_in_bytes"))
    except (OSError, ValueError):
        pass
    dirs += [(CGROUP_ROOT, "memory.max", "memory.current"),
             (os.path.join(CGROUP_ROOT, "memory"), "memory.limit_in_bytes", "memory.usage_in_bytes")]
    return dirs


def memory_headroom() -> tuple[int | None, str]:
    """Bytes this process can still allocate, and where that figure comes from (None: nothing says).

    The smaller of ``MemAvailable`` and the cgroup's limit minus its usage (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``).
    """
    found: list[tuple[int, str]] = []
    available = _meminfo_available()
    if available is not None:
        found.append((available, f"MemAvailable in {PROC_MEMINFO}"))
    for directory, limit_name, usage_name in _cgroup_dirs():
        limit = _read_int(os.path.join(directory, limit_name))
        if limit is not None:
            usage = _read_int(os.path.join(directory, usage_name)) or 0
            found.append((max(0, limit - usage), f"cgroup limit {limit} in {os.path.join(directory, limit_name)} "
                                                 f"minus usage {usage}"))
            break
    return min(found) if found else (None, "no memory limit found")


class BufferPool(PicklableBeforeUse):
    """The staging buffers of one stager: reused when free, bounded by count, budget and the memory left.

    A buffer is free when every hold on it was given back. Holds that their caller gives back (a write in flight)
    are waited for when ``max_buffers`` is reached; holds that end with a staged dict's life are not (nobody
    promises to drop it), so more buffers are allocated instead, within the budget.
    """

    def __init__(self, config: Any, max_buffers: int, on_reuse: Callable[[StagingBuffer], None],
                 on_close: Callable[[StagingBuffer], None]) -> None:
        self.config = config
        self.max_buffers = max_buffers
        self._on_reuse = on_reuse  # a free buffer is about to be overwritten
        self._on_close = on_close
        self.buffers: list[StagingBuffer] = []
        self._free: list[StagingBuffer] = []
        self._cond = threading.Condition()
        self.allocations = 0
        self.allocated_bytes = 0

    _RECREATED = {"_cond": threading.Condition}

    @property
    def buffer_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def acquire(self, nbytes: int, by_caller: bool) -> StagingBuffer:
        """A buffer of at least ``nbytes`` with one hold on it (waits for one that a caller gives back).

        Raises:
            StagingBufferTooLarge: it cannot fit in ``budget_bytes`` or the memory left.
            CheckpointTimeoutError: no buffer was given back within ``buffer_wait_timeout_secs``.
        """
        budget = self.config.budget_bytes
        if budget is not None and nbytes > budget:
            raise StagingBufferTooLarge(f"state needs {nbytes} staging bytes, budget_bytes is {budget}")
        deadline = time.monotonic() + self.config.buffer_wait_timeout_secs
        collected = False
        with self._cond:
            while True:
                fits = [b for b in self._free if b.nbytes >= nbytes]
                if fits:
                    buffer = min(fits, key=lambda b: b.nbytes)
                    self._free.remove(buffer)
                    self._hold(buffer, by_caller)
                    self._on_reuse(buffer)
                    return buffer
                for small in list(self._free):  # too small for this state: dropped before a bigger one is made
                    self._drop(small)
                waitable = any(b.caller_holds for b in self.buffers)
                room = budget is None or self.buffer_bytes + nbytes <= budget
                if room and (len(self.buffers) < self.max_buffers or not waitable):
                    return self._allocate(nbytes, by_caller)
                if not waitable:
                    if not collected:  # staged dicts in reference cycles give their buffers back now
                        collected = True
                        gc.collect()
                        continue
                    raise StagingBufferTooLarge(
                        f"state needs {nbytes} staging bytes; budget_bytes={budget} and {self.buffer_bytes} bytes "
                        "are held by staged state dicts still referenced")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CheckpointTimeoutError(
                        f"waited {self.config.buffer_wait_timeout_secs}s for a staging buffer of {nbytes} bytes "
                        f"(budget_bytes={budget}, max_buffers={self.max_buffers}, in use {self.buffer_bytes})")
                self._cond.wait(remaining)

    def prepare(self, nbytes: int) -> bool:
        """Allocate a buffer of ``nbytes`` and fault its pages in now, so that a first save of that size neither
        allocates nor page-faults (run it off the training thread). A save meanwhile waits for it, as for a
        buffer held by a write in flight.

        Returns:
            False, doing nothing, when a free buffer that large exists, ``max_buffers`` are allocated, or the
            budget or the memory left would refuse it (the first save then allocates, as without ``prepare``).
        """
        budget = self.config.budget_bytes
        with self._cond:
            if any(b.nbytes >= nbytes for b in self._free) or len(self.buffers) >= self.max_buffers \
                    or (budget is not None and self.buffer_bytes + nbytes > budget):
                return False
            try:
                buffer = self._allocate(nbytes, by_caller=True)
            except StagingBufferTooLarge as e:
                log.info("not preparing a staging buffer ahead of the first save: %s", e)
                return False
        try:
            buffer.prefault()
        finally:
            self.release(buffer, by_caller=True)
        return True

    def add_user(self, buffer: StagingBuffer, by_caller: bool) -> bool:
        """One more hold on ``buffer`` (a save sharing its staged copy); False if it was dropped meanwhile."""
        with self._cond:
            if buffer not in self.buffers:
                return False
            if buffer in self._free:
                self._free.remove(buffer)
            self._hold(buffer, by_caller)
            return True

    @staticmethod
    def _hold(buffer: StagingBuffer, by_caller: bool) -> None:
        buffer.users += 1
        buffer.caller_holds += by_caller

    def release(self, buffer: StagingBuffer, by_caller: bool) -> None:
        """Give back one hold; a buffer without holds is free for the next save."""
        with self._cond:
            buffer.users -= 1
            buffer.caller_holds -= by_caller
            if buffer.users == 0 and buffer in self.buffers:
                self._free.append(buffer)
            self._cond.notify_all()

    def _allocate(self, nbytes: int, by_caller: bool) -> StagingBuffer:
        headroom, source = memory_headroom()
        if headroom is not None and nbytes > headroom * HEADROOM_FRACTION:
            raise StagingBufferTooLarge(
                f"state needs {nbytes} staging bytes but only {headroom} bytes of memory are left ({source}); "
                f"budget_bytes={self.config.budget_bytes}")
        try:
            buffer = StagingBuffer(nbytes, shared=self.config.use_shared_memory, pinned=self.config.pinned)
        except OSError as e:
            raise StagingBufferTooLarge(
                f"allocating {nbytes} staging bytes failed ({e}); {headroom} bytes of memory were left ({source}); "
                f"budget_bytes={self.config.budget_bytes}") from e
        self._hold(buffer, by_caller)
        self.buffers.append(buffer)
        self.allocations += 1
        self.allocated_bytes += nbytes
        log.debug("allocated staging buffer %d of %d bytes", buffer.id, nbytes)
        return buffer

    def _drop(self, buffer: StagingBuffer) -> None:
        self._free.remove(buffer)
        self.buffers.remove(buffer)
        buffer.close()
        self._on_close(buffer)

    def close(self) -> None:
        with self._cond:
            for buffer in self.buffers:
                buffer.close()
            self.buffers.clear()
            self._free.clear()
            self._cond.notify_all()

    def forget_after_fork(self) -> None:
        """In a forked child: unmap the parent's buffers (in this process only) and start with none."""
        self._cond = threading.Condition()
        for buffer in self.buffers:
            buffer.forget_pinning()
            buffer.close()
        self.buffers, self._free = [], []
