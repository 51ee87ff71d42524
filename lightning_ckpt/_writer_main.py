"""Entry point of the writer process: ``python -m lightning_ckpt._writer_main <socket fd>``."""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import mmap
import os
import resource
import select
import signal
import socket
import sys
import traceback
from multiprocessing.connection import Connection
from collections.abc import Iterator
from typing import Any, Callable

from lightning_ckpt.barriers import KeyedBarrier, barrier_report_error, barrier_wait
from lightning_ckpt.worker_protocol import (
    ANSWERED,
    RequestType,
    WorkerRequest,
    WorkerResponse,
    decode_request,
    frame_request_id,
)

log = logging.getLogger("lightning_ckpt.writer")


class StagingBufferMapError(OSError):
    """Receiving or mapping a staging buffer failed; the trainer sends it again with its next write."""


def make_default_writer(config: Any, rank_info: Any, barrier_config: Any = None, commit_hook: Any = None,
                        report_phase: Callable[[str], None] | None = None,
                        trainer_gone: Callable[[], bool] | None = None) -> Any:
    """The writer a ``CheckpointProcess`` builds when no ``checkpoint_writer_init_fn`` is given (torch-free).

    ``report_phase`` is told when the writer waits at the barrier, so the trainer does not take a wait for the
    other ranks for a stalled writer (the barrier bounds that wait itself). ``trainer_gone`` says whether the
    trainer died: its writes then publish only over what their final path held when they started.
    """
    from lightning_ckpt.barriers import create_barrier_from_config
    from lightning_ckpt.checkpoint_writer import CheckpointWriter

    barrier = create_barrier_from_config(barrier_config, rank_info)
    if barrier is not None and report_phase is not None:
        barrier = _PhaseReportingBarrier(barrier, report_phase)
    return CheckpointWriter(config, rank_info, barrier, commit_hook, trainer_gone=trainer_gone)


class _PhaseReportingBarrier(KeyedBarrier):
    """Tells the trainer while this rank waits for its peers: that wait is bounded by the barrier's own timeout
    and is not taken for a stalled writer. Keys and error reports pass through to a keyed barrier."""

    def __init__(self, inner: Any, report_phase: Callable[[str], None]) -> None:
        self._inner = inner
        self._report_phase = report_phase

    def execute_barrier(self, key: str | None = None) -> None:
        self._report_phase("barrier")
        try:
            if key is None:
                self._inner.execute_barrier()
            else:
                barrier_wait(self._inner, key)
        finally:
            self._report_phase("writing")

    def report_error(self, message: str, key: str | None = None) -> None:
        barrier_report_error(self._inner, key, message)

    def share(self, value: str | None, key: str) -> str:
        self._report_phase("barrier")
        try:
            return self._inner.share(value, key=key)
        finally:
            self._report_phase("writing")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Server:
    """Serves requests in order until ``TERMINATE_PROCESS`` or the trainer's end of the socket closes."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.writer: Any = None
        self.buffers: dict[int, mmap.mmap] = {}
        self.unmapped: dict[int, str] = {}  # buffer id -> why receiving or mapping it failed
        self.orphaned = False  # the trainer is gone: commit what it fully sent (never over a newer run), answer nobody
        self._current: WorkerRequest | None = None
        self._handlers: dict[RequestType, Callable[[WorkerRequest], Any]] = {
            RequestType.INIT: self._init, RequestType.PING: lambda r: None,
            RequestType.WRITE_CHECKPOINT: self._write_checkpoint, RequestType.WRITE_PREPARED: self._write_prepared,
            RequestType.ADD_BUFFER: self._add_buffer, RequestType.DROP_BUFFER: self._drop_buffer,
            RequestType.TERMINATE_PROCESS: lambda r: None, RequestType.WRITE_SHARDS: self._write_shards,
        }

    def serve(self) -> None:
        try:
            while True:
                try:
                    decoded = self._decode(self.conn.recv_bytes())
                except EOFError:
                    return  # every request the trainer sent whole has been served
                # The frame is gone once decoded: a request of 100k key paths would otherwise be held twice while
                # it is written.
                if decoded is None:
                    continue
                keep_serving = self._serve(decoded)
                del decoded  # not held while waiting for the next frame
                if not keep_serving:
                    return
        finally:
            for mapping in self.buffers.values():
                mapping.close()

    def _decode(self, frame: bytes) -> tuple[int, Any] | None:
        """``(request id, request)`` of one frame, or None when it could not be decoded (answered here)."""
        try:
            request_id = frame_request_id(frame)
        except ValueError as e:
            log.error("%s: ignored", e)
            return None
        try:
            return request_id, decode_request(frame)
        except Exception as e:  # noqa: BLE001 - e.g. an init function whose module the writer cannot import
            self._respond(WorkerResponse(RequestType.PING, False, _error_text(e, "could not decode the request"),
                                         request_id=request_id, error_type=type(e).__name__))
            return None

    def _serve(self, decoded: tuple[int, Any]) -> bool:
        """Serve one decoded request; False ends the loop."""
        request_id, request = decoded
        handler = self._handlers.get(getattr(request, "request_type", None))
        if not isinstance(request, WorkerRequest) or handler is None:
            kind = getattr(request, "request_type", type(request).__name__)
            log.error("unknown request %r (id %d): ignored", kind, request_id)
            self._respond(WorkerResponse(RequestType.PING, False, f"unknown request {kind!r}",
                                         request_id=request_id, error_type="ValueError"))
            return True
        if self.writer is None and request.request_type not in (RequestType.INIT, RequestType.TERMINATE_PROCESS):
            self._respond(WorkerResponse(request.request_type, False, "the writer was not initialised",
                                         request_id=request_id, error_type="RuntimeError"))
            return True
        return self._handle(handler, request)

    def _handle(self, handler: Callable[[WorkerRequest], Any], request: WorkerRequest) -> bool:
        self._current = request
        try:
            payload = handler(request)
        except Exception as e:  # noqa: BLE001 - one failed request must not end the loop
            if request.request_type in ANSWERED:
                self._respond(WorkerResponse(request.request_type, False, _error_text(e), request_id=request.request_id,
                                             error_type=type(e).__name__))
            return request.request_type is not RequestType.INIT  # without a writer there is nothing to serve
        finally:
            self._current = None
        if request.request_type in ANSWERED:
            self._respond(WorkerResponse(request.request_type, True, payload=payload, request_id=request.request_id))
        if request.request_type is RequestType.WRITE_PREPARED:
            self.writer.remove_replaced()  # after the answer: the trainer does not wait for freeing old blocks
        return request.request_type is not RequestType.TERMINATE_PROCESS

    def _respond(self, response: WorkerResponse) -> None:
        if self.orphaned:
            return
        try:
            self.conn.send(response)
        except (BrokenPipeError, ConnectionError):
            # The trainer died (SIGKILL, a job-wide SIGTERM): nobody reads answers any more, but the requests it
            # sent whole are still in the socket and are committed before the EOF ends the loop.
            self.orphaned = True
            log.info("the training process is gone; finishing the requests it sent")

    def trainer_gone(self) -> bool:
        """Whether the training process is gone: its end of the socket closed (seen at once, while the requests it
        sent whole are still unread), or an answer could not be sent."""
        if not self.orphaned and _peer_closed(self.conn):
            self.orphaned = True
            log.info("the training process is gone; finishing the requests it sent")
        return self.orphaned

    def report_phase(self, phase: str) -> None:
        if self._current is not None:
            self._respond(WorkerResponse(RequestType.PROGRESS, True, payload={"phase": phase},
                                         request_id=self._current.request_id))

    def _init(self, request: WorkerRequest) -> None:
        p = request.payload
        logging.basicConfig(level=p["log_level"], format="[lightning_ckpt writer %(process)d] %(levelname)s %(message)s")
        if p["niceness"]:
            os.nice(p["niceness"])
        if p["authkey"] is not None:  # torch shares tensors through multiprocessing's resource sharer
            import multiprocessing

            multiprocessing.current_process().authkey = p["authkey"]
        if p["subprocess_init_fn"] is not None:
            p["subprocess_init_fn"](*p["subprocess_init_args"])
        init_fn, init_args = p["checkpoint_writer_init_fn"], dict(p["checkpoint_writer_init_args"])
        init_args.setdefault("rank_info", p["rank_info"])
        if init_fn is make_default_writer:
            init_args["report_phase"] = self.report_phase
            init_args["trainer_gone"] = self.trainer_gone
        self.writer = init_fn(**init_args)

    def _write_checkpoint(self, request: WorkerRequest) -> None:
        p = request.payload
        self.writer.write(path=p["path"], state_dict=p["state_dict"], **p["kwargs"])

    def _write_prepared(self, request: WorkerRequest) -> dict[str, Any]:
        p = request.payload
        with self._staged_view(p["buffer_id"]) as view:
            stats = self.writer.write_prepared(p["path"], p["prepared"], view, save_key=p["save_key"],
                                               defer_cleanup=True, after_commit=p["after_commit"])
        return {"stats": stats}

    def _write_shards(self, request: WorkerRequest) -> dict[str, Any]:
        p = request.payload
        direct_io = getattr(getattr(self.writer, "config", None), "use_direct_io", True)
        with self._staged_view(p["buffer_id"]) as view:
            return {"files": write_shard_files(p["path"], p["token"], p["items"], view, fsync=p["fsync"],
                                               direct_io=direct_io)}

    @contextlib.contextmanager
    def _staged_view(self, buffer_id: int | None) -> Iterator[memoryview | None]:
        """A view of staging buffer ``buffer_id`` (None: no buffer) for one write, released after it."""
        if buffer_id in self.unmapped:
            raise StagingBufferMapError(self.unmapped.pop(buffer_id))
        view = memoryview(self.buffers[buffer_id]) if buffer_id is not None else None
        try:
            yield view
        finally:
            if view is not None:
                _release(view)

    def _add_buffer(self, request: WorkerRequest) -> None:
        buffer_id, nbytes = request.payload["buffer_id"], request.payload["nbytes"]
        try:
            fd = self._recv_fd()
        except OSError as e:
            self.unmapped[buffer_id] = _error_text(e, f"receiving staging buffer {buffer_id} failed")
            return
        try:
            # MAP_POPULATE maps every page now, once per buffer, instead of faulting them in during each write.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self.buffers[buffer_id] = mmap.mmap(fd, nbytes, flags=flags)
        except (OSError, ValueError) as e:
            self.unmapped[buffer_id] = _error_text(e, f"mapping staging buffer {buffer_id} ({nbytes} bytes) failed")
        finally:
            os.close(fd)

    def _recv_fd(self) -> int:
        """The descriptor that follows an ADD_BUFFER frame: one byte with SCM_RIGHTS. The byte is consumed even
        when the descriptor is not (EMFILE), so the stream stays in step."""
        sock = socket.socket(fileno=self.conn.fileno())  # same descriptor: no dup, which could fail with EMFILE
        try:
            data, ancdata, flags, _ = sock.recvmsg(1, socket.CMSG_SPACE(array.array("i").itemsize))
        finally:
            sock.detach()
        if not data:
            raise EOFError("the trainer closed the socket before sending the staging buffer")
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        for extra in fds[1:]:
            os.close(extra)
        if not fds:
            truncated = " (MSG_CTRUNC: out of descriptors?)" if flags & socket.MSG_CTRUNC else ""
            raise OSError(errno.EMFILE if truncated else errno.EPROTO,
                          f"received 0 items of ancdata{truncated}; RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)}")
        return fds[0]

    def _drop_buffer(self, request: WorkerRequest) -> None:
        self.unmapped.pop(request.payload["buffer_id"], None)
        mapping = self.buffers.pop(request.payload["buffer_id"], None)
        if mapping is not None:
            mapping.close()


def write_shard_files(final_path: str, token: str, items: list[tuple[str, Any]], buffer: memoryview | None, *,
                      fsync: bool, direct_io: bool) -> list[dict[str, Any]]:
    """Write staged DCP chunks, one file each, into the directory temp ``token`` of ``final_path`` (which the
    coordinator created and commits).

    An item is ``(file name, bytes)`` (written as is) or ``(file name, PreparedCheckpoint)``: a ``torch.save``
    zip whose tensor bytes are read from ``buffer`` (large staged records with O_DIRECT), each record hashed
    from the memory it is written from. Returns, per file, its ``name``, ``nbytes`` and either the ``xxh3`` of
    its bytes or the xxh3 of each zip record (``records``: ``data.pkl``, ``data/<key>``).
    """
    from lightning_ckpt.checkpoint_file import write_file
    from lightning_ckpt.commit import Commit
    from lightning_ckpt.torch_zip import checksum

    files = []
    with Commit.join(final_path, token, fsync=fsync) as commit:
        for name, data in items:
            if isinstance(data, (bytes, bytearray)):
                commit.write_bytes(name, data)
                files.append({"name": name, "nbytes": len(data), "xxh3": checksum(data)})
                continue
            record = write_file(os.path.join(commit.path, name), data, buffer, direct_io=direct_io,
                                opener=commit.opener(name), fsync=fsync)
            sums = {"data.pkl": record.data_pkl_xxh3, **{f"data/{k}": r.xxh3 for k, r in record.records.items()}}
            files.append({"name": name, "nbytes": commit.size(name), "records": sums})
    return files


def _peer_closed(conn: Connection) -> bool:
    """The other end of the socket closed: ``POLLHUP``/``POLLRDHUP`` are reported even with unread data queued."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLRDHUP)
    return any(events & (select.POLLHUP | select.POLLRDHUP) for _, events in poller.poll(0))


def _error_text(exc: BaseException, context: str | None = None) -> str:
    text = "".join(traceback.format_exception(exc))
    return f"{context}: {exc}\n{text}" if context else text


def _release(view: memoryview) -> None:
    try:
        view.release()
    except BufferError:
        pass  # a storage from a failed write still points at it; it goes with the traceback


def main() -> None:
    # Ctrl-C and a job-wide SIGTERM belong to the training process, which drains us; we finish what it sent and
    # exit at the EOF of its socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fd = int(sys.argv[1])
    # Keep nothing else the spawner had open (posix_spawn closes only close-on-exec descriptors).
    os.closerange(3, fd)
    os.closerange(fd + 1, max(fd + 2, os.sysconf("SC_OPEN_MAX")))
    conn = Connection(fd)
    try:
        _Server(conn).serve()
    except (EOFError, ConnectionError):
        pass  # the trainer vanished in the middle of a message: nothing complete is left to serve
    finally:
        conn.close()


if __name__ == "__main__":
    # Serve with the importable module's copy: the INIT request names ``make_default_writer`` by module path, and
    # only that copy's ``_Server`` recognises it (and hands it ``report_phase`` and ``trainer_gone``).
    from lightning_ckpt._writer_main import main as _main

    _main()
