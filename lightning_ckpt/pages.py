"""Faulting memory in ahead of use: one ``madvise(MADV_POPULATE_WRITE)`` per range instead of a fault per page.

A read into newly allocated memory (a load's storages) otherwise takes one page fault per 4 KiB page inside the
copy; on a VM whose freed memory goes back to the host (virtio-balloon free page reporting) each of those faults
can also fault on the host. Asking the kernel to populate the whole range first does the same work in one loop,
without an exception per page (measured: a cold 1 GiB read into new storages 0.63-0.76 s against 0.66-2.06 s,
``benchmarks/README.md``, profile: load). Linux 5.14 and later; elsewhere, or when the kernel refuses, nothing is
done and the pages fault in as before.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import sys

from lightning_ckpt._libc import libc_function

MADV_POPULATE_WRITE = 23  # linux/mman.h, Linux 5.14
MIN_BYTES = 1 << 20  # below this, per-page faults are cheaper than the extra system call

# None where the advice cannot be given (not Linux, no C library), or once the kernel refused it (before 5.14).
_madvise = libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]) \
    if sys.platform.startswith("linux") else None


def populate_write(address: int, nbytes: int) -> bool:
    """Fault in, writable, the whole pages inside ``[address, address + nbytes)`` (the partial pages at either
    end are left to fault as usual). Returns whether the kernel did it; False (and never again in this process)
    where it cannot, e.g. a kernel older than 5.14 (EINVAL)."""
    global _madvise
    fn = _madvise
    if fn is None or nbytes < MIN_BYTES:
        return False
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (address + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end <= start:
        return False
    if fn(start, end - start, MADV_POPULATE_WRITE) == 0:
        return True
    if ctypes.get_errno() == errno.EINVAL:  # the kernel does not know the advice
        _madvise = None
    return False  # ENOMEM, EFAULT, EHWPOISON, ...: the copy then faults (and fails) exactly as without


_mincore = libc_function("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]) \
    if sys.platform.startswith("linux") else None


class FileResidency:
    """Which parts of an open file the page cache holds, asked with ``mincore`` on a mapping of it that is never
    touched (so asking reads nothing, and starts no readahead). ``cached`` says True only where it knows."""

    def __init__(self, fd: int, size: int) -> None:
        self._map: mmap.mmap | None = None
        self._address = 0
        if _mincore is None or size == 0:
            return
        try:
            self._map = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)  # private: never written, never faulted
        except (OSError, ValueError):
            return
        anchor = ctypes.c_char.from_buffer(self._map)
        self._address = ctypes.addressof(anchor)
        del anchor  # the buffer export would keep the mapping from closing

    def cached(self, offset: int, nbytes: int) -> bool:
        """Whether every page of ``[offset, offset + nbytes)`` is in the page cache (False where unknown)."""
        if self._map is None or nbytes <= 0:
            return False
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = -(-min(offset + nbytes, len(self._map)) // mmap.PAGESIZE) * mmap.PAGESIZE
        if end <= start:
            return False
        pages = (end - start) // mmap.PAGESIZE
        vector = (ctypes.c_ubyte * pages)()
        if _mincore(self._address + start, end - start, vector) != 0:
            return False
        return all(b & 1 for b in bytes(vector))

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
