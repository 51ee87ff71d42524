"""SIGKILL of a rank in the middle of a sharded save: the final path keeps the old checkpoint (or nothing), the
surviving rank raises an error naming the dead rank instead of hanging, and the next save removes the temp."""

from __future__ import annotations

import os
import signal
import warnings

import pytest
import torch
import torch.distributed as dist

from lightning_ckpt.commit import is_temp_name
from lightning_ckpt.dcp import DistributedCheckpointer, StorageWriter
from lightning_ckpt.errors import CheckpointWriteError
from lightning_ckpt.integrity import check_checkpoint
from tests.distributed._dcp_states import sharded_state, tree_digest

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]


class _DyingFile:
    """A rank's data file that writes half of the first chunk it is given, then SIGKILLs its own process."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data) -> int:
        view = memoryview(data)
        self._f.write(view[: len(view) // 2])
        self._f.flush()
        os.fsync(self._f.fileno())  # part of the new file is really on disk
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable: SIGKILL is not catchable")

    def __getattr__(self, name):
        return getattr(self._f, name)


class _KillingWriter(StorageWriter):
    """Our writer, whose ``kill_rank`` dies by SIGKILL in ``write_data`` after part of its file is written."""

    def __init__(self, path: str, kill_rank: int) -> None:
        super().__init__(path)
        self.kill_rank = kill_rank

    def _write_chunks(self, f, *args, **kwargs):
        return super()._write_chunks(_DyingFile(f) if self.rank == self.kill_rank else f, *args, **kwargs)


def _killed_mid_save(rank: int, world: int, path: str, kill_rank: int, existing: bool) -> dict:
    before = None
    if existing:
        DistributedCheckpointer(path).save(sharded_state(world, 1))
        dist.barrier()
        before = tree_digest(path)
    try:
        DistributedCheckpointer(_KillingWriter(path, kill_rank)).save(sharded_state(world, 2))
    except Exception as e:  # noqa: BLE001 - the test asserts on what the survivor raised
        return {"type": type(e).__name__, "message": str(e), "failed_ranks": getattr(e, "failed_ranks", None),
                "before": before}
    return {"type": None, "before": before}


def _temps(path: str) -> list[str]:
    return [n for n in os.listdir(os.path.dirname(path)) if is_temp_name(n)]


def _run_with_a_killed_rank(path: str, kill_rank: int, existing: bool) -> dict:
    from tests.distributed.launcher import run_ranks

    results = run_ranks(_killed_mid_save, 2, path, kill_rank, existing, may_die=frozenset({kill_rank}),
                        timeout_secs=120)
    assert results[kill_rank] is None  # it really died (SIGKILL), without reporting anything
    return results[1 - kill_rank]


def _next_save_cleans_the_temp(path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        DistributedCheckpointer(path, no_dist=True).save({"w": torch.full((4,), 3.0), "version": 3})
        assert _temps(path) == []
        assert check_checkpoint(path, deep=True).ok
        state = {"w": torch.zeros(4), "version": 0}
        DistributedCheckpointer(path, no_dist=True).load(state)
    assert state["version"] == 3 and torch.equal(state["w"], torch.full((4,), 3.0))


def test_sigkill_of_a_rank_mid_overwrite_keeps_the_old_checkpoint_and_names_the_rank(tmp_path):
    path = str(tmp_path / "ckpt")
    survivor = _run_with_a_killed_rank(path, kill_rank=1, existing=True)
    assert survivor["type"] == CheckpointWriteError.__name__, survivor  # not gloo's bare "Connection reset"
    assert "lost rank 1" in survivor["message"] and survivor["failed_ranks"] == [1], survivor
    assert tree_digest(path) == survivor["before"]  # the old checkpoint, bit-identical
    assert check_checkpoint(path, deep=True).ok
    assert _temps(path) == []  # the surviving coordinator removed its temp (with the dead rank's half file)
    _next_save_cleans_the_temp(path)


def test_sigkill_of_the_coordinator_mid_save_leaves_nothing_and_names_the_rank(tmp_path):
    path = str(tmp_path / "ckpt")
    survivor = _run_with_a_killed_rank(path, kill_rank=0, existing=False)
    assert survivor["type"] == CheckpointWriteError.__name__, survivor
    assert "lost rank 0" in survivor["message"] and survivor["failed_ranks"] == [0], survivor
    assert not os.path.lexists(path)
    assert len(_temps(path)) == 1  # the dead coordinator's temp: only a save may remove it ...
    _next_save_cleans_the_temp(path)  # ... and the next one does


def _same_failure_everywhere(rank: int, world: int, path: str) -> bool:
    from lightning_ckpt.dcp.failures import name_lost_ranks

    error = RuntimeError("a failure every rank saw")
    return name_lost_ranks(error, "saving", path) is error


def test_a_failure_every_rank_saw_is_not_blamed_on_a_lost_rank(ranks2, tmp_path):
    assert ranks2.run(_same_failure_everywhere, str(tmp_path / "ckpt")) == [True, True]
