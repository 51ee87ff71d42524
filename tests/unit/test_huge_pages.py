"""Large loaded storages are advised onto transparent huge pages, and stay ordinary storages otherwise."""

from __future__ import annotations

import sys

import pytest
import torch

import lightning_ckpt as lc
from lightning_ckpt import huge_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def _advice_works() -> bool:
    probe = torch.UntypedStorage(8 << 20)
    return huge_pages.advise_huge_pages(probe.data_ptr(), probe.nbytes())


needs_advice = pytest.mark.skipif(not _advice_works(), reason="this kernel refuses MADV_HUGEPAGE")


@needs_advice
def test_a_large_new_storage_is_advised_and_a_small_one_is_not():
    large = huge_pages.new_storage(huge_pages.HUGE_PAGE_MIN_BYTES + (3 << 20))
    middle = large.data_ptr() + large.nbytes() // 2
    assert "hg" in _vm_flags(middle)
    small = huge_pages.new_storage(64 << 10)
    assert "hg" not in _vm_flags(small.data_ptr())


def test_advice_covers_only_whole_huge_pages_inside_the_range():
    page = huge_pages.HUGE_PAGE_BYTES
    assert not huge_pages.advise_huge_pages(page + 1, page)  # holds no whole aligned huge page


@needs_advice
def test_loaded_large_tensors_sit_on_advised_memory_and_stay_resizable(tmp_path):
    big = torch.randn(3 << 20)  # 12 MiB
    state = {"big": big, "small": torch.arange(10)}
    ck = lc.make_sync_checkpointer()
    try:
        ck.save(str(tmp_path / "ck"), state)
        loaded = ck.load(str(tmp_path / "ck"))
    finally:
        ck.close()
    out = loaded["big"]
    assert torch.equal(out, big) and torch.equal(loaded["small"], state["small"])
    assert "hg" in _vm_flags(out.data_ptr() + out.nbytes // 2)
    out.resize_(out.numel() * 2)  # an ordinary allocator storage, unlike a tensor over a foreign buffer
    assert out.numel() == 2 * big.numel()


@needs_advice
def test_a_private_staging_buffer_is_advised_and_a_shared_one_maps_its_memfd():
    from lightning_ckpt.staging_buffer import StagingBuffer

    private = StagingBuffer(16 << 20, shared=False, pinned=False)
    shared = StagingBuffer(16 << 20, shared=True, pinned=False)
    try:
        assert "hg" in _vm_flags(private.address + (8 << 20))
        assert "sh" not in _vm_flags(private.address)  # private: a forked child gets a copy, not this memory
        assert "sh" in _vm_flags(shared.address)  # the writer subprocess maps the same pages
    finally:
        private.close()
        shared.close()
