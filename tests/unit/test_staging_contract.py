"""PyTorch's stager and checkpointer contract, kept: staged dicts, no hidden release, None results, bounded memory."""

from __future__ import annotations

import copy
import gc
import os
from concurrent.futures import Future

import pytest
import torch

import lightning_ckpt as lc
from lightning_ckpt import staging_buffer
from lightning_ckpt.staging import CheckpointStager, CheckpointStagerConfig, DefaultStager
from lightning_ckpt.staging_buffer import StagingBuffer, StagingBufferTooLarge


def _sync_config(**kw) -> CheckpointStagerConfig:
    return CheckpointStagerConfig(use_async_staging=False, buffer_wait_timeout_secs=30, **kw)


def test_stage_returns_a_staged_state_dict_that_no_longer_reads_the_live_tensors():
    live = {"w": torch.ones(16), "nested": {"b": torch.arange(4)}, "step": 3}
    stager = DefaultStager(_sync_config())
    try:
        staged = stager.stage(live)
        assert isinstance(staged, dict) and staged["step"] == 3
        live["w"].add_(1.0)
        assert torch.equal(staged["w"], torch.ones(16)) and torch.equal(staged["nested"]["b"], torch.arange(4))
    finally:
        stager.close()


@pytest.mark.timeout(60)
def test_staging_twice_without_any_release_never_waits_for_the_first_dict():
    stager = DefaultStager(_sync_config(), max_buffers=1)
    try:
        first = stager.stage({"w": torch.ones(1000)})
        second = stager.stage({"w": torch.zeros(1000)})  # the seed's contract has no release(): no deadlock
        assert torch.equal(first["w"], torch.ones(1000)) and torch.equal(second["w"], torch.zeros(1000))
        assert stager.allocations == 2
    finally:
        stager.close()


def test_a_staged_dicts_buffer_returns_to_the_pool_when_the_dict_is_dropped():
    stager = DefaultStager(_sync_config(), max_buffers=1)
    try:
        for i in range(5):
            staged = stager.stage({"w": torch.full((1000,), float(i))})
            assert torch.equal(staged["w"], torch.full((1000,), float(i)))
            del staged
        assert stager.allocations == 1
    finally:
        stager.close()


def test_a_staged_dict_in_a_reference_cycle_is_collected_before_the_budget_refuses():
    stager = DefaultStager(_sync_config(budget_bytes=8192), max_buffers=1)
    try:
        cyclic = stager.stage({"w": torch.ones(1000)})
        cyclic["self"] = cyclic  # only the cycle collector frees it
        del cyclic
        assert torch.equal(stager.stage({"w": torch.zeros(1000)})["w"], torch.zeros(1000))
    finally:
        stager.close()


def test_async_stage_future_cannot_be_cancelled_and_resolves_to_the_staged_dict():
    stager = DefaultStager(CheckpointStagerConfig(use_async_staging=True))
    try:
        future = stager.stage({"w": torch.ones(100000)})
        assert isinstance(future, Future) and not future.cancel()
        assert torch.equal(future.result(timeout=60)["w"], torch.ones(100000))
    finally:
        stager.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_non_blocking_copy_without_cuda_is_refused_like_the_seed():
    with pytest.raises(AssertionError, match="use_non_blocking_copy"):
        DefaultStager(CheckpointStagerConfig(use_non_blocking_copy=True))
    with pytest.raises(ValueError):  # and a ValueError, as our config errors are
        DefaultStager(CheckpointStagerConfig(use_non_blocking_copy=True))


@pytest.mark.timeout(120)
def test_cancelled_stage_future_releases_its_buffer(tmp_path):
    with lc.make_async_checkpointer() as ck:
        stage_f, write_f = ck.save(tmp_path / "a.ckpt", {"w": torch.ones(1 << 20)})
        assert not stage_f.cancel() and not write_f.cancel()  # refused: the save goes on and ends cleanly
        assert write_f.result(timeout=60) is None and not stage_f.cancelled()
        ck.save(tmp_path / "b.ckpt", {"w": torch.zeros(1 << 20)})[1].result(timeout=60)
        ck.wait(timeout_secs=60)
        assert ck.stager.allocations == 1
        assert torch.equal(ck.load(tmp_path / "a.ckpt")["w"], torch.ones(1 << 20))


def test_sync_save_returns_none_and_reports_its_cost_in_last_save_stats(tmp_path):
    with lc.make_sync_checkpointer() as ck:
        assert ck.last_save_stats is None
        assert ck.save(tmp_path / "a.ckpt", {"w": torch.ones(8)}) is None
        assert ck.last_save_stats.path == str(tmp_path / "a.ckpt") and ck.last_save_stats.nbytes > 0


def test_async_futures_resolve_to_none_and_stats_move_to_the_checkpointer(tmp_path):
    with lc.make_async_checkpointer() as ck:
        stage_f, write_f = ck.save(tmp_path / "a.ckpt", {"w": torch.ones(8)})
        assert stage_f.result(timeout=60) is None and write_f.result(timeout=60) is None
        assert write_f.stats is ck.last_save_stats and ck.last_save_stats.nbytes > 0


def test_strict_load_names_the_missing_keys(tmp_path):
    with lc.make_sync_checkpointer() as ck:
        ck.save(tmp_path / "a.ckpt", {"w": torch.ones(2)})
        with pytest.raises(RuntimeError, match="missing keys"):
            ck.load(tmp_path / "a.ckpt", {"w": None, "absent": None}, strict=True)


class _CopyingStager(CheckpointStager):
    """A stager written to PyTorch's contract only: stage() returns a Future of a deep-copied dict."""

    def stage(self, state_dict, **kwargs):
        future: Future = Future()
        future.set_result(copy.deepcopy(state_dict))
        return future

    def close(self) -> None:
        pass


@pytest.mark.timeout(180)
def test_async_checkpointer_accepts_a_stager_that_follows_the_seed_contract(tmp_path):
    process = lc.CheckpointProcess(lc.RankInfo(0, 1))
    reader = lc.CheckpointReader(lc.RankInfo(0, 1))
    with lc.AsyncCheckpointer(_CopyingStager(), process, reader) as ck:
        # no tensors: they would cross by torch's fd sharing, whose server thread lives for the whole process
        stage_f, write_f = ck.save(str(tmp_path / "a"), {"w": [1.0, 2.0], "step": 2})
        assert stage_f.result(timeout=60) is None and write_f.result(timeout=120) is None
        assert ck.load(str(tmp_path / "a")) == {"w": [1.0, 2.0], "step": 2}


def test_config_of_the_wrong_type_names_the_field():
    with pytest.raises(ValueError, match="max_in_flight"):
        lc.CheckpointerConfig(max_in_flight="2")
    with pytest.raises(ValueError, match="staging_config.*unknown keys.*nope"):
        lc.CheckpointerConfig(staging_config={"nope": 1})
    with pytest.raises(ValueError, match="budget_bytes"):
        CheckpointStagerConfig(budget_bytes="1GB")
    converted = lc.CheckpointerConfig(staging_config={"budget_bytes": 4096})
    assert isinstance(converted.staging_config, CheckpointStagerConfig) and converted.staging_config.budget_bytes == 4096


def test_failed_staging_mmap_leaves_no_descriptor_open():
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(OSError):
            StagingBuffer(1 << 50, shared=True, pinned=False)  # ftruncate works, the mapping cannot
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before


def _fake_cgroup(monkeypatch, tmp_path, version: int, limit: int, usage: int) -> None:
    if version == 2:
        (tmp_path / "self_cgroup").write_text("0::/\n")
        (tmp_path / "memory.max").write_text(f"{limit}\n")
        (tmp_path / "memory.current").write_text(f"{usage}\n")
    else:
        (tmp_path / "self_cgroup").write_text("4:memory:/job\n")
        (tmp_path / "memory" / "job").mkdir(parents=True)
        (tmp_path / "memory" / "job" / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (tmp_path / "memory" / "job" / "memory.usage_in_bytes").write_text(f"{usage}\n")
    monkeypatch.setattr(staging_buffer, "CGROUP_ROOT", str(tmp_path))
    monkeypatch.setattr(staging_buffer, "PROC_SELF_CGROUP", str(tmp_path / "self_cgroup"))


@pytest.mark.parametrize("version", [1, 2])
def test_staging_over_the_cgroup_limit_falls_back_or_names_the_limit(monkeypatch, tmp_path, version):
    _fake_cgroup(monkeypatch, tmp_path, version, limit=64 << 20, usage=60 << 20)  # 4 MiB left
    stager = DefaultStager(_sync_config())
    try:
        with pytest.raises(StagingBufferTooLarge, match=r"8388608 staging bytes.*cgroup limit 67108864.*budget_bytes"):
            stager.stage({"w": torch.ones(2 << 20)})  # 8 MiB
        assert stager.allocations == 0
        assert torch.equal(stager.stage({"w": torch.ones(1024)})["w"], torch.ones(1024))  # what fits, stages
    finally:
        stager.close()
    with lc.make_async_checkpointer() as ck:  # the checkpointer writes it synchronously instead
        ck.save(tmp_path / "big.ckpt", {"w": torch.ones(2 << 20)})[1].result(timeout=60)
        assert ck.last_save_stats.fallback and ck.stager.allocations == 0
        assert torch.equal(ck.load(tmp_path / "big.ckpt")["w"], torch.ones(2 << 20))
