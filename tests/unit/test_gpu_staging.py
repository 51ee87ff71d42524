"""GPU paths of staging: pinned buffers, side-stream copies, snapshot safety. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import lightning_ckpt as lc

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gpu_state_is_staged_through_pinned_memory_on_a_side_stream(tmp_path):
    w = torch.randn(1024, 1024, device="cuda")
    expected = w.cpu()
    with lc.make_async_checkpointer() as ck:
        stage_f, write_f = ck.save(tmp_path / "a.ckpt", {"w": w})
        stage_f.result(timeout=60)
        assert all(b.pinned for b in ck.stager._pool.buffers)
        w.add_(1.0)  # after the stage future: must not reach the checkpoint
        write_f.result(timeout=60)
        loaded = ck.load(tmp_path / "a.ckpt")
    assert loaded["w"].device.type == "cpu" and torch.equal(loaded["w"], expected)


def test_pending_kernels_on_the_callers_stream_are_included(tmp_path):
    w = torch.zeros(4096, 4096, device="cuda")
    with lc.make_async_checkpointer() as ck:
        w.add_(3.0)  # queued on the current stream, possibly not yet run when save() is called
        stage_f, write_f = ck.save(tmp_path / "a.ckpt", {"w": w})
        stage_f.result(timeout=60)
        write_f.result(timeout=60)
        assert torch.all(ck.load(tmp_path / "a.ckpt")["w"] == 3.0)


def test_sync_checkpointer_writes_gpu_tensors(tmp_path):
    w = torch.randn(64, device="cuda")
    with lc.make_sync_checkpointer() as ck:
        ck.save(tmp_path / "a.ckpt", {"w": w})
        assert torch.equal(ck.load(tmp_path / "a.ckpt")["w"], w.cpu())
