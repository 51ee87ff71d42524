"""Transparent huge pages for large host memory that is about to be filled: one page fault per 2 MiB, not per 4 KiB."""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys

import torch

log = logging.getLogger(__name__)

HUGE_PAGE_BYTES = 2 << 20
# Storages smaller than this are left as the allocator gives them: the advice only covers whole huge pages inside a
# storage, and splitting the allocator's mappings for a page or two is not worth a system call.
HUGE_PAGE_MIN_BYTES = 4 << 20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)


def _load_madvise():
    if not sys.platform.startswith("linux") or _MADV_HUGEPAGE is None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def advise_huge_pages(address: int, nbytes: int) -> bool:
    """Ask the kernel to back the whole 2 MiB pages inside ``[address, address + nbytes)`` with huge pages.

    Only a hint: it changes no byte and no lifetime, and it is ignored where THP is off. On a fresh region it turns
    the page faults of the first fill from one per 4 KiB into one per 2 MiB, which on virtual machines (where each
    fault may also fault on the host) is most of what filling new memory costs.

    Returns:
        Whether the kernel took the advice for at least one huge page.
    """
    if _madvise is None:
        return False
    start = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (address + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if end <= start:
        return False
    if _madvise(start, end - start, _MADV_HUGEPAGE) != 0:
        log.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
        return False
    return True


def new_storage(nbytes: int) -> torch.UntypedStorage:
    """A new CPU storage of ``nbytes`` (not zeroed), on huge pages when it is large: an ordinary storage of the
    default allocator in every other respect (resizable, freed with its last tensor)."""
    storage = torch.UntypedStorage(nbytes)
    if nbytes >= HUGE_PAGE_MIN_BYTES:
        advise_huge_pages(storage.data_ptr(), nbytes)
    return storage
