"""Shared fixtures: autouse hygiene checks that fail a test leaking processes, threads, /dev/shm, process groups or
blocked signals."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from tests._hygiene import LeakChecker


# Signal dispositions and the main thread's signal mask outlive a test: each test gets back the handlers it started
# with, and one that leaves signals blocked fails (an interrupt would never reach a later test's wait).
_RESTORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


@pytest.fixture(autouse=True)
def _hygiene():
    """Fails the test (at teardown) when it leaks, after cleaning up so later tests are not polluted."""
    checker = LeakChecker()
    handlers = {sig: signal.getsignal(sig) for sig in _RESTORED_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    for sig, handler in handlers.items():
        if signal.getsignal(sig) is not handler and handler is not None:
            signal.signal(sig, handler)
    blocked = signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    problems = checker.check_and_clean()
    if blocked != mask:  # a signal left blocked is never delivered to this thread again: a hang for later tests
        problems.append(f"signal mask of the main thread changed: {sorted(mask)} -> {sorted(blocked)}")
    if problems:
        pytest.fail("test is not hygienic:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def tmp_ckpt_dir(tmp_path: Path) -> Path:
    """A fresh per-test directory for checkpoints (alias of ``tmp_path``)."""
    return tmp_path


@pytest.fixture(scope="session")
def fsspec_loop():
    """fsspec's calls (ours through fsspec, and Lightning's: ModelCheckpoint, ckpt_path="last") start fsspec's IO
    thread and its loop's executor thread (DNS lookups) once per process; starting both, one executor thread only,
    before the first test that uses fsspec keeps the per-test thread-leak check meaningful."""
    from concurrent.futures import ThreadPoolExecutor

    import fsspec.asyn

    loop = fsspec.asyn.get_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsspec-executor")

    async def start() -> None:
        loop.set_default_executor(executor)
        await loop.run_in_executor(None, lambda: None)

    fsspec.asyn.sync(loop, start)
