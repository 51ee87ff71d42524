"""Async sharded saves through our staging and writer process, on real gloo ranks: commit after the return,
point-in-time snapshots, loads that wait, one error on every rank (a failed write, a killed writer), flat memory."""

from __future__ import annotations

import os
import resource
import signal

import pytest
import torch
import torch.distributed as dist

from lightning_ckpt.commit import is_temp_name
from lightning_ckpt.dcp import DistributedCheckpointer, is_committed
from lightning_ckpt.dcp.manifest import read_manifest
from lightning_ckpt.errors import CheckpointError
from tests.distributed._dcp_states import full_tensors, sharded_state, tree_digest

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]


# ---------------------------------------------------------------- helpers (run in the spawned ranks)


def _writer_pid(ck: DistributedCheckpointer) -> int:
    return ck._saver.process.pid


def _saved(ck: DistributedCheckpointer, path: str, version: int) -> None:
    """A committed checkpoint of ``version`` at ``path`` (its async save waited for); the writer runs after it."""
    ck.async_save(sharded_state(dist.get_world_size(), version), checkpoint_id=path).result(timeout=60)


def _load_full(path: str) -> dict:
    state = sharded_state(dist.get_world_size(), version=-1)
    DistributedCheckpointer(path).load(state)
    return full_tensors(state)


def _temps(parent: str) -> list[str]:
    return [n for n in os.listdir(parent) if is_temp_name(n)]


# ---------------------------------------------------------------- rank functions


def _returns_before_commit_and_snapshots(rank: int, world: int, root: str) -> dict:
    """Both writers stopped: the save returns, nothing is at the final path; the state is then mutated in place."""
    ck = DistributedCheckpointer(os.path.join(root, "warm"))
    try:
        _saved(ck, os.path.join(root, "warm"), version=0)
        final = os.path.join(root, "ckpt")
        state = sharded_state(world, version=1)
        expected = full_tensors(state)
        pid = _writer_pid(ck)
        os.kill(pid, signal.SIGSTOP)
        try:
            future = ck.async_save(state, checkpoint_id=final)
            absent_before = not os.path.lexists(final)
            with torch.no_grad():
                state["w"].to_local().add_(1e6)  # training goes on: must not reach the checkpoint
            state["version"] = 99
        finally:
            os.kill(pid, signal.SIGCONT)
        future.result(timeout=60)
        committed = is_committed(final)
        dist.barrier()
        loaded = _load_full(final)
    finally:
        ck.close()
    return {"absent_before": absent_before, "committed_after": committed,
            "same": torch.equal(loaded["w"], expected["w"]), "version": loaded["version"],
            "files": sorted(os.listdir(final))}


def _load_waits_for_pending(rank: int, world: int, root: str) -> dict:
    """A load right after an async overwrite reads the new checkpoint, not the old one still at the path."""
    path = os.path.join(root, "ckpt")
    ck = DistributedCheckpointer(path)
    try:
        _saved(ck, path, version=1)
        pid = _writer_pid(ck)
        os.kill(pid, signal.SIGSTOP)
        try:
            ck.async_save(sharded_state(world, version=2))
        finally:
            os.kill(pid, signal.SIGCONT)
        state = sharded_state(world, version=-1)
        ck.load(state)
        loaded = full_tensors(state)
    finally:
        ck.close()
    return {"version": loaded["version"], "same": torch.equal(loaded["w"], full_tensors(sharded_state(world, 2))["w"])}


def _failing_write_on_rank1(rank: int, world: int, root: str) -> dict:
    """Rank 1's writer process inherits a 1-byte file size limit: its write fails with EFBIG (no mock)."""
    path = os.path.join(root, "ckpt")
    sync = DistributedCheckpointer(path)
    sync.save(sharded_state(world, version=1))
    dist.barrier()
    before = tree_digest(path)
    ck = DistributedCheckpointer(path)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        if rank == 1:  # the writer process starts within this save, with the limit
            resource.setrlimit(resource.RLIMIT_FSIZE, (1, limit[1]))
        try:
            future = ck.async_save(sharded_state(world, version=2))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        try:
            future.result(timeout=60)
            error = failed_ranks = None
        except CheckpointError as e:
            error, failed_ranks = f"{type(e).__name__}: {e}", e.failed_ranks
    finally:
        ck.close()
    dist.barrier()
    return {"error": error, "failed_ranks": failed_ranks, "unchanged": tree_digest(path) == before,
            "temps": _temps(root)}


def _sigkill_writer_of_rank1(rank: int, world: int, root: str) -> dict:
    """Rank 1's writer is killed while it holds the save's request; then the next save starts a new writer."""
    path = os.path.join(root, "ckpt")
    ck = DistributedCheckpointer(path)
    try:
        _saved(ck, path, version=1)
        dist.barrier()
        before = tree_digest(path)
        dist.barrier()
        pid = _writer_pid(ck)
        if rank == 1:
            os.kill(pid, signal.SIGSTOP)  # the request waits in its socket: the kill lands mid-save
        future = ck.async_save(sharded_state(world, version=2))
        if rank == 1:
            os.kill(pid, signal.SIGKILL)
        try:
            future.result(timeout=60)
            error = None
        except CheckpointError as e:
            error = f"{type(e).__name__}: {e}"
        dist.barrier()
        unchanged = tree_digest(path) == before
        dist.barrier()
        _saved(ck, path, version=3)
        new_writer = _writer_pid(ck) != pid
    finally:
        ck.close()
    return {"error": error, "unchanged": unchanged, "new_writer": new_writer,
            "after": _load_full(path)["version"]}


def _ten_saves_memory(rank: int, world: int, root: str) -> dict:
    """Ten async saves of an 8 MiB shard per rank: one staging buffer, reused; RSS of rank and writer flat."""
    import psutil
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    big = distribute_tensor(torch.zeros(world * 1024, 2048), mesh, [Shard(0)])  # 8 MiB per rank
    shm_before = sorted(os.listdir("/dev/shm"))
    ck = DistributedCheckpointer(os.path.join(root, "ckpt"))
    samples = []
    try:
        for i in range(10):
            with torch.no_grad():
                big.to_local().fill_(float(i))
            ck.async_save({"big": big, "step": i}).result(timeout=60)
            me, writer = psutil.Process(), psutil.Process(_writer_pid(ck))
            samples.append((me.memory_info().rss, writer.memory_info().rss))
        stager = ck._saver.stager
        allocations, buffer_bytes = stager.allocations, stager.buffer_bytes
    finally:
        ck.close()
    state = {"big": distribute_tensor(torch.empty(world * 1024, 2048), mesh, [Shard(0)]), "step": -1}
    DistributedCheckpointer(os.path.join(root, "ckpt")).load(state)
    return {"allocations": allocations, "buffer_bytes": buffer_bytes, "samples": samples,
            "shm_same": sorted(os.listdir("/dev/shm")) == shm_before, "step": state["step"],
            "last_value": float(state["big"].to_local()[0, 0])}


def _plain_dcp_reads_and_a_flipped_byte_is_caught(rank: int, world: int, root: str) -> dict:
    """Plain ``dcp.load`` reads an async save; a byte flipped in a tensor record of rank 1's file then fails
    our verified load on every rank."""
    import io

    import torch.distributed.checkpoint as dcp

    from lightning_ckpt.errors import CorruptCheckpointError
    from lightning_ckpt.torch_zip import record_spans

    path = os.path.join(root, "ckpt")
    ck = DistributedCheckpointer(path)
    try:
        _saved(ck, path, version=5)
    finally:
        ck.close()
    plain = sharded_state(world, version=-1)
    dcp.load(plain, checkpoint_id=path)
    expected = full_tensors(sharded_state(world, 5))["w"]
    plain_ok = plain["version"] == 5 and torch.equal(full_tensors(plain)["w"], expected)
    dist.barrier()
    if rank == 0:
        victim = os.path.join(path, "__1_0.distcp")  # rank 1's first chunk: the local shard of "w"
        with open(victim, "r+b") as f:
            start, size = record_spans(io.BytesIO(f.read()), victim, {"data/0"})["data/0"]
            f.seek(start + size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    try:
        _load_full(path)
        raised = None
    except CorruptCheckpointError as e:
        raised = {"path": e.path, "key": e.key, "expected": e.expected, "actual": e.actual}
    return {"plain_ok": plain_ok, "raised": raised}


def _over_budget_writes_synchronously(rank: int, world: int, root: str) -> dict:
    """A staging budget smaller than the shard: the save writes from the live tensors before returning, and
    still commits in the background."""
    from lightning_ckpt.dcp import AsyncShardedSaver, StorageWriter
    from lightning_ckpt.staging import CheckpointStagerConfig

    path = os.path.join(root, "ckpt")
    saver = AsyncShardedSaver(staging_config=CheckpointStagerConfig(use_async_staging=False, budget_bytes=64))
    try:
        state = sharded_state(world, version=6)
        future = saver.save(state, StorageWriter(path))
        with torch.no_grad():
            state["w"].to_local().add_(1e6)  # already written: must not reach the checkpoint
        future.result(timeout=60)
        allocations = saver.stager.allocations
    finally:
        saver.close()
    loaded = _load_full(path)
    expected = full_tensors(sharded_state(world, 6))["w"]
    return {"allocations": allocations, "version": loaded["version"], "same": torch.equal(loaded["w"], expected),
            "files": sorted(os.listdir(path))}


def _four_ranks(rank: int, world: int, root: str) -> dict:
    path = os.path.join(root, "ckpt")
    ck = DistributedCheckpointer(path)
    try:
        future = ck.async_save(sharded_state(world, version=4))
        future.result(timeout=60)
    finally:
        ck.close()
    loaded = _load_full(path)
    return {"version": loaded["version"], "same": torch.equal(loaded["w"], full_tensors(sharded_state(world, 4))["w"])}


# ---------------------------------------------------------------- tests


def test_async_save_returns_before_commit(ranks2, tmp_path):
    results = ranks2.run(_returns_before_commit_and_snapshots, str(tmp_path))
    assert all(r["absent_before"] for r in results)
    assert all(r["committed_after"] for r in results)
    files = results[0]["files"]
    assert ".metadata" in files and "MANIFEST.json" in files
    assert any(f.startswith("__1_") for f in files)  # rank 1's chunk files, written by its writer process
    manifest = read_manifest(str(tmp_path / "ckpt"))
    assert any("records" in entry for entry in manifest["chunks"].values())


def test_mutation_after_async_save_does_not_leak(ranks2, tmp_path):
    results = ranks2.run(_returns_before_commit_and_snapshots, str(tmp_path))
    assert all(r["same"] for r in results)
    assert all(r["version"] == 1 for r in results)


def test_load_waits_for_the_pending_save(ranks2, tmp_path):
    results = ranks2.run(_load_waits_for_pending, str(tmp_path))
    assert all(r["version"] == 2 and r["same"] for r in results)


def test_failing_write_on_one_rank_is_raised_on_every_rank(ranks2, tmp_path):
    results = ranks2.run(_failing_write_on_rank1, str(tmp_path))
    for r in results:
        assert r["error"] is not None and "rank 1" in r["error"], r["error"]
        assert r["failed_ranks"] == [1]
        assert "File too large" in r["error"], r["error"]  # EFBIG from the writer process, with its traceback
        assert r["unchanged"]
        assert r["temps"] == []


def test_sigkill_of_one_ranks_writer_mid_save_fails_every_rank(ranks2, tmp_path):
    results = ranks2.run(_sigkill_writer_of_rank1, str(tmp_path))
    for r in results:
        assert r["error"] is not None and "rank 1" in r["error"], r["error"]
        assert "WriterProcessDiedError" in r["error"], r["error"]
        assert r["unchanged"]
        assert r["after"] == 3
    assert results[1]["new_writer"] and not results[0]["new_writer"]


def test_ten_async_saves_keep_memory_flat(ranks2, tmp_path):
    results = ranks2.run(_ten_saves_memory, str(tmp_path))
    tolerance = 12 << 20  # one leaked 8 MiB staging copy per save would add 72 MiB by the last one
    for r in results:
        assert r["allocations"] == 1
        assert r["buffer_bytes"] < 9 << 20
        assert r["shm_same"]
        (rank_first, writer_first), (rank_last, writer_last) = r["samples"][0], r["samples"][-1]
        assert rank_last - rank_first < tolerance, r["samples"]
        assert writer_last - writer_first < tolerance, r["samples"]
        assert r["step"] == 9 and r["last_value"] == 9.0


def test_async_checkpoint_reads_with_plain_dcp_and_a_flipped_byte_is_caught(ranks2, tmp_path):
    results = ranks2.run(_plain_dcp_reads_and_a_flipped_byte_is_caught, str(tmp_path))
    for r in results:
        assert r["plain_ok"]
        raised = r["raised"]
        assert raised is not None and raised["path"].endswith("__1_0.distcp") and raised["key"] == "w:data/0"
        assert raised["expected"] != raised["actual"]


def test_over_the_staging_budget_a_rank_writes_synchronously_and_still_commits(ranks2, tmp_path):
    results = ranks2.run(_over_budget_writes_synchronously, str(tmp_path))
    for r in results:
        assert r["allocations"] == 0 and r["version"] == 6 and r["same"]
    assert "__0_0.distcp" in results[0]["files"] and "MANIFEST.json" in results[0]["files"]


@pytest.mark.slow  # ~25 s on 2 cores: four ranks and four writer processes start
def test_async_save_on_four_ranks(tmp_path):
    from tests.distributed.launcher import run_ranks

    results = run_ranks(_four_ranks, 4, str(tmp_path), timeout_secs=180)
    assert all(r["version"] == 4 and r["same"] for r in results)
