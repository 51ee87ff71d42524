"""Our DCP storage plugins on real gloo ranks: layout, resharding, failed overwrites and commits, corruption."""

from __future__ import annotations

import errno
import json
import os
import threading
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from lightning_ckpt.dcp import DistributedCheckpointer, StorageReader, StorageWriter
from lightning_ckpt.dcp.manifest import DATA_FILE_TEMPLATE, METADATA_NAME
from lightning_ckpt.errors import CheckpointWriteError, CorruptCheckpointError, IncompleteCheckpointError
from lightning_ckpt.commit import is_temp_name
from lightning_ckpt.layout import MANIFEST_NAME
from tests.distributed._dcp_states import fsdp2_model, full_tensors, sharded_state, tree_digest

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]


# ---------------------------------------------------------------- rank functions (run in the spawned ranks)


def _save_fsdp2(rank: int, world: int, path: str) -> dict:
    model = fsdp2_model(world)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0).add_(0.5)  # not the init values
    ck = DistributedCheckpointer(path)
    try:
        ck.save({"model": model.state_dict(), "step": 7})
    finally:
        ck.close()
    return full_tensors(model.state_dict())


def _load_fsdp2(rank: int, world: int, path: str) -> tuple[dict, int]:
    model = fsdp2_model(world, seed=1)  # other values: the load must overwrite them
    state = {"model": model.state_dict(), "step": 0}
    DistributedCheckpointer(StorageWriter(path), StorageReader(path)).load(state)
    model.load_state_dict(state["model"])
    return full_tensors(model.state_dict()), state["step"]


class _FailingWriter(StorageWriter):
    """Fails one rank's write after part of its file is on disk (ENOSPC), or the coordinator's ``finish``."""

    def __init__(self, path: str, fail_rank: int | None = None, fail_finish: bool = False) -> None:
        super().__init__(path)
        self.fail_rank, self.fail_finish = fail_rank, fail_finish

    def _write_chunks(self, f, *args, **kwargs):
        if self.rank == self.fail_rank:
            f.write(b"half a chunk")
            f.flush()
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return super()._write_chunks(f, *args, **kwargs)

    def _write_tail(self, *args, **kwargs):
        files = super()._write_tail(*args, **kwargs)
        if self.fail_finish:
            raise OSError(errno.EIO, "Input/output error (injected in finish)")
        return files


def _describe(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc), "failed_ranks": getattr(exc, "failed_ranks", None),
            "path": getattr(exc, "path", None), "key": getattr(exc, "key", None),
            "expected": getattr(exc, "expected", None), "actual": getattr(exc, "actual", None)}


def _save_failing(rank: int, world: int, writer: StorageWriter, version: int) -> dict | None:
    try:
        DistributedCheckpointer(writer).save(sharded_state(world, version))
    except Exception as e:  # noqa: BLE001 - the test asserts on what every rank raised
        return _describe(e)
    return None


def _loaded_version(world: int, path: str) -> tuple[int, torch.Tensor]:
    state = sharded_state(world, 0)
    DistributedCheckpointer(path).load(state)
    return state["version"], full_tensors(state)["w"]


def _overwrite_fails_on_rank1(rank: int, world: int, path: str) -> dict:
    DistributedCheckpointer(path).save(sharded_state(world, 1))
    dist.barrier()
    before = tree_digest(path)
    failing = _FailingWriter(path, fail_rank=1)
    raised = _save_failing(rank, world, failing, version=2)
    dist.barrier()
    after = tree_digest(path)
    temps_after_failure = _temps(path)
    version_after_failure, _ = _loaded_version(world, path)
    # Plain dcp.save (no entry point of ours to clean up): the temp stays until the writer's next save.
    try:
        dcp.save(sharded_state(world, 4), storage_writer=failing)
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        plain_raised = type(e).__name__
    dist.barrier()
    temps_after_plain_failure = _temps(path)
    dist.barrier()
    failing.fail_rank = None
    DistributedCheckpointer(failing).save(sharded_state(world, 3))
    dist.barrier()
    version, w = _loaded_version(world, path)
    return {"raised": raised, "identical": before == after, "temps_after_failure": temps_after_failure,
            "version_after_failure": version_after_failure, "plain_raised": plain_raised,
            "temps_after_plain_failure": temps_after_plain_failure, "temps_after_next_save": _temps(path),
            "version": version, "w_ok": torch.equal(w, full_tensors(sharded_state(world, 3))["w"])}


def _temps(path: str) -> list[str]:
    return [n for n in os.listdir(os.path.dirname(path)) if is_temp_name(n)]


def _finish_fails(rank: int, world: int, fresh: str, existing: str) -> dict:
    raised_fresh = _save_failing(rank, world, _FailingWriter(fresh, fail_finish=True), version=1)
    DistributedCheckpointer(existing).save(sharded_state(world, 1))
    dist.barrier()
    before = tree_digest(existing)
    raised_existing = _save_failing(rank, world, _FailingWriter(existing, fail_finish=True), version=2)
    dist.barrier()
    return {"raised_fresh": raised_fresh, "fresh_exists": os.path.lexists(fresh),
            "raised_existing": raised_existing, "existing_identical": tree_digest(existing) == before,
            "temps": _temps(fresh)}


def _flipped_byte(rank: int, world: int, path: str) -> dict:
    DistributedCheckpointer(path).save(sharded_state(world, 1))
    dist.barrier()
    if rank == 0:
        victim = os.path.join(path, DATA_FILE_TEMPLATE.format(rank=1))
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    try:
        _loaded_version(world, path)
    except Exception as e:  # noqa: BLE001 - the test asserts on what every rank raised
        return _describe(e)
    return {"type": None}


class _GatedWriter(StorageWriter):
    """Holds the coordinator's ``finish`` until ``gate`` is set (the async save is then provably not committed)."""

    def __init__(self, path: str, gate: threading.Event) -> None:
        super().__init__(path)
        self.gate = gate

    def finish(self, metadata, results):
        if not self.gate.wait(timeout=60):
            raise TimeoutError("test gate was never opened")
        super().finish(metadata, results)


def _async_save(rank: int, world: int, path: str, failing_path: str) -> dict:
    gate = threading.Event()
    ck = DistributedCheckpointer(_GatedWriter(path, gate))
    try:
        state = sharded_state(world, 1)
        expected = full_tensors(state)["w"]
        future = ck.async_save(state)
        state["w"].to_local().add_(100.0)  # training goes on: the checkpoint must not see this
        absent_before_commit = not os.path.exists(path)
        gate.set()
        loaded = sharded_state(world, 0)
        ck.load(loaded)  # waits for the pending save first
        done = future.done() and future.exception() is None
        same = torch.equal(full_tensors(loaded)["w"], expected)
    finally:
        ck.close()
    # The coordinator's finish fails in the background (a rank's failing write process: test_dcp_async.py).
    failing = DistributedCheckpointer(_FailingWriter(failing_path, fail_finish=True))
    try:
        raised = None
        failing.async_save(sharded_state(world, 2)).result(timeout=120)
    except Exception as e:  # noqa: BLE001 - the test asserts on what every rank raised
        raised = _describe(e)
    finally:
        failing.close()
    return {"absent_before_commit": absent_before_commit, "done": done, "same": same, "raised": raised,
            "failing_exists": os.path.exists(failing_path)}


def _other_coordinator(rank: int, world: int, path: str) -> tuple[int, bool]:
    ck = DistributedCheckpointer(path, coordinator_rank=1)
    ck.save(sharded_state(world, 5))
    state = sharded_state(world, 0)
    ck.load(state)
    return state["version"], torch.equal(full_tensors(state)["w"], full_tensors(sharded_state(world, 5))["w"])


# ---------------------------------------------------------------- tests


def test_fsdp2_save_commits_manifest_and_reshards_2_to_1_and_2_to_3(ranks2, tmp_path):
    path = str(tmp_path / "ckpt")
    saved = ranks2.run(_save_fsdp2, path)[0]
    assert sorted(os.listdir(path)) == sorted([METADATA_NAME, MANIFEST_NAME, "__0_0.distcp", "__1_0.distcp"])
    assert [n for n in os.listdir(tmp_path) if is_temp_name(n)] == []
    with open(os.path.join(path, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    assert manifest["world_size"] == 2 and manifest["chunks"]
    assert all(len(c["xxh3"]) == 16 for c in manifest["chunks"].values())

    # 2 -> 1 with plain DCP (no lightning_ckpt reader): it reads our directory as its own.
    one = {"model": {k: torch.zeros_like(v) for k, v in saved.items()}, "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.load(one, checkpoint_id=path, no_dist=True)
    # 2 -> 3 with our verifying reader, resharded by DCP's planner.
    from tests.distributed.launcher import RankPool

    with RankPool(3) as ranks3:
        three = ranks3.run(_load_fsdp2, path)
    for loaded in [one["model"]] + [full for full, _ in three]:
        assert loaded.keys() == saved.keys()
        for key in saved:
            assert torch.equal(loaded[key], saved[key]), key
    assert one["step"] == 7 and [step for _, step in three] == [7, 7, 7]


def test_rank_failing_mid_overwrite_fails_every_rank_and_keeps_the_old_checkpoint(ranks2, tmp_path):
    path = str(tmp_path / "ckpt")
    for out in ranks2.run(_overwrite_fails_on_rank1, path):
        assert out["raised"]["type"] == CheckpointWriteError.__name__, out["raised"]
        assert "rank 1" in out["raised"]["message"] and "No space left" in out["raised"]["message"]
        assert out["raised"]["failed_ranks"] == [1]
        assert out["identical"] and out["version_after_failure"] == 1
        assert out["temps_after_failure"] == []  # our entry point removed the failed save's temp at once
        assert out["plain_raised"] == "CheckpointException"
        assert len(out["temps_after_plain_failure"]) == 1  # plain dcp.save: left until ...
        assert out["temps_after_next_save"] == []  # ... the next save removed it
        assert out["version"] == 3 and out["w_ok"]


def test_finish_failing_leaves_nothing_new_and_fails_every_rank(ranks2, tmp_path):
    fresh, existing = str(tmp_path / "fresh"), str(tmp_path / "existing")
    for out in ranks2.run(_finish_fails, fresh, existing):
        for raised in (out["raised_fresh"], out["raised_existing"]):
            assert raised["type"] == CheckpointWriteError.__name__, raised
            assert "rank 0" in raised["message"] and "injected in finish" in raised["message"]
        assert not out["fresh_exists"]
        assert out["existing_identical"]
        assert out["temps"] == []


def test_flipped_byte_raises_corrupt_checkpoint_error_on_every_rank(ranks2, tmp_path):
    path = str(tmp_path / "ckpt")
    for out in ranks2.run(_flipped_byte, path):
        # Rank 1 read the chunk; rank 0 got the error through DCP's gather (pickled with its fields).
        assert out["type"] == CorruptCheckpointError.__name__, out
        assert out["failed_ranks"] == [1] and "rank 1" in out["message"]
        assert out["path"].endswith("__1_0.distcp") and out["key"] == "w"
        assert out["expected"] and out["actual"] and out["expected"] != out["actual"]


def test_directory_without_manifest_is_refused_with_its_type(tmp_path):
    plain = tmp_path / "plain"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = StorageReader(plain)  # nothing there yet: refused only when it is read
        dcp.save({"w": torch.ones(3)}, checkpoint_id=plain, no_dist=True)  # plain DCP: no manifest
        with pytest.raises(IncompleteCheckpointError, match="plain"):
            StorageReader(plain)
        with pytest.raises(IncompleteCheckpointError, match="plain"):  # reset: before dcp.load's wrapping
            dcp.load({"w": torch.zeros(3)}, checkpoint_id=plain, storage_reader=StorageReader(tmp_path / "x"))
        with pytest.raises(IncompleteCheckpointError, match="plain"):  # set_up_storage_reader, unwrapped by ours
            DistributedCheckpointer(StorageWriter(plain), before, no_dist=True).load({"w": torch.zeros(3)})
        with pytest.raises(FileNotFoundError, match="missing"):
            DistributedCheckpointer(str(tmp_path / "missing"), no_dist=True).load({"w": torch.zeros(3)})


def test_async_save_stages_then_commits_in_the_background_and_fails_every_rank_once(ranks2, tmp_path):
    results = ranks2.run(_async_save, str(tmp_path / "ckpt"), str(tmp_path / "failing"))
    assert results[0]["absent_before_commit"]  # rank 0 holds the commit: nothing at the path yet
    for out in results:
        assert out["done"] and out["same"]  # the load waited; the mutation after async_save did not leak
        assert out["raised"]["type"] == CheckpointWriteError.__name__ and out["raised"]["failed_ranks"] == [0]
        assert not out["failing_exists"]


def test_another_coordinator_rank_commits_and_loads(ranks2, tmp_path):
    assert ranks2.run(_other_coordinator, str(tmp_path / "ckpt")) == [(5, True), (5, True)]
    assert os.path.isfile(tmp_path / "ckpt" / MANIFEST_NAME)


@pytest.mark.slow
def test_four_ranks_fail_mid_overwrite_and_reshard_4_to_2(ranks2, tmp_path):
    from tests.distributed.launcher import RankPool

    path, failing = str(tmp_path / "model"), str(tmp_path / "overwrite")
    with RankPool(4) as ranks4:
        saved = ranks4.run(_save_fsdp2, path)[0]
        for out in ranks4.run(_overwrite_fails_on_rank1, failing):
            assert out["raised"]["failed_ranks"] == [1] and out["identical"] and out["version"] == 3
    assert len([n for n in os.listdir(path) if n.endswith(".distcp")]) == 4
    for loaded, step in ranks2.run(_load_fsdp2, path):
        assert step == 7 and all(torch.equal(loaded[k], saved[k]) for k in saved)
