"""The persistent writer subprocess: one per rank, started once, fed typed requests over a socket pipe."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle
from typing import TYPE_CHECKING, Any

from lightning_ckpt.barriers import BarrierConfig, needs_main_thread
from lightning_ckpt.checkpoint_file import PreparedCheckpoint
from lightning_ckpt.checkpoint_writer import (
    CheckpointWriterConfig,
    WriterHook,
    WriteStats,
)
from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointTimeoutError,
    CheckpointWriteError,
    WriterProcessDiedError,
)
from lightning_ckpt.picklable import PicklableBeforeUse
from lightning_ckpt.types import RankInfo

if TYPE_CHECKING:
    from lightning_ckpt.staging_buffer import StagingBuffer

log = logging.getLogger(__name__)


@dataclass
class CheckpointProcessConfig:
    """Timeouts of the writer subprocess.

    Args:
        startup_timeout_secs: starting the interpreter and importing torch (slow on a cold disk).
        write_timeout_secs: one write, barrier waits included; past it the writer is killed and replaced.
        shutdown_timeout_secs: a clean exit at ``close``; past it the writer is killed.
        writer_niceness: added to the writer's nice value, so that hashing and writing yield the CPU to training
            (0 keeps the training process's priority).
    """

    startup_timeout_secs: float = 300.0
    write_timeout_secs: float = 3600.0
    shutdown_timeout_secs: float = 60.0
    writer_niceness: int = 10

    def __post_init__(self) -> None:
        for name in ("startup_timeout_secs", "write_timeout_secs", "shutdown_timeout_secs"):
            if not getattr(self, name) > 0:  # NaN too
                raise ValueError(f"CheckpointProcessConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.writer_niceness <= 19:
            raise ValueError(f"CheckpointProcessConfig.writer_niceness must be in [0, 19], got {self.writer_niceness}")


# Typed messages. Requests go parent -> writer; every request with an id gets exactly one Response.
@dataclass
class InitRequest:
    niceness: int
    rank_info: RankInfo
    writer_config: CheckpointWriterConfig
    barrier_config: BarrierConfig | None
    commit_hook: WriterHook | None
    log_level: int


@dataclass
class AddBufferRequest:
    buffer_id: int
    nbytes: int  # the descriptor follows on the socket (SCM_RIGHTS)


@dataclass
class DropBufferRequest:
    buffer_id: int


@dataclass
class WriteRequest:
    request_id: int
    path: str
    prepared: PreparedCheckpoint
    buffer_id: int | None
    save_key: str | None
    after_commit: Any = None  # run by the writer once committed (``CheckpointWriter.write_prepared``)


@dataclass
class ShutdownRequest:
    pass


@dataclass
class Response:
    request_id: int
    ok: bool
    stats: WriteStats | None = None
    error_type: str | None = None
    error_text: str | None = None  # traceback.format_exc() of the writer


@dataclass
class _Pending:
    future: Future
    path: str
    started: float = field(default_factory=time.monotonic)


class CheckpointProcess(PicklableBeforeUse):
    """Owns one writer subprocess and the futures of the writes sent to it.

    Better than the PyTorch original: the child is a fresh interpreter running only ``lightning_ckpt`` (never the
    user's ``__main__``, so unguarded scripts work), in its own session with SIGINT ignored; one failed write
    does not end its loop; a dead or stuck child fails the pending futures with a clear error and is replaced on
    the next write; tensors cross as one memfd mapped once per buffer, not per save.

    Args:
        rank_info: the rank the writer writes for.
        config: timeouts.
        writer_config: how the child's ``CheckpointWriter`` writes.
        barrier_config: the barrier the child meets the other ranks at (``tcp_store``; ``dist`` is refused).
        commit_hook: a picklable ``WriterHook`` importable by module path (not from ``__main__``).
    """

    def __init__(self, rank_info: RankInfo, config: CheckpointProcessConfig | None = None,
                 writer_config: CheckpointWriterConfig | None = None, barrier_config: BarrierConfig | None = None,
                 commit_hook: WriterHook | None = None) -> None:
        if needs_main_thread(barrier_config):
            raise ValueError(
                "barrier_type 'dist_barrier' runs collectives and must stay on the main thread; the writer subprocess "
                "needs barrier_type 'tcp_store'"
            )
        if commit_hook is not None and type(commit_hook).__module__ == "__main__":
            raise ValueError(
                f"commit_hook {type(commit_hook).__qualname__} is defined in __main__, which the writer process never "
                "imports; define it in an importable module"
            )
        self.rank_info = rank_info
        self.config = config or CheckpointProcessConfig()
        self.writer_config = writer_config or CheckpointWriterConfig()
        self.barrier_config = barrier_config
        self.commit_hook = commit_hook
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()  # guards sends and the process handle (taken before _plock)
        self._plock = threading.Lock()  # guards _pending; the reader thread takes only this one
        self._pending: dict[int, _Pending] = {}
        self._buffers: set[int] = set()
        self._ids = itertools.count(1)
        self._closed = False
        self.starts = 0

    _RECREATED = {"_lock": threading.Lock, "_plock": threading.Lock, "_ids": lambda: itertools.count(1)}

    def _in_use(self) -> str | None:
        return "its writer process runs" if self._proc is not None else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the writer now (it starts at the first write otherwise); a no-op when it runs.

        Raises:
            CheckpointError: closed. WriterProcessDiedError, CheckpointTimeoutError: it failed to start.
        """
        with self._lock:
            if self._closed:
                raise CheckpointError("CheckpointProcess is closed")
            self._ensure_started()

    def write(self, path: str, prepared: PreparedCheckpoint, buffer: "StagingBuffer | None",
              save_key: str | None = None, after_commit: Any = None) -> Future:
        """Send one write; the future resolves to ``WriteStats`` or fails with the writer's error text.

        ``after_commit`` (picklable, importable by module path) runs in the writer once the file is committed.
        """
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise CheckpointError("CheckpointProcess is closed")
            self._ensure_started()
            if buffer is not None and buffer.id not in self._buffers:
                self._send(AddBufferRequest(buffer.id, buffer.nbytes))
                send_handle(self._conn, buffer.fd, self._proc.pid)
                self._buffers.add(buffer.id)
            request_id = next(self._ids)
            with self._plock:
                self._pending[request_id] = _Pending(future, path)
            try:
                self._send(WriteRequest(request_id, path, prepared, buffer.id if buffer else None, save_key,
                                        after_commit))
            except BaseException:
                with self._plock:
                    self._pending.pop(request_id, None)
                raise
        return future

    def drop_buffer(self, buffer_id: int) -> None:
        """Tell the writer to unmap a buffer the stager freed."""
        with self._lock:
            if buffer_id in self._buffers and self.is_alive():
                self._send(DropBufferRequest(buffer_id))
            self._buffers.discard(buffer_id)

    def _send(self, message: Any) -> None:
        try:
            self._conn.send(message)
        except (BrokenPipeError, ConnectionError, OSError) as e:
            raise WriterProcessDiedError(f"the writer process (pid {self.pid}) is gone: {e}") from e

    def _ensure_started(self) -> None:
        if self.is_alive() and self._conn is not None:
            return
        if self._proc is not None:
            self._reap(f"writer process (pid {self._proc.pid}) exited with {_describe_exit(self._proc.poll())}")
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        # The child sees the parent's import path, so hooks from importable modules load; it never runs __main__.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "lightning_ckpt._writer_main", str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        finally:
            child_sock.close()
        self._conn = Connection(parent_sock.detach())
        self._buffers.clear()
        self.starts += 1
        self._conn.send(InitRequest(self.config.writer_niceness, self.rank_info, self.writer_config, self.barrier_config, self.commit_hook,
                                    logging.getLogger("lightning_ckpt").getEffectiveLevel()))
        ready = self._recv_ready()
        if not ready.ok:
            raise CheckpointWriteError(f"the writer process failed to start:\n{ready.error_text}")
        self._reader = threading.Thread(target=self._read_responses, args=(self._proc, self._conn),
                                        name=f"lightning_ckpt-writer-{self._proc.pid}", daemon=True)
        self._reader.start()
        log.debug("started writer process pid %d for rank %d", self._proc.pid, self.rank_info.global_rank)

    def _recv_ready(self) -> Response:
        deadline = time.monotonic() + self.config.startup_timeout_secs
        while not self._conn.poll(0.05):
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._kill_and_forget()
                raise WriterProcessDiedError(f"the writer process exited during startup with {_describe_exit(code)}")
            if time.monotonic() > deadline:
                self._kill_and_forget()
                raise CheckpointTimeoutError(
                    f"the writer process did not start within startup_timeout_secs={self.config.startup_timeout_secs}"
                )
        return self._conn.recv()

    def _read_responses(self, proc: subprocess.Popen, conn: Connection) -> None:
        """Resolve futures from responses; fail them all if the child dies or a write outlives its timeout."""
        while True:
            try:
                if conn.poll(0.05):
                    self._resolve(conn.recv())
                    continue
            except (EOFError, OSError):
                pass
            if proc.poll() is not None:
                self._fail_pending(proc, f"writer process (pid {proc.pid}) died with {_describe_exit(proc.returncode)}")
                return
            if self._closed and not self._pending:
                return
            self._check_timeouts(proc)

    def _resolve(self, response: Response) -> None:
        with self._plock:
            pending = self._pending.pop(response.request_id, None)
        if pending is None:
            return
        if response.ok:
            pending.future.set_result(response.stats)
        else:
            pending.future.set_exception(CheckpointWriteError(
                f"writing {pending.path} failed in the writer process ({response.error_type}):\n{response.error_text}"
            ))

    def _check_timeouts(self, proc: subprocess.Popen) -> None:
        now = time.monotonic()
        with self._plock:
            late = [p for p in self._pending.values() if now - p.started > self.config.write_timeout_secs]
        if late:
            log.error("write of %s exceeded write_timeout_secs=%s; killing writer pid %d",
                      late[0].path, self.config.write_timeout_secs, proc.pid)
            proc.kill()

    def _fail_pending(self, proc: subprocess.Popen, reason: str) -> None:
        with self._plock:
            pending, self._pending = self._pending, {}
        for request_id, p in sorted(pending.items()):
            waited = time.monotonic() - p.started
            cls = CheckpointTimeoutError if waited > self.config.write_timeout_secs else WriterProcessDiedError
            p.future.set_exception(cls(f"writing {p.path} did not finish: {reason} after {waited:.1f}s"))

    def _reap(self, reason: str) -> None:
        """Forget a dead child (its reader thread fails its futures) before a new one starts."""
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=self.config.shutdown_timeout_secs)
        log.warning("%s; starting a new writer process", reason)
        self._kill_and_forget()

    def _kill_and_forget(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._proc.wait(timeout=self.config.shutdown_timeout_secs)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn, self._reader = None, None, None

    def close(self) -> None:
        """Ask the writer to exit after its queued writes; kill it past ``shutdown_timeout_secs``. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            proc, conn, reader = self._proc, self._conn, self._reader
            if proc is not None and proc.poll() is None:
                try:
                    conn.send(ShutdownRequest())
                except OSError:
                    pass
        if proc is None:
            return
        try:
            proc.wait(timeout=self.config.shutdown_timeout_secs)
        except subprocess.TimeoutExpired:
            log.error("writer process pid %d did not exit within %ss; killing it", proc.pid,
                      self.config.shutdown_timeout_secs)
            proc.kill()
            proc.wait(timeout=self.config.shutdown_timeout_secs)
        if reader is not None:
            reader.join(timeout=self.config.shutdown_timeout_secs)
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._proc, self._conn, self._reader = None, None, None
            self._buffers.clear()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit status yet"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
