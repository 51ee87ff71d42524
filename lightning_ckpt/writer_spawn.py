"""Starting the writer interpreter with ``posix_spawn`` and watching it: exit status, kill, progress counters."""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

# The descriptor number the writer finds its socket at.
CHILD_SOCKET_FD = 3


# Descriptors of the writer relationship that a forked child must not keep: its copy of the trainer's socket end
# would keep the writer from seeing EOF when the trainer dies. An at-fork hook holds the lock across fork, so no
# fork falls between creating such a descriptor and recording it.
FORK_LOCK = threading.RLock()
CHILD_CLOSES: set[int] = set()


def track_fd(fd: int) -> int:
    """Record a descriptor that a forked child closes at once; returns it."""
    with FORK_LOCK:
        CHILD_CLOSES.add(fd)
    return fd


def close_tracked_fd(fd: int) -> None:
    with FORK_LOCK:
        CHILD_CLOSES.discard(fd)
        os.close(fd)


def _close_in_forked_child() -> None:
    # /dev/null is put over each descriptor instead of closing it: the objects that own them (a Connection, a
    # socket) close them when collected, and a number closed now could by then belong to something else.
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd in CHILD_CLOSES:
            try:
                os.dup2(devnull, fd, inheritable=False)
            except OSError:
                pass
    finally:
        os.close(devnull)
    CHILD_CLOSES.clear()
    FORK_LOCK._at_fork_reinit()  # type: ignore[attr-defined]


def _release_after_fork() -> None:
    try:
        FORK_LOCK.release()
    except RuntimeError:  # this module was imported while another thread was inside fork(): not acquired
        pass


os.register_at_fork(before=FORK_LOCK.acquire, after_in_parent=_release_after_fork, after_in_child=_close_in_forked_child)


def spawn_writer(child_fd: int, env: dict[str, str]) -> "WriterProcessHandle":
    """Start ``python -m lightning_ckpt._writer_main`` in its own session with ``child_fd`` as its socket.

    ``posix_spawn`` (glibc: ``clone(CLONE_VFORK)``, exec errors reported without a pipe) leaves no descriptor
    open in the parent that a thread forking at the same moment (a DataLoader worker) could inherit and hold:
    ``subprocess.Popen`` waits on such a pipe and hangs until that worker exits.
    """
    if child_fd == CHILD_SOCKET_FD:  # dup2 onto itself would keep close-on-exec
        child_fd = os.dup(child_fd)
        try:
            return spawn_writer(child_fd, env)
        finally:
            os.close(child_fd)
    argv = [sys.executable, "-m", "lightning_ckpt._writer_main", str(CHILD_SOCKET_FD)]
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_DUP2, child_fd, CHILD_SOCKET_FD)]
    pid = os.posix_spawn(sys.executable, argv, env, file_actions=actions, setsid=True, setsigmask=())
    return WriterProcessHandle(pid)


class WriterProcessHandle:
    """The writer process, seen from its parent (``poll``/``wait``/``kill`` as ``subprocess.Popen`` has them).

    ``processes`` and ``join`` follow the process context that PyTorch's design exposes as
    ``CheckpointProcess.process`` (one process here).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()  # one reaper: waitpid twice would raise ChildProcessError
        try:
            with FORK_LOCK:
                self._pidfd: int | None = track_fd(os.pidfd_open(pid))
        except (AttributeError, OSError):
            self._pidfd = None

    @property
    def processes(self) -> list["WriterProcessHandle"]:
        return [self]

    def poll(self) -> int | None:
        """The exit code (negative: the signal), or None while it runs; reaps it once it exited."""
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # reaped elsewhere (a SIGCHLD handler set to SIG_IGN)
                    pid, status = self.pid, 0
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
                    self._close_pidfd()
            return self.returncode

    def is_alive(self) -> bool:
        return self.poll() is None

    def wait(self, timeout_secs: float) -> int | None:
        """Wait up to ``timeout_secs`` for the exit; returns the exit code, None if it still runs."""
        deadline = time.monotonic() + timeout_secs
        delay = 0.001
        while self.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            pidfd = self._pidfd
            if pidfd is not None:
                try:
                    select.select([pidfd], [], [], min(left, 1.0))
                    continue
                except (OSError, ValueError):  # closed by a concurrent poll(): it exited
                    continue
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)
        return self.returncode

    def join(self, timeout: float | None = None) -> bool:
        """True once the process exited within ``timeout`` seconds (PyTorch's ``ProcessContext.join``)."""
        return self.wait(timeout if timeout is not None else 0.0) is not None

    def kill(self) -> None:
        """Send SIGKILL (nothing when it already exited)."""
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def state(self) -> str:
        """The kernel's one-letter state (R, S, D, T, Z...) or '?' when unknown."""
        stat = _read(f"/proc/{self.pid}/stat")
        return stat.rpartition(")")[2].split()[0] if stat else "?"

    def progress(self) -> tuple[int, ...] | None:
        """Counters that advance while the writer works: CPU ticks, bytes and calls read and written.

        None where ``/proc`` does not tell (not Linux): progress is then judged by messages only.
        """
        stat, io = _read(f"/proc/{self.pid}/stat"), _read(f"/proc/{self.pid}/io")
        if not stat or not io:
            return None
        fields = stat.rpartition(")")[2].split()
        try:
            cpu = int(fields[11]) + int(fields[12])  # utime + stime
            counters = [int(line.split(":")[1]) for line in io.splitlines()[:4]]  # rchar wchar syscr syscw
        except (IndexError, ValueError):
            return None
        return (cpu, *counters)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            fd, self._pidfd = self._pidfd, None
            close_tracked_fd(fd)

    def forget_in_forked_child(self) -> None:
        """A forked child is not this process's parent: drop the pidfd (its own /dev/null copy by now)."""
        if self._pidfd is not None:
            fd, self._pidfd = self._pidfd, None
            os.close(fd)

    def describe_exit(self) -> str:
        return describe_exit(self.returncode)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit status yet"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
