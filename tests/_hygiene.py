"""Leak detection for tests: child processes, Python threads, /dev/shm entries and torch.distributed process groups.

Plain functions so they can be unit-tested; ``tests/conftest.py`` wires them into an autouse fixture.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import struct
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
#
# /dev/shm is shared by every job on the machine, and tmpfs records no creator. An entry counts as this test's only on
# positive evidence that this process or one of its descendants made it: this process opened it with O_CREAT (audit hook),
# or a process of this tree held it (descriptor or mapping) when inotify reported its creation or when the check ran.
# Anything else (another job's semaphores, entries whose origin is unknown) is neither reported nor removed.

IN_CREATE = 0x100
IN_MOVED_TO = 0x80
_INOTIFY_HEADER = struct.Struct("iIII")
_active_watches: list[ShmWatch] = []


def shm_snapshot(shm_dir: str = SHM_DIR) -> set[str]:
    """Returns the entry names in ``shm_dir`` (empty when it does not exist)."""
    try:
        return set(os.listdir(shm_dir))
    except OSError:
        return set()


def _tree_pids() -> set[int]:
    """This process and its running descendants."""
    return {os.getpid()} | child_pids()


def _held_paths(pid: int, prefix: str) -> set[str]:
    """Paths under ``prefix`` that ``pid`` holds as a descriptor or a mapping (empty when unreadable)."""
    held: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            held.update(line.split(maxsplit=5)[-1].strip() for line in f if prefix in line)
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return held
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(prefix):
            held.add(target)
    return held


def _names_held_by(pids: Iterable[int], shm_dir: str) -> set[str]:
    prefix = shm_dir.rstrip("/") + "/"
    names = set()
    for pid in pids:
        names.update(p[len(prefix) :] for p in _held_paths(pid, prefix) if "/" not in p[len(prefix) :])
    return names


def _audit_open(event: str, args: tuple) -> None:
    """Audit hook: records entries that this process creates with ``open``/``os.open`` in a watched directory."""
    if event != "open" or not _active_watches:
        return
    path, _mode, flags = args
    if not isinstance(path, (str, bytes, os.PathLike)) or not (flags or 0) & os.O_CREAT:
        return
    path = os.fsdecode(path)
    for watch in list(_active_watches):
        directory, name = os.path.split(os.path.abspath(path))
        if directory == os.path.abspath(watch.shm_dir) and not os.path.lexists(path):
            watch.pending_self.add(name)


sys.addaudithook(_audit_open)


class ShmWatch:
    """Records which entries of ``shm_dir`` this process and its descendants create while the watch is open."""

    def __init__(self, shm_dir: str = SHM_DIR) -> None:
        self.shm_dir = shm_dir
        self.before = shm_snapshot(shm_dir)
        self.pending_self: set[str] = set()  # created by this process; inode looked up lazily
        self._created: dict[str, int] = {}  # name -> inode at the time it was attributed to us
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self._inotify = self._open_inotify()
        self._thread = None
        if self._inotify is not None:
            self._thread = threading.Thread(target=self._watch_loop, name="hygiene-shm-watch", daemon=True)
            self._thread.start()
        _active_watches.append(self)

    def _open_inotify(self) -> int | None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
            if fd < 0:
                return None
            if libc.inotify_add_watch(fd, os.fsencode(self.shm_dir), IN_CREATE | IN_MOVED_TO) < 0:
                os.close(fd)
                return None
            return fd
        except (OSError, AttributeError):
            return None

    def _watch_loop(self) -> None:
        while True:
            ready, _, _ = select.select([self._inotify, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                data = os.read(self._inotify, 65536)
            except BlockingIOError:
                continue
            names = set()
            offset = 0
            while offset < len(data):
                _wd, _mask, _cookie, length = _INOTIFY_HEADER.unpack_from(data, offset)
                offset += _INOTIFY_HEADER.size
                names.add(data[offset : offset + length].rstrip(b"\0").decode(errors="replace"))
                offset += length
            self._attribute(names & _names_held_by(_tree_pids(), self.shm_dir))

    def _attribute(self, names: Iterable[str]) -> None:
        for name in names:
            if name in self.before:
                continue
            try:
                inode = os.lstat(os.path.join(self.shm_dir, name)).st_ino
            except OSError:
                continue  # already gone: not a leak
            with self._lock:
                self._created.setdefault(name, inode)

    def observe_tree(self) -> None:
        """Attributes the entries that this process tree holds right now (call before killing leaked processes)."""
        self._attribute(_names_held_by(_tree_pids(), self.shm_dir))

    def created(self) -> dict[str, int]:
        """Returns ``{name: inode}`` of the entries attributed to this process tree so far."""
        pending, self.pending_self = self.pending_self, set()
        self._attribute(pending)
        with self._lock:
            return dict(self._created)

    def existing(self) -> list[str]:
        """Returns the attributed entries that still exist as the same file (same inode)."""
        alive = []
        for name, inode in self.created().items():
            try:
                if os.lstat(os.path.join(self.shm_dir, name)).st_ino == inode:
                    alive.append(name)
            except OSError:
                continue
        return sorted(alive)

    def remove(self, names: Iterable[str]) -> None:
        """Unlinks the given attributed entries, only while they are still the file that was attributed."""
        created = self.created()
        for name in names:
            path = os.path.join(self.shm_dir, name)
            try:
                if name in created and os.lstat(path).st_ino == created[name]:
                    os.unlink(path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Stops watching (idempotent); what was attributed stays readable."""
        if self in _active_watches:
            _active_watches.remove(self)
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(timeout=GRACE_SECS)
            self._thread = None
        for fd in (self._inotify, self._stop_r, self._stop_w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._inotify = self._stop_r = self._stop_w = None


def _held_outside_tree(names: set[str], shm_dir: str) -> set[str]:
    """Returns the names among ``names`` that a process outside this process tree holds (someone else uses them)."""
    ours = _tree_pids()
    others = [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) not in ours]
    return names & _names_held_by(others, shm_dir)


def leaked_shm(watch: ShmWatch, grace_secs: float = GRACE_SECS) -> list[str]:
    """Returns entries created by this process tree since ``watch`` opened that still exist after up to ``grace_secs``."""
    leaking = set(_poll_until(watch.existing, grace_secs))
    if leaking:
        leaking -= _held_outside_tree(leaking, watch.shm_dir)
    return sorted(leaking)


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
        self.shm = ShmWatch()
        self.pids = child_pids()
        self.threads = thread_snapshot()

    def check_and_clean(self) -> list[str]:
        """Returns one message per kind of leak (empty when clean); kills, unlinks and destroys what leaked.

        Threads cannot be killed; they are only reported.
        """
        problems = []
        self.shm.observe_tree()  # before leaked processes die: what they hold is theirs
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
        self.shm.close()
        if shm:
            problems.append(f"leaked {len(shm)} {SHM_DIR} entr(y/ies) created by this test, removed: {', '.join(shm)}")
            self.shm.remove(shm)
        if process_group_initialized():
            problems.append("left the torch.distributed default process group initialized (destroyed it)")
            destroy_process_group()
        return problems
