"""Entry point of the writer subprocess: ``python -m lightning_ckpt._writer_main <socket fd>``."""

from __future__ import annotations

import logging
import mmap
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from typing import Any


def _serve(conn: Connection) -> None:
    from lightning_ckpt.barriers import create_barrier_from_config
    from lightning_ckpt.checkpoint_process import (
        AddBufferRequest, DropBufferRequest, InitRequest, Response, ShutdownRequest, WriteRequest,
    )
    from lightning_ckpt.checkpoint_writer import CheckpointWriter

    init = conn.recv()
    assert isinstance(init, InitRequest), f"expected InitRequest, got {type(init).__name__}"
    logging.basicConfig(level=init.log_level, format="[lightning_ckpt writer %(process)d] %(levelname)s %(message)s")
    if init.niceness:
        os.nice(init.niceness)
    try:
        barrier = create_barrier_from_config(init.barrier_config, init.rank_info)
        writer = CheckpointWriter(init.writer_config, init.rank_info, barrier, init.commit_hook)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(Response(-1, False, error_type=type(e).__name__, error_text=traceback.format_exc()))
        return
    conn.send(Response(-1, True))
    buffers: dict[int, mmap.mmap] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break  # the training process is gone: nothing more will come
        if isinstance(msg, ShutdownRequest):
            break
        if isinstance(msg, AddBufferRequest):
            fd = recv_handle(conn)
            # MAP_POPULATE maps every page now, once per buffer, instead of faulting them in during each write.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            buffers[msg.buffer_id] = mmap.mmap(fd, msg.nbytes, flags=flags)
            os.close(fd)
        elif isinstance(msg, DropBufferRequest):
            mapping = buffers.pop(msg.buffer_id, None)
            if mapping is not None:
                mapping.close()
        elif isinstance(msg, WriteRequest):
            conn.send(_write(writer, msg, buffers))
            writer.remove_replaced()  # after the reply: the trainer does not wait for freeing old blocks
    for mapping in buffers.values():
        mapping.close()


def _write(writer: Any, msg: Any, buffers: dict) -> Any:
    from lightning_ckpt.checkpoint_process import Response

    try:
        buffer = memoryview(buffers[msg.buffer_id]) if msg.buffer_id is not None else None
        try:
            stats = writer.write_prepared(msg.path, msg.prepared, buffer, save_key=msg.save_key, defer_cleanup=True,
                                          after_commit=msg.after_commit)
        finally:
            if buffer is not None:
                _release(buffer)
        return Response(msg.request_id, True, stats=stats)
    except BaseException as e:  # noqa: BLE001 - one failed write must not end the loop
        return Response(msg.request_id, False, error_type=type(e).__name__, error_text=traceback.format_exc())


def _release(view: memoryview) -> None:
    try:
        view.release()
    except BufferError:
        pass  # a storage from a failed write still points at it; it goes with the traceback


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the training process, which drains us
    conn = Connection(int(sys.argv[1]))
    try:
        _serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
