"""Faulting memory in ahead of use (``lightning_ckpt.pages``): what becomes resident, and the fallbacks."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest
import torch

from lightning_ckpt import pages
from lightning_ckpt.read_engine import StorageReader
from lightning_ckpt.staging_buffer import StagingBuffer

MIB = 1 << 20


def _resident_pages(m: mmap.mmap, nbytes: int) -> int:
    """Pages of ``m`` that are resident, by ``mincore``."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    vec = ctypes.create_string_buffer(nbytes // mmap.PAGESIZE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert libc.mincore(address, nbytes, vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec.raw)


def _kernel_has_it() -> bool:
    m = mmap.mmap(-1, 2 * MIB)
    try:
        return pages.populate_write(ctypes.addressof(ctypes.c_char.from_buffer(m)), 2 * MIB)
    finally:
        m.close()


needs_populate = pytest.mark.skipif(not _kernel_has_it(), reason="MADV_POPULATE_WRITE needs Linux 5.14")


@needs_populate
@pytest.mark.timeout(30)
def test_populate_makes_every_whole_page_of_the_range_resident_and_no_other():
    m = mmap.mmap(-1, 8 * MIB)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert _resident_pages(m, 8 * MIB) == 0
        # from the middle of page 1 to the middle of the page after 4 MiB: pages 2 .. 1025 are whole
        assert pages.populate_write(base + mmap.PAGESIZE + 100, 4 * MIB)
        resident = _resident_pages(m, 8 * MIB)
        assert resident == 4 * MIB // mmap.PAGESIZE - 1
        assert m[:mmap.PAGESIZE * 2] == bytes(mmap.PAGESIZE * 2)  # populated pages read as zeros
    finally:
        m.close()


@pytest.mark.timeout(30)
def test_small_ranges_are_left_to_fault_as_usual():
    m = mmap.mmap(-1, 2 * MIB)
    try:
        assert not pages.populate_write(ctypes.addressof(ctypes.c_char.from_buffer(m)), pages.MIN_BYTES - 1)
        assert _resident_pages(m, 2 * MIB) == 0
    finally:
        m.close()


@pytest.mark.timeout(30)
def test_a_kernel_without_the_advice_is_asked_once_and_the_staging_prefault_still_faults_every_page(monkeypatch):
    calls = []

    def refuses(address, nbytes, advice):
        calls.append(advice)
        ctypes.set_errno(22)  # EINVAL: what a kernel before 5.14 answers
        return -1

    monkeypatch.setattr(pages, "_madvise", refuses)
    buffer = StagingBuffer(4 * MIB, shared=True, pinned=False)
    try:
        buffer.prefault()  # falls back to writing one byte per page
        assert calls == [pages.MADV_POPULATE_WRITE]
        assert _resident_pages(buffer._mmap, 4 * MIB) == 4 * MIB // mmap.PAGESIZE
        assert not pages.populate_write(buffer.address, 4 * MIB)
        assert calls == [pages.MADV_POPULATE_WRITE]  # not asked again
    finally:
        buffer.close()


@needs_populate
@pytest.mark.timeout(30)
def test_the_staging_prefault_populates_the_shared_buffer():
    buffer = StagingBuffer(4 * MIB, shared=True, pinned=False)
    try:
        assert _resident_pages(buffer._mmap, 4 * MIB) == 0
        buffer.prefault()
        assert _resident_pages(buffer._mmap, 4 * MIB) == 4 * MIB // mmap.PAGESIZE
    finally:
        buffer.close()


@pytest.mark.timeout(60)
def test_reads_populate_only_the_storages_they_allocate(tmp_path, monkeypatch):
    """A caller's destination storage is never advised (it may be any memory); new storages are, per piece."""
    path = tmp_path / "blob"
    size = 5 * MIB  # at least BATCH_BYTES: read straight into the storage
    data = torch.randint(0, 256, (size,), dtype=torch.uint8)
    path.write_bytes(data.numpy().tobytes() * 2)
    advised = []
    real = pages.populate_write
    monkeypatch.setattr(pages, "populate_write", lambda a, n: advised.append((a, n)) or real(a, n))
    mine = torch.UntypedStorage(size)

    fd = os.open(path, os.O_RDONLY)
    try:
        reader = StorageReader(fd, str(path), {"0": (0, size), "1": (size, size)}, [],
                               destinations={"1": mine}).start()
        reader.finish(30)
    finally:
        os.close(fd)
    fresh = reader.storages["0"]
    assert advised == [(fresh.data_ptr(), size)]
    for storage in (fresh, mine):
        assert torch.equal(torch.empty(0, dtype=torch.uint8).set_(storage), data)
