"""The leak detectors behind the autouse hygiene fixture report deliberate leaks, and stay quiet once they are cleaned."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests import _hygiene


def test_reports_and_kills_leaked_child_process():
    before = _hygiene.child_pids()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        leaked = _hygiene.leaked_processes(before, grace_secs=0.2)
        assert [pid for pid, _ in leaked] == [proc.pid]
        assert "time.sleep(60)" in leaked[0][1]
        _hygiene.kill_processes([proc.pid])
        assert _hygiene.leaked_processes(before, grace_secs=0.2) == []
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_child_that_exits_within_grace_is_not_a_leak():
    before = _hygiene.child_pids()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    try:
        assert _hygiene.leaked_processes(before, grace_secs=5.0) == []
    finally:
        proc.wait(timeout=10)


def test_reports_leaked_thread():
    before = _hygiene.thread_snapshot()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="deliberate-leak")
    thread.start()
    try:
        assert _hygiene.leaked_threads(before, grace_secs=0.1) == [thread]
    finally:
        stop.set()
        thread.join(timeout=10)
    assert _hygiene.leaked_threads(before, grace_secs=0.1) == []


def test_ignores_pydevd_threads():
    before = _hygiene.thread_snapshot()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="pydevd.Reader")
    thread.start()
    try:
        assert _hygiene.leaked_threads(before, grace_secs=0.1) == []
    finally:
        stop.set()
        thread.join(timeout=10)


needs_shm = pytest.mark.skipif(not os.path.isdir(_hygiene.SHM_DIR), reason="no /dev/shm")


def _shm_name() -> str:
    return f"lightning_ckpt_hygiene_test_{uuid.uuid4().hex}"


def _wait_for(condition, what: str, timeout_secs: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_secs
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_secs}s waiting for {what}"
        time.sleep(0.01)


@needs_shm
def test_reports_shm_entry_this_process_created():
    watch = _hygiene.ShmWatch()
    name = _shm_name()
    try:
        with open(os.path.join(_hygiene.SHM_DIR, name), "wb") as f:
            f.write(b"x")
        assert _hygiene.leaked_shm(watch, grace_secs=0.1) == [name]
        watch.remove([name])
        assert _hygiene.leaked_shm(watch, grace_secs=0.1) == []
    finally:
        watch.close()
        _unlink_quietly(name)


@needs_shm
def test_reports_shm_entry_that_a_descendant_created_and_left_behind():
    watch = _hygiene.ShmWatch()
    name = _shm_name()
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD_THEN_EXIT, os.path.join(_hygiene.SHM_DIR, name)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout.readline() == b"ready\n"
        _wait_for(lambda: name in watch.created(), f"the watch to attribute {name} to the child")
        child.stdin.close()  # the child exits without unlinking: a leak of this test
        child.wait(timeout=30)
        assert _hygiene.leaked_shm(watch, grace_secs=0.1) == [name]
        watch.remove([name])
        assert not os.path.exists(os.path.join(_hygiene.SHM_DIR, name))
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()
        watch.close()
        _unlink_quietly(name)


@needs_shm
def test_never_reports_or_removes_shm_entries_that_another_process_tree_created():
    """Another job's entries (here: made by a process that is not our descendant, held or already closed) survive."""
    checker = _hygiene.LeakChecker(grace_secs=0.2)
    closed, held = _shm_name(), _shm_name()
    paths = [os.path.join(_hygiene.SHM_DIR, n) for n in (closed, held)]
    launcher = subprocess.Popen([sys.executable, "-c", _FOREIGN_CREATOR, *paths], stdout=subprocess.PIPE)
    try:
        foreign_pid = int(launcher.stdout.readline())
        launcher.wait(timeout=30)
        _wait_for(lambda: all(os.path.exists(p) for p in paths), "the foreign process to create its entries")
        assert foreign_pid not in _hygiene.child_pids()
        assert checker.check_and_clean() == []
        assert all(os.path.exists(p) for p in paths)
    finally:
        checker.shm.close()
        launcher.stdout.close()
        for path in paths:
            _unlink_quietly(os.path.basename(path))


def _unlink_quietly(name: str) -> None:
    try:
        os.unlink(os.path.join(_hygiene.SHM_DIR, name))
    except FileNotFoundError:
        pass


_HOLD_THEN_EXIT = """
import sys
f = open(sys.argv[1], "wb")
f.write(b"x"); f.flush()
print("ready", flush=True)
sys.stdin.read()
"""

# double fork: the grandchild is re-parented away from this test's tree, then creates one entry it closes at once
# and one it holds until its deadline (or until the test unlinks it)
_FOREIGN_CREATOR = """
import os, sys, time
launcher = os.getpid()
if os.fork():
    os._exit(0)
print(os.getpid(), flush=True)
deadline = time.monotonic() + 30
while os.getppid() == launcher and time.monotonic() < deadline:
    time.sleep(0.01)
open(sys.argv[1], "wb").close()
held = open(sys.argv[2], "wb")
while os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.05)
"""


def test_reports_initialized_process_group(free_port):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = dist.TCPStore("127.0.0.1", free_port, world_size=1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert _hygiene.process_group_initialized()
    finally:
        _hygiene.destroy_process_group()
    assert not _hygiene.process_group_initialized()


def test_leak_checker_reports_and_cleans_everything():
    checker = _hygiene.LeakChecker(grace_secs=0.2)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="deliberate-leak")
    thread.start()
    try:
        problems = checker.check_and_clean()
        assert len(problems) == 2
        assert f"pid {proc.pid}" in problems[0]
        assert "'deliberate-leak'" in problems[1]
        proc.wait(timeout=10)  # killed by check_and_clean
    finally:
        stop.set()
        thread.join(timeout=10)
        proc.kill()
        proc.wait(timeout=10)
    assert checker.check_and_clean() == []


def test_free_port_is_bindable(free_port):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port))


def test_tmp_ckpt_dir_is_empty_dir(tmp_ckpt_dir):
    assert tmp_ckpt_dir.is_dir()
    assert list(tmp_ckpt_dir.iterdir()) == []
