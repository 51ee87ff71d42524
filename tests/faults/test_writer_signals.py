"""The writer process under signals and forks: job-wide SIGTERM, trainer SIGKILL, forked children, SIGSTOP."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import pytest
import torch

import lightning_ckpt as lc
from tests._helpers import wait_for
from tests.faults._faults import load_verified, pid_gone, start_with_writer, stop, wait_pid_gone


def _start_trainer(mode: str, directory, stderr_path):
    proc, pids = start_with_writer("tests.faults.signal_trainer", [mode, directory], directory, stderr_path,
                                   "the trainer to start its writer")
    return proc, [int(p) for p in pids.split()]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["hold", "drain"])
def test_job_wide_sigterm_still_commits_the_checkpoint_in_flight(mode, tmp_path):
    """SIGTERM to trainer and writer at once (a cgroup-wide stop): the write in flight still commits."""
    stderr_path = tmp_path / "stderr.txt"
    run = tmp_path / "run"
    run.mkdir()
    proc, (writer_pid,) = _start_trainer(mode, run, stderr_path)
    try:
        wait_for(lambda: (run / "entered").exists(), 120, "the writer to hold in pre_commit")
        for pid in (proc.pid, writer_pid):
            os.kill(pid, signal.SIGTERM)
        if mode == "hold":  # the default action ends the trainer at once
            assert proc.wait(timeout=60) == -signal.SIGTERM
        (run / "release").touch()
        if mode == "drain":  # the handler drained the writer, then exited cleanly
            assert proc.wait(timeout=120) == 0, stderr_path.read_text()
            assert (run / "drained").read_text() == "drained True"
        wait_pid_gone(writer_pid, 60, "the writer to exit after committing")
    finally:
        stop(proc)
    assert torch.equal(load_verified(str(run / "a.ckpt"))["w"], torch.arange(1000.0))
    assert "Traceback" not in stderr_path.read_text(), stderr_path.read_text()


@pytest.mark.timeout(240)
def test_writer_exits_after_trainer_sigkill_although_a_forked_child_lives(tmp_path):
    """The forked child closed its copy of the trainer's socket end, so the orphaned writer sees EOF and exits
    (quietly) while the child still runs."""
    stderr_path = tmp_path / "stderr.txt"
    run = tmp_path / "run"
    run.mkdir()
    proc, (writer_pid, child_pid) = _start_trainer("fork", run, stderr_path)
    try:
        proc.kill()
        proc.wait(timeout=60)
        wait_pid_gone(writer_pid, 60, "the orphaned writer to exit")
        assert not pid_gone(child_pid), "the forked child should still live"
    finally:
        (run / "release_child").touch()
        stop(proc)
    wait_pid_gone(child_pid, 60, "the forked child to exit")
    assert "Traceback" not in stderr_path.read_text(), stderr_path.read_text()


@pytest.mark.timeout(240)
def test_writer_start_does_not_hang_while_other_threads_fork(tmp_path):
    """A thread forking children that outlive the start (DataLoader workers) cannot hang starting the writer:
    ``Popen`` would wait for the exec-status pipe those children inherited."""
    r, w = os.pipe()
    stop_forking = threading.Event()
    children: list[int] = []

    def fork_repeatedly() -> None:
        while not stop_forking.is_set() and len(children) < 200:
            pid = os.fork()
            if pid == 0:  # lives until the parent closes the pipe's write end
                os.close(w)
                os.read(r, 1)
                os._exit(0)
            children.append(pid)

    forker = threading.Thread(target=fork_repeatedly, name="test-forker")
    forker.start()
    started: list[int] = []
    try:
        for _ in range(3):
            process = lc.CheckpointProcess(lc.RankInfo(0, 1))
            starter = threading.Thread(target=process.start, name="test-start")
            starter.start()
            starter.join(timeout=90)
            assert not starter.is_alive(), "starting the writer hung while another thread forked"
            started.append(process.pid)
            process.close()
    finally:
        stop_forking.set()
        forker.join(timeout=60)
        os.close(w)
        for pid in children:
            os.waitpid(pid, 0)
        os.close(r)
    assert len(started) == 3 and len(children) > 0


@pytest.mark.timeout(120)
def test_stopped_writer_is_reported_within_the_heartbeat_timeout(tmp_path, caplog):
    """A SIGSTOPped writer makes no progress: the save fails after ``stall_timeout_secs`` (not the hour-long
    write timeout), a warning names what was waited for, and the next save runs on a new writer."""
    config = lc.CheckpointerConfig(process_config=lc.CheckpointProcessConfig(stall_timeout_secs=2.0,
                                                                              wait_log_interval_secs=0.5))
    with lc.make_async_checkpointer(config) as ck:
        ck.start()
        stopped = ck.process.pid
        os.kill(stopped, signal.SIGSTOP)
        try:
            _, write_future = ck.save(tmp_path / "a.ckpt", {"w": torch.ones(8)})
            with caplog.at_level("WARNING", logger="lightning_ckpt"):
                with pytest.raises(lc.CheckpointTimeoutError, match=r"no progress.*stopped"):
                    write_future.result(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):  # already killed and reaped by the checkpointer
                os.kill(stopped, signal.SIGCONT)
        assert any("still waiting for writing" in r.getMessage() and "a.ckpt" in r.getMessage()
                   for r in caplog.records)
        wait_pid_gone(stopped, 30, "the stalled writer to be killed")
        ck.save(tmp_path / "b.ckpt", {"w": torch.zeros(8)})[1].result(timeout=60)
        assert ck.process.starts == 2 and ck.process.pid != stopped
    assert not (tmp_path / "a.ckpt").exists()
    assert torch.equal(load_verified(str(tmp_path / "b.ckpt"))["w"], torch.zeros(8))


@pytest.mark.timeout(300)
def test_fit_with_forking_dataloader_workers_does_not_deadlock_starting_the_writer(tmp_path):
    """DataLoader(num_workers=2) forks its workers while AsyncCheckpointIO starts the writer in the background:
    the fit completes and every periodic checkpoint commits. (A review saw this fit hang in Popen; whether a fork
    lands in that window is timing, which ``test_writer_start_does_not_hang_while_other_threads_fork`` forces.)"""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ckpt.lightning import AsyncCheckpointIO
    from tests.lightning.helpers import TinyModel, trainer

    x = torch.randn(96, 8, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, num_workers=2,
                      multiprocessing_context="fork")
    ckpts = tmp_path / "ckpts"
    every_two = ModelCheckpoint(dirpath=ckpts, every_n_train_steps=2, save_top_k=-1)
    fit = trainer(tmp_path, max_steps=6, plugins=[AsyncCheckpointIO()], callbacks=[every_two],
                  enable_checkpointing=True)
    fit.fit(TinyModel(), data)
    names = sorted(n for n in os.listdir(ckpts) if n.endswith(".ckpt"))
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"], names
    for name in names:
        assert "state_dict" in torch.load(ckpts / name, weights_only=False)


def _fork_and_write_in_child(process: lc.CheckpointProcess, path) -> int:
    child = os.fork()
    if child == 0:
        code = 1
        try:
            process.write({"from": "child"}, path).result(timeout=120)
            code = 0 if process.pid not in (None, os.getppid()) and process.starts >= 1 else 2
            process.close()
        finally:
            os._exit(code)
    return child


@pytest.mark.timeout(240)
def test_forked_child_gets_its_own_writer_and_leaves_the_parents_alone(tmp_path):
    """A child forked while the parent's writer runs does not talk to the parent's writer: its first write starts
    a writer of its own, and the parent's keeps serving the parent."""
    process = lc.CheckpointProcess(lc.RankInfo(0, 1))
    try:
        process.write({"from": "parent"}, tmp_path / "p1.ckpt").result(timeout=120)
        parent_writer = process.pid
        child = _fork_and_write_in_child(process, tmp_path / "c.ckpt")
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        process.write({"from": "parent"}, tmp_path / "p2.ckpt").result(timeout=120)
        assert process.pid == parent_writer and process.starts == 1
    finally:
        process.close()
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".ckpt")) == ["c.ckpt", "p1.ckpt", "p2.ckpt"]
