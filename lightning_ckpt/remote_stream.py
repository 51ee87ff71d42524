"""Multipart uploads streamed from memory: what a producer writes into a pipe goes up part by part, no local file.

For ``RemoteConfig.stream_from_staging``: the checkpoint is serialized from the staging buffer straight into the
upload's parts. The same rules as ``remote.upload_file``: the store's completion is the commit (and comes only
after the producer returned), every failure aborts. Stores whose uploads need the size up front (a GCS resumable
session) cannot stream (``remote.STREAMING_PROTOCOLS``).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any, Callable

from lightning_ckpt.errors import CheckpointWriteError
from lightning_ckpt.remote import (
    MAX_PARTS, Part, RemoteConfig, RemoteUpload, _abort_stale_uploads, _client, _gather_or_cancel, run,
)


def upload_stream(upload: RemoteUpload, size_hint: int, produce: Callable[[Callable[[int], int]], Any]) -> Any:
    """Multipart-upload what ``produce`` writes to ``upload.target``, part by part from memory, no local file.

    ``produce(opener)`` runs on a worker thread; ``opener(flags)`` gives it the write end of a pipe whose other
    end is read into parts of ``part_size_bytes`` (at most ``max_concurrency + 1`` parts in memory). The object
    appears only when CompleteMultipartUpload succeeds, which happens only after ``produce`` returned; if it
    raises, or a part fails, the upload is aborted.

    Args:
        size_hint: about how many bytes ``produce`` writes (parts grow so that 10,000 of them hold it).

    Returns:
        ``(what produce returned, bytes uploaded)``.
    """
    return run(_upload_stream, upload, size_hint, produce)


class _PipeReader:
    """The read end of the producer's pipe; closed only between reads (the descriptor is never reused under one)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()

    def read_part(self, nbytes: int) -> bytearray:
        part = bytearray(nbytes)
        view, got = memoryview(part), 0
        while got < nbytes:
            with self.lock:
                if self.fd < 0:
                    raise CheckpointWriteError("the upload was stopped")
                n = os.readv(self.fd, [view[got:]])
            if n == 0:
                break
            got += n
        view.release()
        del part[got:]
        return part

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def _produce_into(produce: Callable[[Callable[[int], int]], Any], write_fd: int) -> Any:
    taken = False

    def opener(flags: int) -> int:
        nonlocal taken
        if taken:
            raise CheckpointWriteError("a streamed upload takes one file")
        taken = True
        return write_fd

    try:
        return produce(opener)
    finally:
        if not taken:  # once taken, the producer's file object closes it
            os.close(write_fd)


async def _upload_stream(upload: RemoteUpload, size_hint: int, produce: Callable[[Callable[[int], int]], Any]) -> Any:
    target, config, timeout_secs = upload.target, upload.config, upload.timeout_secs
    deadline = time.monotonic() + timeout_secs
    part_size = max(config.part_size_bytes, -(-(size_hint + size_hint // 50 + (16 << 20)) // MAX_PARTS))
    async with _client(target, config, timeout_secs) as client:
        if upload.sweep_stale:
            await _abort_stale_uploads(client, target, timeout_secs)
        handle = await client.begin_upload(target, [], config.no_overwrite(target.name), deadline)
        read_fd, write_fd = os.pipe()
        reader = _PipeReader(read_fd)
        producer = asyncio.ensure_future(asyncio.to_thread(_produce_into, produce, write_fd))
        completed = False
        try:
            sent, nbytes = await _stream_parts(client, handle, reader, part_size, config, deadline)
            result = await producer  # its exception (after any number of parts) aborts the upload
            await client.complete_upload(handle, sent, deadline)
            completed = True
            return result, nbytes
        finally:
            reader.close()  # a producer still writing gets EPIPE and ends
            await asyncio.gather(producer, return_exceptions=True)
            if not completed:
                await client.abort_upload(handle)


async def _stream_parts(client: Any, handle: Any, reader: _PipeReader, part_size: int, config: RemoteConfig,
                        deadline: float) -> tuple[list[Any], int]:
    limit = asyncio.Semaphore(config.max_concurrency)
    tasks: list[asyncio.Future] = []
    nbytes = 0

    async def put(part: Part, body: bytearray) -> Any:
        try:
            return await client.upload_part(handle, part, body, deadline)
        finally:
            limit.release()

    for number in range(1, MAX_PARTS + 1):
        await limit.acquire()
        failed = next((t for t in tasks if t.done() and t.exception() is not None), None)
        if failed is not None:
            limit.release()
            break
        body = await asyncio.to_thread(reader.read_part, part_size)
        if not body and tasks:
            limit.release()
            break
        tasks.append(asyncio.ensure_future(put(Part(number, nbytes, len(body), len(body) < part_size), body)))
        nbytes += len(body)
        if len(body) < part_size:
            break
    else:
        raise CheckpointWriteError(f"{handle.target.url}: more than {MAX_PARTS} parts of {part_size} bytes")
    return await _gather_or_cancel(tasks), nbytes
