"""Faults around the async DCP save in flight, on real gloo ranks: a timed-out wait keeps the save pending (no
overlapping save, no discarded commit), an unread failure is raised once by the next call, a dead peer is named."""

from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.distributed as dist

from lightning_ckpt.commit import is_temp_name
from lightning_ckpt.dcp import AsyncShardedSaver, DistributedCheckpointer, StorageWriter, is_committed
from lightning_ckpt.errors import CheckpointError, CheckpointTimeoutError, CheckpointWriteError
from tests.distributed._dcp_states import full_tensors, sharded_state

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]

# How long a gated commit waits for the test to release it (a bound: the test always releases it sooner).
GATE_SECS = 60.0


class _GatedWriter(StorageWriter):
    """Our writer whose next ``finish`` (on the coordinator) waits for ``release()``: a commit held in flight."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.released = threading.Event()
        self.held = False

    def hold_next_commit(self) -> None:
        self.released.clear()
        self.held = True

    def release(self) -> None:
        self.released.set()

    def finish(self, metadata, results) -> None:
        if self.held:
            self.held = False
            self.released.wait(GATE_SECS)
        super().finish(metadata, results)


class _FailingWriter(StorageWriter):
    """Our writer whose commit fails (on the coordinator) while ``fail_next`` is set, like a full disk."""

    fail_next = False

    def finish(self, metadata, results) -> None:
        if self.fail_next:
            self.fail_next = False
            raise OSError(28, "No space left on device")
        super().finish(metadata, results)


# ---------------------------------------------------------------- helpers (run in the spawned ranks)


def _version_at(path: str) -> int:
    state = sharded_state(dist.get_world_size(), version=-1)
    DistributedCheckpointer(path).load(state)
    loaded = full_tensors(state)
    assert torch.equal(loaded["w"], full_tensors(sharded_state(dist.get_world_size(), state["version"]))["w"])
    return state["version"]


def _temps(parent: str) -> list[str]:
    return [n for n in os.listdir(parent) if is_temp_name(n)]


def _raised(call) -> str | None:
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the test asserts on what was raised
        return f"{type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------- rank functions


def _timed_out_wait_keeps_the_save_pending(rank: int, world: int, root: str) -> dict:
    """Save 1's commit is held; waits for it time out (twice), then the next save waits for it and commits."""
    path = os.path.join(root, "ckpt")
    writer = _GatedWriter(path)
    ck = DistributedCheckpointer(writer, timeout_secs=60)
    try:
        ck.async_save(sharded_state(world, version=0)).result(timeout=60)  # the saver and its group, 60 s
        ck.timeout_secs = 0.2  # only the wait for the save in flight is short
        writer.hold_next_commit()
        first = ck.async_save(sharded_state(world, version=1))
        try:
            again_async = _raised(lambda: ck.async_save(sharded_state(world, version=2)))
            again_sync = _raised(lambda: ck.save(sharded_state(world, version=3)))
            dist.barrier()  # every rank tried while save 1 was certainly in flight
        finally:
            writer.release()
        ck.timeout_secs = 60
        first.result(timeout=60)
        after_first = _version_at(path)
        ck.save(sharded_state(world, version=4))
    finally:
        ck.close()
    dist.barrier()
    return {"again_async": again_async, "again_sync": again_sync, "after_first": after_first,
            "final": _version_at(path), "temps": _temps(root)}


def _writer_refuses_a_save_over_its_commit_in_flight(rank: int, world: int, root: str) -> dict:
    """Two saves through one StorageWriter while the first commit is held: the second is refused, not overlapped."""
    path = os.path.join(root, "ckpt")
    writer = _GatedWriter(path)
    saver = AsyncShardedSaver(timeout_secs=60)
    try:
        writer.hold_next_commit()
        first = saver.save(sharded_state(world, version=1), writer)
        try:
            refused = _raised(lambda: saver.save(sharded_state(world, version=2), writer))
            dist.barrier()
        finally:
            writer.release()
        first.result(timeout=60)
    finally:
        saver.close()
    dist.barrier()
    return {"refused": refused, "committed": is_committed(path), "version": _version_at(path),
            "temps": _temps(root)}


def _unread_failure_is_raised_once(rank: int, world: int, root: str) -> dict:
    path = os.path.join(root, "ckpt")
    writer = _FailingWriter(path)
    ck = DistributedCheckpointer(writer)
    try:
        writer.fail_next = rank == 0
        ck.async_save(sharded_state(world, version=1))  # fails in the background; nobody reads its future
        next_async = _raised(lambda: ck.async_save(sharded_state(world, version=2)).result(timeout=60))
        then_save = _raised(lambda: ck.save(sharded_state(world, version=3)))
        writer.fail_next = rank == 0
        read = ck.async_save(sharded_state(world, version=4))
        read_error = _raised(lambda: read.result(timeout=60))
        after_read = _raised(lambda: ck.save(sharded_state(world, version=5)))
        writer.fail_next = rank == 0
        ck.async_save(sharded_state(world, version=6))
    finally:
        at_close = _raised(ck.close)
    dist.barrier()
    return {"next_async": next_async, "then_save": then_save, "read_error": read_error, "after_read": after_read,
            "at_close": at_close, "version": _version_at(path), "temps": _temps(root)}


def _rank_dies_after_async_save(rank: int, world: int, root: str, victim: int) -> dict:
    path = os.path.join(root, "ckpt")
    ck = DistributedCheckpointer(path, timeout_secs=30)
    ck.save(sharded_state(world, version=1))
    future = ck.async_save(sharded_state(world, version=2))
    if rank == victim:
        os._exit(7)
    try:
        future.result(timeout=60)
        error = None
    except Exception as e:  # noqa: BLE001 - the test asserts on what the survivor raised
        error = {"type": type(e).__name__, "message": str(e), "failed_ranks": getattr(e, "failed_ranks", None)}
    try:
        ck.close()
    except Exception:  # noqa: BLE001 - the error was raised through the future already
        pass
    return error


# ---------------------------------------------------------------- tests


def test_a_timed_out_wait_keeps_the_async_save_pending(ranks2, tmp_path):
    results = ranks2.run(_timed_out_wait_keeps_the_save_pending, str(tmp_path))
    for r in results:
        assert r["again_async"] and r["again_async"].startswith(CheckpointTimeoutError.__name__), r
        assert r["again_sync"] and r["again_sync"].startswith(CheckpointTimeoutError.__name__), r  # still pending
        assert r["after_first"] == 1, r  # the held save committed what it was given
        assert r["final"] == 4 and r["temps"] == [], r


def test_storage_writer_refuses_a_save_while_its_commit_is_in_flight(ranks2, tmp_path):
    results = ranks2.run(_writer_refuses_a_save_over_its_commit_in_flight, str(tmp_path))
    for r in results:
        assert r["refused"] and r["refused"].startswith(CheckpointError.__name__), r
        assert "still committing" in r["refused"] and str(tmp_path / "ckpt") in r["refused"], r
        assert r["committed"] and r["version"] == 1 and r["temps"] == [], r


def test_an_unread_async_failure_is_raised_once_by_the_next_call(ranks2, tmp_path):
    results = ranks2.run(_unread_failure_is_raised_once, str(tmp_path))
    for r in results:
        for key in ("next_async", "at_close"):
            assert r[key] and r[key].startswith(CheckpointWriteError.__name__), r
            assert "No space left on device" in r[key] and "rank 0" in r[key], r
        assert r["then_save"] is None, r  # raised once, then cleared
        assert r["read_error"] and "No space left on device" in r["read_error"], r
        assert r["after_read"] is None, r  # its caller saw it: not raised again
        assert r["version"] == 5 and r["temps"] == [], r


@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_dying_during_an_async_save_is_named(tmp_path, victim):
    from tests.distributed.launcher import run_ranks

    results = run_ranks(_rank_dies_after_async_save, 2, str(tmp_path), victim, may_die=frozenset({victim}),
                        timeout_secs=150)
    survivor = results[1 - victim]
    assert survivor is not None and survivor["type"] == CheckpointWriteError.__name__, survivor  # not gloo's
    assert f"lost rank {victim}" in survivor["message"] and survivor["failed_ranks"] == [victim], survivor
