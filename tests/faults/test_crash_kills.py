"""SIGKILL of the writer subprocess and of the training process: nothing torn, nothing lost, resume is exact."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import lightning_ckpt as lc
from tests._helpers import wait_for
from tests.faults._faults import PathGateHook, assert_invariant, fault_trials, tmp_leftovers
from tests.faults._trials import Reference, trainer_kill_trial, writer_kill_trial

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("trial", range(fault_trials(3)))
def test_writer_sigkill_at_a_random_instant_tears_and_loses_nothing(trial, tmp_path):
    result = writer_kill_trial(str(tmp_path), seed=7000 + trial)
    assert result.torn == [] and result.lost == [], result
    assert result.problems == [], result
    assert result.identical, "the save after the kill did not round-trip"


def test_writer_killed_before_commit_fails_the_next_save_once_then_a_new_writer_cleans_up(tmp_path):
    """Deterministic kill point: the temp file is complete and the writer waits in ``pre_commit``."""
    gate = PathGateHook("victim", str(tmp_path / "entered"), str(tmp_path / "never"))
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    good, nxt = {"w": torch.arange(10.0)}, {"w": torch.zeros(3)}
    with lc.make_async_checkpointer(commit_hook=gate) as ck:
        ck.save(ckpts / "good.ckpt", good)[1].result(timeout=60)
        _, victim = ck.save(ckpts / "victim.ckpt", {"w": torch.ones(100_000)})
        wait_for(lambda: os.path.exists(gate.entered_file), 60, "the writer to reach pre_commit")
        assert len(tmp_leftovers(str(ckpts))) == 1  # the complete data under its temp name
        pid, starts = ck.process.pid, ck.process.starts
        os.kill(pid, signal.SIGKILL)
        wait_for(victim.done, 60, "the future of the killed write")
        with pytest.raises(lc.WriterProcessDiedError, match=f"pid {pid}.*SIGKILL"):
            ck.save(ckpts / "next.ckpt", nxt)  # raised once at the next save...
        ck.save(ckpts / "next.ckpt", nxt)[1].result(timeout=60)  # ...then cleared, on a new writer
        assert ck.process.starts == starts + 1 and ck.process.pid != pid
        assert tmp_leftovers(str(ckpts)) == []  # the new writer removed the dead writer's temp file
        assert sorted(os.listdir(ckpts)) == ["good.ckpt", "next.ckpt"]
        assert_invariant(str(ckpts), {"good.ckpt": good, "next.ckpt": nxt})


@pytest.fixture(scope="module")
def reference():
    return Reference.run(steps=24, seed=3)


@pytest.mark.parametrize("trial", range(fault_trials(1)))
def test_trainer_sigkill_mid_save_then_resume_is_bit_identical(trial, reference, tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    result = trainer_kill_trial(str(directory), reference, kill_seed=100 + trial)
    assert result.torn == [] and result.lost == [], result
    assert result.problems == [], result
    assert result.notes["resumed_from"] >= result.notes["last_committed"], result  # newest commit was used
    assert result.identical, f"resumed run differs from the uninterrupted one: {result}"
