"""One started writer process seen from the trainer: a thread sends whole frames, another reads answers and
watches the writer's progress."""

from __future__ import annotations

import array
import logging
import os
import queue
import socket
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable

from lightning_ckpt.errors import CheckpointError, CheckpointTimeoutError, CheckpointWriteError, WriterProcessDiedError
from lightning_ckpt.worker_protocol import RequestType, SendTime, WorkerRequest, WorkerResponse, encode_request
from lightning_ckpt.writer_spawn import CHILD_CLOSES, FORK_LOCK, WriterProcessHandle, close_tracked_fd

log = logging.getLogger(__name__)

KILL_RETRY_SECS = 5.0  # an unkillable writer (D state) is signalled again at most this often

_LIVE_LINKS: "weakref.WeakSet[WriterLink]" = weakref.WeakSet()
# Links with requests awaiting an answer are kept alive here: dropping a CheckpointProcess with a save in flight
# (its threads hold the link only weakly) does not lose that save; the link can go once it is answered.
_BUSY_LINKS: "set[WriterLink]" = set()


def _after_fork_in_child() -> None:
    for link in list(_LIVE_LINKS):  # their descriptors now point at /dev/null (writer_spawn's hook ran first)
        link.failure = CheckpointError("this writer link belongs to the parent of a forked process")
        link.handle.forget_in_forked_child()
    _LIVE_LINKS.clear()
    _BUSY_LINKS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass
class _Pending:
    future: Future
    what: str  # "writing /ckpt/step=10.ckpt": what a wait on it waits for
    timeout_secs: float
    timeout_name: str
    interpret: Callable[[WorkerResponse], Any]  # the response's result, or raises its error
    phase: str = "queued"
    since: float = field(default_factory=time.monotonic)  # submitted, then: became the writer's current request
    last_progress: float = field(default_factory=time.monotonic)
    last_warning: float = field(default_factory=time.monotonic)


class WriterLink:
    """The socket to one writer process and the futures of the requests sent on it.

    A link dropped without ``shutdown`` (its ``CheckpointProcess`` collected) is released by a finalizer that never
    waits: the writer sees EOF, commits what it received and exits, and the watcher thread reaps it. Its two threads
    hold it weakly between messages, so they do not keep it alive.

    Args:
        handle: the started process.
        conn: the trainer's end of the socket.
        config: the ``CheckpointProcessConfig`` (timeouts, stall detection, warning interval).
    """

    def __init__(self, handle: WriterProcessHandle, conn: Connection, config: Any) -> None:
        self.handle = handle
        self.conn = conn
        self.config = config
        self.ready: Future = Future()  # resolved by the answer to INIT
        self.failure: CheckpointError | None = None  # set once: the link is broken, its pending futures failed
        self._pending: dict[int, _Pending] = {}
        self._plock = threading.RLock()  # drain() may run in a signal handler that interrupted a holder
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._progress: tuple | None = None
        self._last_kill = -KILL_RETRY_SECS
        self._stopping = False
        self._closed_conn = False
        self._conn_fd = conn.fileno()
        with FORK_LOCK:
            self._sock = socket.socket(fileno=os.dup(self._conn_fd))  # for SCM_RIGHTS and shutdown()
            CHILD_CLOSES.update((self._conn_fd, self._sock.fileno()))
        _LIVE_LINKS.add(self)
        self._finalizer = weakref.finalize(self, _release_dropped, self._outbox, conn, self._sock,
                                           (self._conn_fd, self._sock.fileno()))
        self._finalizer.atexit = False  # at exit the checkpointers drain and close their links themselves
        name, ref = f"lightning_ckpt-writer-{handle.pid}", weakref.ref(self)
        self._sender = threading.Thread(target=_send_loop, args=(ref, self._outbox), name=f"{name}-send",
                                        daemon=True)
        self._reader = threading.Thread(target=_watch_loop, args=(ref, handle, config.subprocess_shutdown_timeout_secs),
                                        name=f"{name}-watch", daemon=True)
        self._sender.start()
        self._reader.start()

    # ---------------------------------------------------------------- submitting

    def submit(self, request: WorkerRequest, what: str, timeout_secs: float = 0.0, timeout_name: str = "",
               interpret: Callable[[WorkerResponse], Any] | None = None, fd: int | None = None,
               future: Future | None = None) -> Future | None:
        """Queue ``request`` for the sender thread; returns the future of its answer (None for unanswered ones).

        Returns at once: the frame is pickled and sent whole by the sender thread, so neither a busy writer nor a
        Ctrl-C on the caller's thread can leave half a message on the socket. ``fd`` (duplicated here) follows
        the frame as SCM_RIGHTS.
        """
        if interpret is not None:
            future = future or Future()
            with self._plock:
                self._pending[request.request_id] = _Pending(future, what, timeout_secs, timeout_name, interpret)
                _BUSY_LINKS.add(self)
        dup = None
        try:
            if fd is not None:
                with FORK_LOCK:
                    dup = os.dup(fd)
                    CHILD_CLOSES.add(dup)
            self._outbox.put((request, what, dup))
        except BaseException:
            self._pop(request.request_id)
            if dup is not None:
                close_tracked_fd(dup)
            raise
        if self.failure is not None:  # broke meanwhile: nobody else will fail this one
            self._fail_all(self.failure)
        return future

    def _send_one(self, request: WorkerRequest, what: str, fd: int | None) -> None:
        if self.failure is not None:
            return
        try:
            payload = {k: v.compute() if isinstance(v, SendTime) else v for k, v in request.payload.items()}
            frame = encode_request(WorkerRequest(request.request_type, payload, request.request_id), ForkingPickler)
        except BaseException as e:  # noqa: BLE001 - this request fails, the link stays usable
            self._resolve_error(request.request_id, CheckpointWriteError(f"{what}: the request could not be "
                                                                         f"prepared for the writer process: {e!r}"), e)
            return
        try:
            self.conn.send_bytes(frame)
            if fd is not None:  # what multiprocessing.reduction.recv_handle reads: one byte, one descriptor
                self._sock.sendmsg([b"\x01"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        except (OSError, ValueError) as e:
            self.break_link(WriterProcessDiedError(
                f"Child process terminated unexpectedly: {what}: sending to the writer process (pid "
                f"{self.handle.pid}) failed: {e}"))

    # ---------------------------------------------------------------- answers and progress

    def _watch_once(self) -> bool:
        """One turn of the watcher thread: read an answer, or check on the writer; False ends the thread."""
        cfg = self.config
        slice_secs = max(0.01, min(0.5, cfg.stall_timeout_secs / 4, cfg.wait_log_interval_secs / 2))
        try:
            if self.conn.poll(slice_secs):
                self._on_response(self.conn.recv())
                return True
        except (EOFError, OSError) as e:
            self._on_disconnect(e)
            return False
        if self._stopping and not self._pending:
            return False
        if self.handle.poll() is not None:
            self._on_disconnect(None)
            return False
        self._check_progress()
        return True

    def _on_response(self, response: WorkerResponse) -> None:
        now = time.monotonic()
        if response.request_type is RequestType.PROGRESS:
            with self._plock:
                pending = self._pending.get(response.request_id)
                if pending is not None:
                    pending.phase, pending.last_progress = response.payload["phase"], now
            return
        pending = self._pop(response.request_id)
        if pending is None:
            return
        try:
            result = pending.interpret(response)
        except BaseException as e:  # noqa: BLE001 - the request's own error
            if response.request_type is RequestType.INIT and self.failure is None:
                self.failure = e if isinstance(e, CheckpointError) else CheckpointWriteError(str(e))
            pending.future.set_exception(e)
        else:
            pending.future.set_result(result)

    def _check_progress(self) -> None:
        with self._plock:  # the writer serves in order: the oldest request is the one it works on
            head = self._pending[min(self._pending)] if self._pending else None
        if head is None:
            return
        now, cfg = time.monotonic(), self.config
        progress = self.handle.progress()
        if progress != self._progress:
            self._progress, head.last_progress = progress, now
        if head.phase == "queued":
            head.phase = "starting" if head.timeout_name == "subprocess_init_timeout_secs" else "writing"
        waited, idle = now - head.since, now - head.last_progress
        state = _STATES.get(self.handle.state(), self.handle.state())
        where = f"{head.what} (writer pid {self.handle.pid}, {state}, {len(self._pending)} request(s) pending)"
        if waited > head.timeout_secs:
            self.break_link(CheckpointTimeoutError(f"Timed out after {waited:.0f}s ({head.timeout_name}="
                                                   f"{head.timeout_secs}) waiting for {where}"))
        elif progress is not None and head.phase == "writing" and idle > cfg.stall_timeout_secs:
            self.break_link(CheckpointTimeoutError(
                f"the writer made no progress (no CPU time, no bytes read or written, no message) for {idle:.0f}s "
                f"(stall_timeout_secs={cfg.stall_timeout_secs}) while {where}; it is killed and replaced"))
        elif now - head.last_warning >= cfg.wait_log_interval_secs:
            head.last_warning = now
            log.warning("still waiting for %s: %.0fs so far, last progress %.0fs ago", where, waited, idle)

    def _on_disconnect(self, error: BaseException | None) -> None:
        code = self.handle.wait(min(5.0, self.config.subprocess_shutdown_timeout_secs))
        if code is None and not self._closed_conn:
            self._kill(f"the socket to writer pid {self.handle.pid} closed ({error!r}) but it still runs")
            code = self.handle.wait(self.config.subprocess_shutdown_timeout_secs)
        how = f"died with {self.handle.describe_exit()}" if code is not None else "stopped answering"
        self.break_link(WriterProcessDiedError(f"writer process (pid {self.handle.pid}) {how}"))

    # ---------------------------------------------------------------- failing, draining, closing

    def usable(self) -> bool:
        return self.failure is None and not self.conn.closed and self.handle.poll() is None

    def conn_closed_elsewhere(self) -> bool:
        """Someone closed the trainer's end under us (its descriptor number may be reused already)."""
        if self.conn.closed and not self._closed_conn:
            with FORK_LOCK:
                CHILD_CLOSES.discard(self._conn_fd)
            return True
        return False

    def break_link(self, reason: CheckpointError) -> None:
        """Fail every pending request with ``reason`` (the first reason wins), kill the writer, wake both threads."""
        if self.failure is None:
            self.failure = reason
        self._fail_all(self.failure)
        if self.handle.poll() is None:
            self._kill(str(reason))
        self._shutdown_socket()

    def _fail_all(self, reason: CheckpointError) -> None:
        with self._plock:
            pending, self._pending = self._pending, {}
            _BUSY_LINKS.discard(self)
        for _, p in sorted(pending.items()):
            waited = time.monotonic() - p.since
            error = type(reason)(f"{p.what} did not finish: {reason} (after {waited:.1f}s)")
            if not p.future.done():
                p.future.set_exception(error)

    def _resolve_error(self, request_id: int, error: BaseException, cause: BaseException) -> None:
        pending = self._pop(request_id)
        if pending is not None:
            error.__cause__ = cause
            pending.future.set_exception(error)

    def _pop(self, request_id: int) -> _Pending | None:
        with self._plock:
            pending = self._pending.pop(request_id, None)
            if self._pending and pending is not None:  # the next request is now the writer's current one
                nxt = self._pending[min(self._pending)]
                nxt.since = nxt.last_progress = nxt.last_warning = max(nxt.since, time.monotonic())
            elif not self._pending:
                _BUSY_LINKS.discard(self)
            return pending

    def _kill(self, reason: str) -> None:
        now = time.monotonic()
        if now - self._last_kill < KILL_RETRY_SECS:
            return
        first = self._last_kill < 0
        self._last_kill = now
        if first:
            log.error("%s; killing writer pid %d", reason, self.handle.pid)
        else:
            log.warning("writer pid %d is still alive after SIGKILL (%s); signalling it again", self.handle.pid,
                        _STATES.get(self.handle.state(), self.handle.state()))
        self.handle.kill()

    def _shutdown_socket(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a send or poll blocked on the socket
        except OSError:
            pass

    def pending_whats(self) -> list[str]:
        with self._plock:
            return [p.what for _, p in sorted(self._pending.items())]

    def drain(self, timeout_secs: float) -> bool:
        """Wait up to ``timeout_secs`` until every request sent so far is answered or failed."""
        deadline, last_log = time.monotonic() + timeout_secs, time.monotonic()
        while True:
            with self._plock:
                futures = [p.future for p in self._pending.values()]
            if not futures:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("drain: %d write(s) still pending after %.1fs: %s", len(futures), timeout_secs,
                            self.pending_whats())
                return False
            if time.monotonic() - last_log >= self.config.wait_log_interval_secs:
                last_log = time.monotonic()
                log.warning("draining the writer process (pid %d): waiting for %s", self.handle.pid,
                            self.pending_whats())
            _wait_first(futures, min(left, self.config.wait_log_interval_secs))

    def shutdown(self, timeout_secs: float, terminate: WorkerRequest) -> None:
        """Ask the writer to exit after its queued requests, kill it past ``timeout_secs``, release everything.

        Raises:
            CheckpointTimeoutError: the writer outlived SIGKILL (after everything here was released).
        """
        handle = self.handle
        if self.usable():
            self.submit(terminate, "stopping the writer process")
        exited = handle.join(timeout=timeout_secs)
        if not exited:
            self._kill(f"writer pid {handle.pid} did not exit within subprocess_shutdown_timeout_secs={timeout_secs}")
            exited = handle.wait(timeout_secs) is not None
        self._stopping = True
        if exited:  # the answers it sent before exiting are read before anything left is failed
            self._reader.join(timeout=timeout_secs)
        self.break_link(CheckpointError("the CheckpointProcess was closed"))
        self._outbox.put(None)
        for thread in (self._sender, self._reader):
            if thread is not threading.current_thread():
                thread.join(timeout=timeout_secs)
        self._closed_conn = True
        self._finalizer.detach()
        with FORK_LOCK:
            CHILD_CLOSES.difference_update((self._conn_fd, self._sock.fileno()))
            self.conn.close()
            self._sock.close()
        _LIVE_LINKS.discard(self)
        _BUSY_LINKS.discard(self)
        if not exited:
            raise CheckpointTimeoutError(f"writer pid {handle.pid} did not exit within {timeout_secs}s after "
                                         f"SIGKILL ({_STATES.get(handle.state(), handle.state())})")


def _send_loop(ref: "weakref.ref[WriterLink]", outbox: queue.SimpleQueue) -> None:
    """The sender thread: holds the link only while sending a frame, and keeps no request between frames (a
    request's payload can reach a staging buffer and its whole stager)."""
    while True:
        item = outbox.get()
        if item is None:
            return
        request, what, fd = item
        del item
        link = ref()
        try:
            if link is not None:
                link._send_one(request, what, fd)
        finally:
            del link, request  # dropping the link here may run its finalizer on this thread: it never waits
            if fd is not None:
                close_tracked_fd(fd)


def _watch_loop(ref: "weakref.ref[WriterLink]", handle: WriterProcessHandle, shutdown_timeout_secs: float) -> None:
    """The watcher thread: holds the link for one turn at a time; once it was dropped, reaps its writer."""
    while True:
        link = ref()
        if link is None:
            _reap_dropped(handle, shutdown_timeout_secs)
            return
        if not link._watch_once():
            return
        del link


def _release_dropped(outbox: queue.SimpleQueue, conn: Connection, sock: socket.socket, fds: tuple[int, int]) -> None:
    """Finalizer of a link dropped without ``shutdown``; runs on whichever thread collected it (one of the link's
    own, too), so it never waits: the sender stops, and closing the socket gives the writer EOF after the frames
    it was sent (it commits them and exits; the watcher thread reaps it)."""
    outbox.put(None)
    with FORK_LOCK:
        CHILD_CLOSES.difference_update(fds)
        conn.close()
        sock.close()


def _reap_dropped(handle: WriterProcessHandle, timeout_secs: float) -> None:
    """Wait (bounded) for the writer of a dropped link to exit, killing it past ``timeout_secs``; reap it."""
    if handle.wait(timeout_secs) is not None:
        return
    log.warning("writer pid %d did not exit within %ss of its CheckpointProcess being dropped without close(); "
                "killing it", handle.pid, timeout_secs)
    handle.kill()
    if handle.wait(timeout_secs) is None:
        log.error("writer pid %d outlived SIGKILL (%s)", handle.pid, _STATES.get(handle.state(), handle.state()))


_STATES = {"R": "running", "S": "sleeping", "D": "in uninterruptible I/O (D state: a hung disk or NFS?)",
           "T": "stopped (SIGSTOP?)", "t": "stopped by a tracer", "Z": "exited", "?": "state unknown"}


def _wait_first(futures: list[Future], timeout_secs: float) -> None:
    from concurrent.futures import FIRST_COMPLETED, wait

    wait(futures, timeout=timeout_secs, return_when=FIRST_COMPLETED)
