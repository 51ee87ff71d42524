"""The checkpointer's lifecycle at its edges: an orphaned writer, a script that ends without ``close()``, and a
checkpointer dropped without ``close()``."""

from __future__ import annotations

import gc
import os
import signal
import threading
import weakref

import pytest
import torch

import lightning_ckpt as lc
from lightning_ckpt.staging_buffer import StagingBuffer
from tests._helpers import GateHook, wait_for
from tests.faults._faults import load_verified, start_with_writer, stop, tmp_leftovers, wait_pid_gone
from tests.faults.lifecycle_worker import exit_state, make_config, step_state


def _start_worker(mode: str, directory, layout: str = "file"):
    """Start ``lifecycle_worker`` and wait until its writer runs; returns the process, its writer's pid and the
    file that collects both processes' stderr."""
    log_path = directory.parent / f"{mode}-stderr.txt"
    proc, pids = start_with_writer("tests.faults.lifecycle_worker", [mode, directory, layout], directory, log_path,
                                   "the worker to start its writer")
    return proc, int(pids), log_path


def _reaped(pid: int) -> bool:
    """Gone from the process table (not even a zombie): someone waited for it."""
    return not os.path.exists(f"/proc/{pid}")


def _writer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("lightning_ckpt")]


def _staging_memfds() -> int:
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += "memfd:lightning_ckpt-staging" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return found


# ---------------------------------------------------------------- an orphaned writer


@pytest.mark.timeout(150)
@pytest.mark.parametrize("layout, previous, rival", [("file", True, True), ("dir", False, True), ("file", True, False)],
                         ids=["file-replaced-by-newer", "dir-appeared-meanwhile", "file-nobody-else"])
def test_orphaned_writer_never_publishes_over_a_newer_runs_checkpoint(layout, previous, rival, tmp_path):
    """Run A is SIGKILLed while its writer holds step 1 before the publish; run B commits step 2 at the same path;
    A's orphaned writer then drops step 1 (naming the path) instead of putting it over step 2. With no run B, the
    orphan still commits over the unchanged previous checkpoint (a crash must not lose the save in flight)."""
    run = tmp_path / "run"
    run.mkdir()
    path = run / "last.ckpt"
    if previous:
        with lc.make_async_checkpointer(make_config(layout)) as ck:
            ck.save(path, step_state(0))[1].result(timeout=60)
    proc, writer_pid, log_path = _start_worker("orphan", run, layout)
    try:
        wait_for(lambda: (run / "entered").exists(), 60, "run A's writer to hold before its publish")
        proc.kill()
        proc.wait(timeout=60)
        if rival:
            with lc.make_async_checkpointer(make_config(layout)) as ck:
                ck.save(path, step_state(2))[1].result(timeout=60)
        (run / "release").touch()
        wait_pid_gone(writer_pid, 60, "run A's orphaned writer to finish and exit")
    finally:
        stop(proc)
    assert load_verified(str(path))["step"] == (2 if rival else 1)
    assert tmp_leftovers(run) == []
    stderr = log_path.read_text()
    assert ("not committing" in stderr and str(path) in stderr) == rival, stderr
    assert "Traceback" not in stderr, stderr


# ---------------------------------------------------------------- a script that ends without close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("writer_fate", ["commits", pytest.param("killed", marks=pytest.mark.stale_tmp_expected)])
def test_script_ending_without_close_drains_its_save_at_exit(writer_fate, tmp_path):
    """The script ends while its save is still in flight (held in the writer): the interpreter's exit waits for it,
    so the checkpoint is committed once the process is gone; a save that cannot finish is logged as lost, by path."""
    run = tmp_path / "run"
    run.mkdir()
    proc, writer_pid, log_path = _start_worker("exit", run)
    try:
        wait_for(lambda: "in flight; waiting" in log_path.read_text() or proc.poll() is not None, 60,
                 "the worker's script to end")
        assert proc.poll() is None, f"exited without waiting for its save:\n{log_path.read_text()}"
        if writer_fate == "commits":
            (run / "release").touch()
        else:
            os.kill(writer_pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == 0, log_path.read_text()
    finally:
        stop(proc)
    stderr = log_path.read_text()
    if writer_fate == "commits":
        assert torch.equal(load_verified(str(run / "a.ckpt"))["w"], exit_state()["w"])
        assert "lost at exit" not in stderr, stderr
    else:
        assert not (run / "a.ckpt").exists()
        assert f"checkpoint save of {run / 'a.ckpt'} was lost at exit" in stderr, stderr


# ---------------------------------------------------------------- a checkpointer dropped without close()


@pytest.mark.timeout(90)
def test_dropped_checkpointer_releases_writer_threads_and_staging_memory(tmp_path):
    """Checkpointers created, used and dropped without ``close()``: once collected, their writers exit and are
    reaped, their threads end and their staging memfds close."""
    memfds_before = _staging_memfds()
    pids = []
    for i in range(3):
        ck = lc.make_async_checkpointer()
        ck.save(tmp_path / f"a{i}.ckpt", {"w": torch.randn(256, 1024)})[1].result(timeout=60)
        pids.append(ck.process.pid)
        del ck
    gc.collect()
    for pid in pids:
        wait_for(lambda: _reaped(pid), 30, f"writer {pid} of a dropped checkpointer to exit and be reaped")
    wait_for(lambda: not _writer_threads(), 30, "the threads of dropped checkpointers to end")
    assert _staging_memfds() == memfds_before


@pytest.mark.timeout(90)
def test_writer_process_dropped_on_its_own_watcher_thread_is_released(tmp_path):
    """The last reference to a ``CheckpointProcess`` goes in a callback its link's watcher thread runs: the
    finalizer runs on that very thread, so it must neither join it nor wait; the writer is still reaped."""
    gate = GateHook(str(tmp_path / "entered"), str(tmp_path / "release"))
    holder = [lc.CheckpointProcess(lc.RankInfo(0, 1), commit_hook=gate)]
    process_ref = weakref.ref(holder[0])
    seen: dict = {}
    done = threading.Event()

    def drop(_future) -> None:
        seen["thread"] = threading.current_thread().name
        holder.clear()
        seen["collected"] = process_ref() is None
        done.set()

    holder[0].write({"step": 1}, tmp_path / "a.ckpt").add_done_callback(drop)
    pid = holder[0].pid
    wait_for(lambda: (tmp_path / "entered").exists(), 60, "the writer to hold the write")
    (tmp_path / "release").touch()
    assert done.wait(timeout=60), "the write's callback never ran"
    assert seen == {"thread": f"lightning_ckpt-writer-{pid}-watch", "collected": True}
    wait_for(lambda: _reaped(pid), 30, "the writer to exit and be reaped")
    wait_for(lambda: not _writer_threads(), 30, "the link's threads to end")
    assert load_verified(str(tmp_path / "a.ckpt")) == {"step": 1}


@pytest.mark.timeout(90)
def test_checkpointer_dropped_with_a_save_in_flight_still_commits_it(tmp_path):
    """Dropping a checkpointer while its writer holds a save does not lose that save: the link stays until the
    save is answered, then everything is released."""
    gate = GateHook(str(tmp_path / "entered"), str(tmp_path / "release"))
    ck = lc.make_async_checkpointer(commit_hook=gate)
    ck.save(tmp_path / "a.ckpt", {"w": torch.arange(64.0)})
    wait_for(lambda: (tmp_path / "entered").exists(), 60, "the writer to hold the save")
    pid = ck.process.pid
    del ck
    gc.collect()  # nothing goes while the save is in flight
    (tmp_path / "release").touch()
    wait_for(lambda: gc.collect() >= 0 and _reaped(pid), 30, "the writer to commit, then (the dropped "
             "checkpointer collected) exit and be reaped")
    wait_for(lambda: not _writer_threads(), 30, "the link's threads to end")
    assert torch.equal(load_verified(str(tmp_path / "a.ckpt"))["w"], torch.arange(64.0))


def test_staging_buffer_dropped_without_close_closes_its_memfd():
    buffer = StagingBuffer(1 << 20, shared=True, pinned=False)
    fd, name = buffer.fd, f"/memfd:lightning_ckpt-staging-{buffer.id} (deleted)"
    assert os.readlink(f"/proc/self/fd/{fd}") == name
    del buffer
    gc.collect()
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") != name
    except FileNotFoundError:
        pass  # closed, and the number not reused
