"""After ``os.fork`` (a user's helper, a multiprocessing pool) a child never shares the parent's staging or saves."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lightning_ckpt as lc
from tests._helpers import wait_for

_CK = None  # the parent's checkpointer, inherited by the pool's forked workers
_N = 1 << 14  # elements: below torch's parallel grain, as OpenMP's thread pool does not survive fork


_STATUS: dict[int, int] = {}


def _child_save_then_exit(ck, path: str, value: float) -> None:
    """Runs in the forked child: save with the inherited checkpointer, then leave without pytest's teardown."""
    code = 1
    try:
        ck.save(path, {"w": torch.full((_N,), value)})[1].result(timeout=60)
        ck.close()
        code = 0
    finally:
        os._exit(code)


@pytest.mark.timeout(180)
def test_forked_child_never_writes_the_parents_tensors(tmp_path):
    with lc.make_async_checkpointer() as ck:
        ck.save(tmp_path / "a.ckpt", {"w": torch.full((_N,), 1.0)})[1].result(timeout=60)  # a buffer exists
        pid = os.fork()
        if pid == 0:
            _child_save_then_exit(ck, str(tmp_path / "child.ckpt"), 7.0)
        for i in range(3):  # the parent keeps saving into its buffer meanwhile
            ck.save(tmp_path / f"b{i}.ckpt", {"w": torch.full((_N,), 2.0 + i)})[1].result(timeout=60)
        status = _wait_status(pid, 120)
        assert status == 0, f"the child's save did not complete (status {status})"
        assert ck.stager.allocations == 1  # the parent's pool is untouched by the child
        for name, value in [("a", 1.0), ("child", 7.0), ("b0", 2.0), ("b1", 3.0), ("b2", 4.0)]:
            assert torch.equal(ck.load(tmp_path / f"{name}.ckpt")["w"], torch.full((_N,), value)), name


def _wait_status(pid: int, timeout_secs: float) -> int | None:
    def done() -> bool:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            _STATUS[pid] = os.waitstatus_to_exitcode(status)
        return pid in _STATUS

    try:
        wait_for(done, timeout_secs, f"forked child {pid}")
    except TimeoutError:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return None
    return _STATUS.pop(pid)


_EXIT_SCRIPT = textwrap.dedent("""
    import atexit, os, sys, torch
    import lightning_ckpt as lc
    from tests._helpers import GateHook, file_layout_config
    config = file_layout_config(wait_timeout_secs=90)
    ck = lc.make_async_checkpointer(config, commit_hook=GateHook({entered!r}, {release!r}, timeout_secs=120))
    atexit.register(ck.close)  # as AsyncCheckpointIO does
    ck.save({path!r}, {{"w": torch.ones(8)}})
    while not os.path.exists({entered!r}):
        pass
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # a normal exit: atexit runs ck.close() in the child
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    open({release!r}, "w").close()
    ck.wait()
    print("child", os.waitstatus_to_exitcode(status), flush=True)
""")


@pytest.mark.timeout(180)
def test_forked_child_exits_at_once_while_the_parents_save_is_in_flight(tmp_path):
    script = _EXIT_SCRIPT.format(entered=str(tmp_path / "entered"), release=str(tmp_path / "release"),
                                 path=str(tmp_path / "a.ckpt"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        child = int(proc.stdout.readline())
        # the child's exit must not wait for the parent's save (old: it waited wait_timeout_secs in atexit)
        wait_for(lambda: not os.path.exists(f"/proc/{child}") or _zombie(child), 30, "the forked child to exit")
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "child 0" in out
    assert torch.equal(torch.load(tmp_path / "a.ckpt")["w"], torch.ones(8))


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _pool_save(args: tuple[str, float]) -> int:
    path, value = args
    _CK.save(path, {"w": torch.full((_N,), value)})[1].result(timeout=60)
    _CK.close()  # this worker's own writer and buffers; the parent's stay
    return os.getpid()


@pytest.mark.timeout(240)
def test_fork_pool_workers_save_with_their_own_buffers_and_writers(tmp_path):
    global _CK
    _CK = lc.make_async_checkpointer()
    try:
        _CK.save(tmp_path / "parent.ckpt", {"w": torch.full((_N,), -1.0)})[1].result(timeout=60)
        parent_writer = _CK.process.pid
        with multiprocessing.get_context("fork").Pool(2, maxtasksperchild=1) as pool:
            pids = pool.map(_pool_save, [(str(tmp_path / f"w{i}.ckpt"), float(i)) for i in range(2)], chunksize=1)
        assert os.getpid() not in pids
        _CK.save(tmp_path / "after.ckpt", {"w": torch.full((_N,), 9.0)})[1].result(timeout=60)
        assert _CK.process.pid == parent_writer  # the parent's writer was not disturbed
        for name, value in [("parent", -1.0), ("w0", 0.0), ("w1", 1.0), ("after", 9.0)]:
            assert torch.equal(_CK.load(tmp_path / f"{name}.ckpt")["w"], torch.full((_N,), value)), name
    finally:
        _CK.close()
        _CK = None
