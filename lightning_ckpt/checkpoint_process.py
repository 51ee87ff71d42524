"""The persistent writer process: one per rank, started once, fed typed requests over a socket."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import pickle
import socket
import sys
import threading
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from lightning_ckpt._writer_main import make_default_writer
from lightning_ckpt.barriers import BarrierConfig, needs_main_thread
from lightning_ckpt.checkpoint_file import PreparedCheckpoint
from lightning_ckpt.checkpoint_writer import CheckpointWriterConfig, WriterHook, WriteStats
from lightning_ckpt.config_fields import TIMEOUT, Range, check_fields
from lightning_ckpt.errors import CheckpointError, CheckpointTimeoutError, CheckpointWriteError, WriterProcessDiedError
from lightning_ckpt.picklable import PicklableBeforeUse
from lightning_ckpt.types import RankInfo
from lightning_ckpt.worker_protocol import BUFFER_MAP_ERROR, RequestType, SendTime, WorkerRequest, WorkerResponse
from lightning_ckpt.writer_link import WriterLink
from lightning_ckpt.writer_spawn import FORK_LOCK, WriterProcessHandle, close_tracked_fd, spawn_writer, track_fd

if TYPE_CHECKING:
    from lightning_ckpt.staging_buffer import StagingBuffer

__all__ = ["CheckpointProcess", "CheckpointProcessConfig", "RequestType", "WorkerRequest", "WorkerResponse"]

log = logging.getLogger(__name__)


@dataclass
class CheckpointProcessConfig:
    """Timeouts and watchdog of the writer process.

    Args:
        subprocess_init_timeout_secs: starting the interpreter and running the init functions. Our default writer
            imports no torch and starts in well under a second; a custom ``checkpoint_writer_init_fn`` that
            imports torch on a cold disk may need more.
        subprocess_shutdown_timeout_secs: a clean exit at ``close`` (after the queued writes); past it the writer
            is killed.
        write_timeout_secs: the longest one write may take, barrier waits included; past it the writer is killed
            and replaced.
        stall_timeout_secs: a write fails, and the writer is killed and replaced, when it makes no progress for
            this long: no CPU time, no bytes read or written, no message (a SIGSTOPped writer, a hung NFS mount).
            Waiting at the barrier for the other ranks does not count (the barrier's timeout bounds it).
        wait_log_interval_secs: while a write or a drain waits, a warning naming what it waits for is logged at
            this interval.
        writer_niceness: added to the writer's nice value, so that hashing and writing yield the CPU to training
            (0 keeps the training process's priority).
    """

    subprocess_init_timeout_secs: float = 30.0
    subprocess_shutdown_timeout_secs: float = 60.0
    write_timeout_secs: float = 3600.0
    stall_timeout_secs: float = 300.0
    wait_log_interval_secs: float = 30.0
    writer_niceness: int = 10

    FIELD_RANGES: ClassVar[dict[str, Range]] = {
        "subprocess_init_timeout_secs": TIMEOUT, "subprocess_shutdown_timeout_secs": TIMEOUT,
        "write_timeout_secs": TIMEOUT, "stall_timeout_secs": TIMEOUT, "wait_log_interval_secs": TIMEOUT,
        "writer_niceness": Range(ge=0, le=19),
    }

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def startup_timeout_secs(self) -> float:
        """Former name of ``subprocess_init_timeout_secs`` (read-only)."""
        return self.subprocess_init_timeout_secs

    @property
    def shutdown_timeout_secs(self) -> float:
        """Former name of ``subprocess_shutdown_timeout_secs`` (read-only)."""
        return self.subprocess_shutdown_timeout_secs


class CheckpointProcess(PicklableBeforeUse):
    """Owns one writer process and the futures of the requests sent to it.

    Better than the PyTorch original: the writer is a fresh interpreter running only ``lightning_ckpt`` (never the
    user's ``__main__``, so unguarded scripts work), started with ``posix_spawn`` (a DataLoader worker forking at
    that moment cannot hang the start), in its own session, ignoring SIGINT and SIGTERM: a job-wide SIGTERM
    leaves it to finish what the trainer sent, and it exits when the trainer's end of the socket closes. One
    failed write does not end its loop; a dead, stalled or stuck writer fails the pending futures with a clear
    error and is replaced on the next write; tensors cross as one memfd mapped once per buffer. Requests are sent
    whole by a sender thread, so a Ctrl-C on the caller's thread never leaves half a message on the socket.

    Args:
        rank_info: the rank the writer writes for.
        config: timeouts and watchdog.
        subprocess_init_fn: called as ``subprocess_init_fn(*subprocess_init_args)`` in the writer process first.
        subprocess_init_args: its arguments (picklable).
        checkpoint_writer_init_fn: builds the writer in the writer process, called with
            ``checkpoint_writer_init_args`` as keywords (``rank_info`` added when absent). Default: lightning_ckpt's
            ``CheckpointWriter`` from ``writer_config``, ``barrier_config`` and ``commit_hook``, torch-free. What a
            custom one costs: it and ``subprocess_init_fn`` cross by qualified name, so they must be importable
            module-level functions (not from ``__main__``, not lambdas), and the writer imports their module, and
            with it usually torch (seconds of startup, hundreds of MiB). ``write_prepared`` (the
            ``AsyncCheckpointer`` path) needs a writer with lightning_ckpt's ``write_prepared``.
        checkpoint_writer_init_args: keyword arguments of ``checkpoint_writer_init_fn`` (picklable).
        writer_config: how the default writer writes.
        barrier_config: the barrier the default writer meets the other ranks at (``tcp_store``; ``dist`` is refused).
        commit_hook: a picklable ``WriterHook`` of the default writer, importable by module path (not ``__main__``).
    """

    def __init__(self, rank_info: RankInfo, config: CheckpointProcessConfig | None = None,
                 subprocess_init_fn: Callable[..., None] | None = None, subprocess_init_args: tuple = (),
                 checkpoint_writer_init_fn: Callable[..., Any] | None = None,
                 checkpoint_writer_init_args: dict[str, Any] | None = None, *,
                 writer_config: CheckpointWriterConfig | None = None, barrier_config: BarrierConfig | None = None,
                 commit_hook: WriterHook | None = None) -> None:
        if needs_main_thread(barrier_config):
            raise ValueError(
                "barrier_type 'dist_barrier' runs collectives and must stay on the main thread; the writer process "
                "needs barrier_type 'tcp_store'"
            )
        if checkpoint_writer_init_fn is not None and (writer_config, barrier_config, commit_hook) != (None,) * 3:
            raise ValueError("writer_config, barrier_config and commit_hook configure the default writer; with a "
                             "checkpoint_writer_init_fn pass them in checkpoint_writer_init_args")
        for name, obj in (("commit_hook", commit_hook), ("subprocess_init_fn", subprocess_init_fn),
                          ("checkpoint_writer_init_fn", checkpoint_writer_init_fn)):
            _check_importable(name, obj)
        self.rank_info = rank_info
        self.config = config or CheckpointProcessConfig()
        self.writer_config = writer_config or CheckpointWriterConfig()
        self.barrier_config = barrier_config
        self.commit_hook = commit_hook
        self.subprocess_init_fn = subprocess_init_fn
        self.subprocess_init_args = tuple(subprocess_init_args)
        self.checkpoint_writer_init_fn = checkpoint_writer_init_fn or make_default_writer
        self.checkpoint_writer_init_args = dict(checkpoint_writer_init_args) if checkpoint_writer_init_fn else {
            "config": self.writer_config, "barrier_config": barrier_config, "commit_hook": commit_hook}
        self.process: WriterProcessHandle | None = None  # the current (or last) writer process
        self._link: WriterLink | None = None
        self._lock = threading.Lock()
        self._buffers: set[int] = set()  # staging buffers the current writer has mapped
        self._ids = itertools.count(1)
        self._closed = False
        self.starts = 0

    _RECREATED = {"_lock": threading.Lock, "_ids": lambda: itertools.count(1)}

    def _in_use(self) -> str | None:
        return "its writer process runs" if self._link is not None else None

    @property
    def pid(self) -> int | None:
        return self._link.handle.pid if self._link is not None else None

    @property
    def _parent_end(self) -> Connection | None:
        return self._link.conn if self._link is not None else None

    def is_alive(self) -> bool:
        return self._link is not None and self._link.usable()

    @property
    def process_creation_future(self) -> Future:
        """Resolves to None once the writer process ran its init functions; starts the writer if none runs.

        It fails with ``CheckpointTimeoutError`` (a ``TimeoutError``) past ``subprocess_init_timeout_secs`` and
        with ``CheckpointWriteError`` (a ``RuntimeError``) carrying the writer's traceback when an init function
        raised.
        """
        with self._lock:
            return self._usable_link().ready

    def start(self) -> None:
        """Start the writer now and wait until it runs (it starts at the first write otherwise).

        Raises:
            CheckpointError: closed. WriterProcessDiedError, CheckpointTimeoutError, CheckpointWriteError: it
                failed to start.
        """
        self._wait_ready(self.process_creation_future)

    def write(self, state_dict: Any, path: str | os.PathLike, **kwargs: Any) -> Future:
        """Write ``state_dict`` (or the ``Future`` of one) at ``path`` with the writer process's writer.

        Waits until the writer runs, as PyTorch's design does; the state dict crosses by pickling, its tensors in
        shared memory (the writer process then imports torch). ``**kwargs`` go to the writer's ``write``.

        Returns:
            A future that resolves to None once the writer's ``write`` returned, or fails with its error.
        """
        with self._lock:
            link = self._usable_link()
        self._wait_ready(link.ready)
        path = os.fspath(path)
        if isinstance(state_dict, Future):  # still being staged: the send thread waits for it, not the caller
            state_dict = SendTime(functools.partial(state_dict.result, timeout=self.config.write_timeout_secs))
        with self._lock:  # ids in the order the requests are queued: the oldest pending is the writer's current one
            request = WorkerRequest(RequestType.WRITE_CHECKPOINT,
                                    {"state_dict": state_dict, "path": path, "kwargs": kwargs}, next(self._ids))
            return link.submit(request, f"writing {path}", self.config.write_timeout_secs, "write_timeout_secs",
                               _write_result(path, None))

    def write_prepared(self, path: str, prepared: PreparedCheckpoint | SendTime, buffer: "StagingBuffer | None",
                       save_key: str | None = None, after_commit: Any = None) -> Future:
        """Send one staged write (the ``AsyncCheckpointer`` path); returns at once. ``prepared`` may be a
        ``SendTime`` that gives it (pickled by the link's send thread).

        ``after_commit`` (picklable, importable by module path) runs in the writer once the file is committed.

        Returns:
            A future that resolves to ``WriteStats`` or fails with the writer's error text.
        """
        with self._lock:
            link = self._usable_link()
            buffer_id = self._map_buffer(link, buffer)
            request = WorkerRequest(RequestType.WRITE_PREPARED, {
                "path": path, "prepared": prepared, "buffer_id": buffer_id, "save_key": save_key,
                "after_commit": after_commit}, next(self._ids))
            return link.submit(request, f"writing {path}", self.config.write_timeout_secs, "write_timeout_secs",
                               _write_result(path, lambda: self._buffers.discard(buffer_id)))

    def write_shards(self, path: str, token: str, items: list[tuple[str, Any]], buffer: "StagingBuffer | None",
                     fsync: bool = True) -> Future:
        """Send one rank's staged DCP chunks (``_writer_main.write_shard_files``: ``items`` are ``(file name,
        bytes or PreparedCheckpoint)``, written into the directory temp ``token`` of ``path``); returns at once.

        Returns:
            A future of the written files (name, size, checksums), or failing with the writer's error.
        """
        with self._lock:
            link = self._usable_link()
            buffer_id = self._map_buffer(link, buffer)
            request = WorkerRequest(RequestType.WRITE_SHARDS, {
                "path": path, "token": token, "items": items, "buffer_id": buffer_id, "fsync": fsync},
                next(self._ids))
            return link.submit(request, f"writing the shards of {path}", self.config.write_timeout_secs,
                               "write_timeout_secs",
                               _write_result(path, lambda: self._buffers.discard(buffer_id), result_key="files"))

    def _map_buffer(self, link: WriterLink, buffer: "StagingBuffer | None") -> int | None:
        """Send ``buffer`` to the writer unless it has it mapped (call with ``_lock`` held); returns its id."""
        if buffer is None:
            return None
        if buffer.id not in self._buffers:
            link.submit(WorkerRequest(RequestType.ADD_BUFFER, {"buffer_id": buffer.id, "nbytes": buffer.nbytes}),
                        f"mapping staging buffer {buffer.id}", fd=buffer.fd)
            self._buffers.add(buffer.id)
        return buffer.id

    def drop_buffer(self, buffer_id: int) -> None:
        """Tell the writer to unmap a buffer the stager freed."""
        with self._lock:
            if buffer_id in self._buffers and self._link is not None and self._link.usable():
                self._link.submit(WorkerRequest(RequestType.DROP_BUFFER, {"buffer_id": buffer_id}),
                                  f"unmapping staging buffer {buffer_id}")
            self._buffers.discard(buffer_id)

    def drain(self, timeout_secs: float) -> bool:
        """Wait up to ``timeout_secs`` for every write sent so far to commit or fail (e.g. on SIGTERM, before
        exiting); logs what it waits for at ``wait_log_interval_secs``.

        Returns:
            True when nothing is pending any more, False when writes were still pending at the deadline.
        """
        link = self._link
        return link is None or link.drain(timeout_secs)

    def close(self) -> None:
        """Ask the writer to exit after its queued writes; kill it past ``subprocess_shutdown_timeout_secs``.

        Idempotent; releases the socket and threads whatever happens.

        Raises:
            CheckpointTimeoutError: the writer did not exit even after SIGKILL (a process stuck in the kernel).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            link, self._link = self._link, None
            self._buffers.clear()
        _LIVE.discard(self)
        if link is not None:
            link.shutdown(self.config.subprocess_shutdown_timeout_secs, _terminate_request())

    # ---------------------------------------------------------------- the current writer

    def _usable_link(self) -> WriterLink:
        """The current writer, started or replaced as needed (call with ``_lock`` held)."""
        if self._closed:
            raise CheckpointError("CheckpointProcess is closed")
        link = self._link
        if link is not None and link.conn_closed_elsewhere():
            self._retire(link, "its socket was closed")
            raise WriterProcessDiedError(f"Child process terminated unexpectedly: the socket to the writer process "
                                         f"(pid {link.handle.pid}) was closed; the next write starts a new one")
        if link is not None and link.usable():
            return link
        if link is not None:
            how = link.failure or f"exited with {link.handle.describe_exit()}"
            log.warning("writer process (pid %d): %s; starting a new writer process", link.handle.pid, how)
            self._retire(link, str(how))
        return self._start_link()

    def _retire(self, link: WriterLink, reason: str) -> None:
        self._link = None
        try:
            link.shutdown(self.config.subprocess_shutdown_timeout_secs, _terminate_request())
        except CheckpointError as e:
            log.error("could not end writer pid %d (%s): %s", link.handle.pid, reason, e)

    def _start_link(self) -> WriterLink:
        with FORK_LOCK:  # no fork between creating the pair and recording it (a child closes both)
            parent_sock, child_sock = socket.socketpair()
            track_fd(parent_sock.fileno())
            track_fd(child_sock.fileno())
        env = dict(os.environ)
        # The child sees the parent's import path, so hooks from importable modules load; it never runs __main__.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        try:
            handle = spawn_writer(child_sock.fileno(), env)
        except OSError as e:
            close_tracked_fd(parent_sock.detach())
            raise WriterProcessDiedError(f"could not start the writer process ({sys.executable}): {e}") from e
        finally:
            close_tracked_fd(child_sock.detach())
        with FORK_LOCK:
            conn = Connection(parent_sock.detach())  # same descriptor: stays tracked, the link releases it
        link = WriterLink(handle, conn, self.config)
        self._link, self.process = link, handle
        self._buffers.clear()
        self.starts += 1
        _LIVE.add(self)
        link.submit(self._init_request(), "starting the writer process", self.config.subprocess_init_timeout_secs,
                    "subprocess_init_timeout_secs", _init_result, future=link.ready)
        log.debug("started writer process pid %d for rank %d", handle.pid, self.rank_info.global_rank)
        return link

    def _init_request(self) -> WorkerRequest:
        import multiprocessing

        return WorkerRequest(RequestType.INIT, {
            "rank_info": self.rank_info, "niceness": self.config.writer_niceness,
            "log_level": logging.getLogger("lightning_ckpt").getEffectiveLevel(),
            "authkey": bytes(multiprocessing.current_process().authkey),
            "subprocess_init_fn": self.subprocess_init_fn, "subprocess_init_args": self.subprocess_init_args,
            "checkpoint_writer_init_fn": self.checkpoint_writer_init_fn,
            "checkpoint_writer_init_args": self.checkpoint_writer_init_args,
        }, next(self._ids))

    def _wait_ready(self, ready: Future) -> None:
        limit = self.config.subprocess_init_timeout_secs + self.config.subprocess_shutdown_timeout_secs
        try:
            ready.result(timeout=limit)  # the link fails it at subprocess_init_timeout_secs; this is a backstop
        except FutureTimeoutError as e:
            raise CheckpointTimeoutError(f"Timed out after {limit}s waiting for the writer process to start") from e

    def _forget_after_fork(self) -> None:
        """In a forked child: the parent's writer is not ours (its descriptors are closed); start afresh."""
        self._link, self.process, self._buffers = None, None, set()
        self._lock = threading.Lock()


_LIVE: "weakref.WeakSet[CheckpointProcess]" = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [cp._forget_after_fork() for cp in list(_LIVE)])


def _terminate_request() -> WorkerRequest:
    return WorkerRequest(RequestType.TERMINATE_PROCESS, {})


def _init_result(response: WorkerResponse) -> None:
    if not response.success:
        raise CheckpointWriteError(f"the writer process failed to start ({response.error_type} in its init "
                                   f"functions):\n{response.error_msg}")


def _write_result(path: str, on_unmapped: Callable[[], None] | None,
                  result_key: str = "stats") -> Callable[[WorkerResponse], Any]:
    def interpret(response: WorkerResponse) -> WriteStats | Any:
        if response.success:
            return (response.payload or {}).get(result_key)
        if response.error_type == BUFFER_MAP_ERROR and on_unmapped is not None:
            on_unmapped()  # sent again with the next write
        raise CheckpointWriteError(f"writing {path} failed in the writer process ({response.error_type}):\n"
                                   f"{response.error_msg}")
    return interpret


def _check_importable(name: str, obj: Any) -> None:
    if obj is None:
        return
    owner = obj if callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    if getattr(owner, "__module__", None) == "__main__":
        raise ValueError(f"{name} {owner.__qualname__} is defined in __main__, which the writer process never "
                         "imports; define it in an importable module")
    try:
        pickle.dumps(obj)
    except Exception as e:  # noqa: BLE001 - named for the user
        raise ValueError(f"{name} {obj!r} cannot be pickled for the writer process (use a module-level function "
                         f"or class): {e}") from e
