"""Leak detection for tests: child processes, Python threads, /dev/shm entries and torch.distributed process groups.

Plain functions so they can be unit-tested; ``tests/conftest.py`` wires them into an autouse fixture.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable

try:
    import psutil
except ImportError:  # psutil is in the test extra, but the fixtures must work without it
    psutil = None

GRACE_SECS = 5.0
POLL_SECS = 0.05
SHM_DIR = "/dev/shm"
IGNORED_THREAD_PREFIXES = ("pydevd",)
PYTEST_TIMEOUT_THREAD_PREFIX = "pytest_timeout "


def _poll_until(still_leaking: Callable[[], list], grace_secs: float) -> list:
    """Re-evaluates ``still_leaking`` until it returns nothing or ``grace_secs`` have passed; returns the last result."""
    deadline = time.monotonic() + grace_secs
    leaking = still_leaking()
    while leaking and time.monotonic() < deadline:
        time.sleep(POLL_SECS)
        leaking = still_leaking()
    return leaking


# ---------------------------------------------------------------- processes


def _proc_children_without_psutil(root_pid: int) -> dict[int, bool]:
    """Maps each descendant pid of ``root_pid`` to whether it is still running (not a zombie), from /proc."""
    parent_of: dict[int, int] = {}
    running: dict[int, bool] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: fields after the last ')' are state, ppid, ...
        fields = stat[stat.rfind(")") + 2 :].split()
        parent_of[int(entry)] = int(fields[1])
        running[int(entry)] = fields[0] not in ("Z", "X")
    found: dict[int, bool] = {}
    frontier = [root_pid]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parent_of.items():
            if ppid == parent and pid not in found:
                found[pid] = running[pid]
                frontier.append(pid)
    return found


def _descendants(root_pid: int) -> dict[int, bool]:
    """Maps each descendant pid to whether it is still running (zombies have exited and only await reaping)."""
    if psutil is None:
        return _proc_children_without_psutil(root_pid)
    found: dict[int, bool] = {}
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            found[child.pid] = child.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            continue  # exited meanwhile
    return found


def _helper_process_pids() -> set[int]:
    """Session-long helper processes started by multiprocessing itself (resource tracker, forkserver)."""
    pids = set()
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    if tracker is not None:
        pids.add(getattr(getattr(tracker, "_resource_tracker", None), "_pid", None))
    forkserver = sys.modules.get("multiprocessing.forkserver")
    if forkserver is not None:
        pids.add(getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None))
    pids.discard(None)
    return pids


def child_pids(root_pid: int | None = None) -> set[int]:
    """Returns the pids of all running descendants of ``root_pid`` (default: this process)."""
    found = _descendants(os.getpid() if root_pid is None else root_pid)
    return {pid for pid, running in found.items() if running}


def process_cmdline(pid: int) -> str:
    """Returns the command line of ``pid``, or a placeholder when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return "<exited>"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or "<no cmdline>"


def leaked_processes(before: Iterable[int], grace_secs: float = GRACE_SECS) -> list[tuple[int, str]]:
    """Returns ``(pid, cmdline)`` of descendants not in ``before`` still running after up to ``grace_secs``."""
    before = set(before)

    def still_leaking() -> list[int]:
        return sorted(child_pids() - before - _helper_process_pids())

    return [(pid, process_cmdline(pid)) for pid in _poll_until(still_leaking, grace_secs)]


def kill_processes(pids: Iterable[int], timeout_secs: float = GRACE_SECS) -> None:
    """SIGKILLs ``pids`` and reaps those that are our direct children, so they do not linger as zombies."""
    pids = list(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_secs
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break  # not our direct child (or already reaped): its own parent reaps it
            if done:
                break
            time.sleep(POLL_SECS)


# ---------------------------------------------------------------- threads


def thread_snapshot() -> set[threading.Thread]:
    """Returns the live Python threads."""
    return set(threading.enumerate())


def _is_ignored_thread(thread: threading.Thread) -> bool:
    if thread.name.startswith(IGNORED_THREAD_PREFIXES):
        return True
    return thread.daemon and thread.name.startswith(PYTEST_TIMEOUT_THREAD_PREFIX)


def leaked_threads(before: Iterable[threading.Thread], grace_secs: float = GRACE_SECS) -> list[threading.Thread]:
    """Returns threads started since ``before`` that are still alive after joining them for up to ``grace_secs``."""
    before = set(before)
    deadline = time.monotonic() + grace_secs
    new = [t for t in threading.enumerate() if t not in before and not _is_ignored_thread(t)]
    for thread in new:
        if thread is not threading.current_thread():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return [t for t in new if t.is_alive()]


# ---------------------------------------------------------------- /dev/shm


def shm_snapshot(shm_dir: str = SHM_DIR) -> set[str]:
    """Returns the entry names in ``shm_dir`` (empty when it does not exist)."""
    try:
        return set(os.listdir(shm_dir))
    except OSError:
        return set()


def _foreign_shm_names(names: set[str], shm_dir: str) -> set[str]:
    """Returns the names among ``names`` held open or mapped by a process outside this process tree.

    Another test run or program on the machine may create /dev/shm entries while a test runs; those are not our leaks.
    """
    ours = {os.getpid()} | set(_descendants(os.getpid()))
    paths = {os.path.join(shm_dir, name): name for name in names}
    foreign: set[str] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours:
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                held = {line.split(maxsplit=5)[-1].strip() for line in f if shm_dir in line}
            for fd in os.listdir(f"/proc/{entry}/fd"):
                try:
                    held.add(os.readlink(f"/proc/{entry}/fd/{fd}"))
                except OSError:
                    continue
        except OSError:
            continue
        foreign.update(paths[p] for p in held if p in paths)
    return foreign


def leaked_shm(before: Iterable[str], grace_secs: float = GRACE_SECS, shm_dir: str = SHM_DIR) -> list[str]:
    """Returns entries of ``shm_dir`` created since ``before`` that still exist after up to ``grace_secs``."""
    before = set(before)

    def still_leaking() -> list[str]:
        return sorted(shm_snapshot(shm_dir) - before)

    leaking = set(_poll_until(still_leaking, grace_secs))
    if leaking:
        leaking -= _foreign_shm_names(leaking, shm_dir)
    return sorted(leaking)


def remove_shm(names: Iterable[str], shm_dir: str = SHM_DIR) -> None:
    """Unlinks the given entries of ``shm_dir``, ignoring those already gone."""
    for name in names:
        try:
            os.unlink(os.path.join(shm_dir, name))
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------- torch.distributed


def process_group_initialized() -> bool:
    """Returns whether a torch.distributed default process group is initialized (without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def destroy_process_group() -> None:
    """Destroys the default process group."""
    sys.modules["torch.distributed"].destroy_process_group()


# ---------------------------------------------------------------- all together


class LeakChecker:
    """Snapshots state before a test; ``check_and_clean()`` reports what leaked since and cleans it up."""

    def __init__(self, grace_secs: float = GRACE_SECS) -> None:
        self.grace_secs = grace_secs
        self.pids = child_pids()
        self.threads = thread_snapshot()
        self.shm = shm_snapshot()

    def check_and_clean(self) -> list[str]:
        """Returns one message per kind of leak (empty when clean); kills, unlinks and destroys what leaked.

        Threads cannot be killed; they are only reported.
        """
        problems = []
        processes = leaked_processes(self.pids, self.grace_secs)
        if processes:
            listing = "; ".join(f"pid {pid}: {cmd}" for pid, cmd in processes)
            problems.append(f"leaked {len(processes)} child process(es), killed: {listing}")
            kill_processes(pid for pid, _ in processes)
        threads = leaked_threads(self.threads, self.grace_secs)
        if threads:
            listing = ", ".join(f"{t.name!r} (daemon={t.daemon})" for t in threads)
            problems.append(f"leaked {len(threads)} thread(s): {listing}")
        shm = leaked_shm(self.shm, self.grace_secs)
        if shm:
            problems.append(f"leaked {len(shm)} {SHM_DIR} entr(y/ies), removed: {', '.join(shm)}")
            remove_shm(shm)
        if process_group_initialized():
            problems.append("left the torch.distributed default process group initialized (destroyed it)")
            destroy_process_group()
        return problems
