"""The leak detectors behind the autouse hygiene fixture report deliberate leaks, and stay quiet once they are cleaned."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

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


@pytest.mark.skipif(not os.path.isdir(_hygiene.SHM_DIR), reason="no /dev/shm")
def test_reports_leaked_shm_entry():
    before = _hygiene.shm_snapshot()
    name = f"lightning_ckpt_hygiene_test_{os.getpid()}"
    with open(os.path.join(_hygiene.SHM_DIR, name), "wb") as f:
        f.write(b"x")
    try:
        assert _hygiene.leaked_shm(before, grace_secs=0.1) == [name]
    finally:
        _hygiene.remove_shm([name])
    assert _hygiene.leaked_shm(before, grace_secs=0.1) == []


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
