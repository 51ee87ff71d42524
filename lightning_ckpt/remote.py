"""Remote checkpoint objects (s3://, gs://): the protocol-independent upload, with a per-protocol store underneath.

An upload is the commit: the object appears only when its store completes the upload (S3: CompleteMultipartUpload;
GCS: the final chunk of a resumable session), and every failure, ``BaseException`` included, aborts it. Deadlines,
part planning, the concurrency of parts and the sweep of stale uploads live here, once; ``remote_s3`` and
``remote_gcs`` say how one request is made on their store (imported only in the process that makes a call).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, ClassVar, Protocol

from lightning_ckpt.commit import remove_path
from lightning_ckpt.config_fields import AT_LEAST_ONE, POSITIVE, TIMEOUT, Range, check_fields
from lightning_ckpt.errors import CheckpointError, CheckpointTimeoutError, CheckpointWriteError
from lightning_ckpt.paths import RemotePath

log = logging.getLogger(__name__)

MIN_PART_BYTES = 5 << 20  # S3's minimum for every part but the last
MAX_PART_BYTES = 5 << 30
MAX_PARTS = 10_000
MAX_COPY_OBJECT_BYTES = 5 << 30  # larger objects are copied part by part
_ABORT_TIMEOUT_SECS = 30.0
_LIST_PAGES = 100  # at most 100k objects or uploads listed under one prefix
STORES = {"s3": "lightning_ckpt.remote_s3", "gs": "lightning_ckpt.remote_gcs"}  # protocol -> store module
STREAMING_PROTOCOLS = ("s3",)  # stores that take an upload of unknown total size (remote_stream)

_swept_prefixes: set[tuple] = set()  # prefixes whose stale uploads this process already aborted


def upload_timeout_secs(write_timeout_secs: float) -> float:
    """A remote save's deadline inside the writer: before its watchdog kills it at ``write_timeout_secs``, so a
    stuck upload is aborted by its own writer rather than left dangling."""
    return 0.8 * write_timeout_secs


class ObjectReplacedError(CheckpointError):
    """The object was replaced while it was read (its version changed between requests): read it again."""


@dataclass
class RemoteConfig:
    """How remote checkpoints are uploaded and downloaded.

    Args:
        part_size_bytes: multipart part size (>= 5 MiB, S3's minimum; raised for files over 10,000 parts).
        max_concurrency: parts uploaded or ranges downloaded at once (each holds one part in memory).
        max_attempts: attempts per request (5xx, throttling, dropped connections are retried).
        connect_timeout_secs: None: derived from ``process_config.write_timeout_secs`` (at most 10 s).
        read_timeout_secs: None: derived from ``process_config.write_timeout_secs`` (at most 60 s).
        min_send_bytes_per_sec: the slowest a request's body (an upload part, a small object) may be sent. An
            attempt gets the connect and read timeouts plus its body's size at this rate; one that takes longer
            is cancelled and retried. It catches what no read timeout does: a store or proxy that stops reading
            mid-body leaves the sender blocked on a full TCP window. Lower it on a slow uplink shared by
            ``max_concurrency`` parts.
        no_overwrite_pattern: a regex; file names it matches (step-named ones) are completed only if no object
            is there (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``), so two runs never clobber each
            other's checkpoint ("" disables it).
        stream_from_staging: upload parts straight from the staged bytes, with no commit to the local cache
            first (for nodes without scratch disk; s3:// only). The staging buffer is then held until the upload
            completes, not only until the local commit: the next save may wait longer for it, and memory stays
            taken longer.
    """

    part_size_bytes: int = 32 << 20
    max_concurrency: int = 4
    max_attempts: int = 5
    connect_timeout_secs: float | None = None
    read_timeout_secs: float | None = None
    min_send_bytes_per_sec: float = float(1 << 20)
    no_overwrite_pattern: str = r"step=\d+"
    stream_from_staging: bool = False

    FIELD_RANGES: ClassVar[dict[str, Range]] = {"max_concurrency": AT_LEAST_ONE, "max_attempts": AT_LEAST_ONE,
                                                "connect_timeout_secs": TIMEOUT, "read_timeout_secs": TIMEOUT,
                                                "min_send_bytes_per_sec": POSITIVE}

    def __post_init__(self) -> None:
        check_fields(self)
        if not MIN_PART_BYTES <= self.part_size_bytes <= MAX_PART_BYTES:
            raise ValueError(f"RemoteConfig.part_size_bytes must be in [5 MiB, 5 GiB], got {self.part_size_bytes}")
        try:
            re.compile(self.no_overwrite_pattern)
        except re.error as e:
            raise ValueError(f"RemoteConfig.no_overwrite_pattern is not a regex ({e}): "
                             f"{self.no_overwrite_pattern!r}") from e

    def no_overwrite(self, name: str) -> bool:
        return bool(self.no_overwrite_pattern) and re.search(self.no_overwrite_pattern, name) is not None

    def timeouts(self, timeout_secs: float) -> tuple[float, float]:
        """``(connect, read)`` timeouts of one request under a call's ``timeout_secs``."""
        return (self.connect_timeout_secs or min(10.0, max(1.0, timeout_secs / 10)),
                self.read_timeout_secs or min(60.0, max(1.0, timeout_secs / 4)))

    def attempt_secs(self, nbytes: int, timeout_secs: float) -> float:
        """How long one attempt of a request that sends ``nbytes`` may take (see ``min_send_bytes_per_sec``)."""
        connect, read = self.timeouts(timeout_secs)
        return connect + read + nbytes / self.min_send_bytes_per_sec


@dataclass
class RemoteUpload:
    """Runs in the writer process once the checkpoint is committed locally: upload it to ``target``, then free the
    local copy. The object appears only when the store completes the upload; every failure aborts it.

    Args:
        target: the final object.
        config: part size, concurrency, retries.
        timeout_secs: the whole upload's deadline (the writer is killed at ``write_timeout_secs``).
        sweep_stale: first abort uploads that killed writers left in the target's prefix (False for a fresh
            prefix that live peers share, such as a multi-rank checkpoint's generation).
    """

    target: RemotePath
    config: RemoteConfig
    timeout_secs: float
    sweep_stale: bool = True

    def __post_init__(self) -> None:
        if self.config.stream_from_staging and self.target.protocol not in STREAMING_PROTOCOLS:
            raise ValueError(f"RemoteConfig.stream_from_staging=True cannot upload to {self.target.url}: "
                             f"streamed uploads need a store that takes parts of unknown total size "
                             f"({', '.join(STREAMING_PROTOCOLS)}://)")

    def __call__(self, local_path: str) -> dict:
        start = time.monotonic()
        try:
            run(self._upload, local_path)
        finally:  # uploaded: the store holds it; failed: no one uploads this copy again (the next save is new)
            remove_path(local_path)
        return {"path": self.target.url, "upload_secs": time.monotonic() - start}

    async def _upload(self, local_path: str) -> None:
        deadline = time.monotonic() + self.timeout_secs
        async with _client(self.target, self.config, self.timeout_secs) as client:
            if self.sweep_stale:
                await _abort_stale_uploads(client, self.target, self.timeout_secs)
            await upload_file(client, local_path, self.target, self.config, deadline)


@dataclass
class RemoteObject:
    """One listed object: its path, size and modification time (unix seconds)."""

    path: RemotePath
    nbytes: int
    modified: float


class Store(Protocol):
    """A session on one store (``open_store`` in ``remote_s3``/``remote_gcs``); every request passes ``_call``.

    An upload handle has a ``target``; ``abort_upload`` is bounded and never raises (a failure is logged: the
    next writer of the prefix or a lifecycle rule cleans up).
    """

    part_align: int  # part sizes are multiples of this (GCS: 256 KiB)
    parallel_parts: bool  # S3 parts go concurrently; a GCS resumable session takes its chunks in order

    async def begin_upload(self, target: RemotePath, parts: list["Part"], no_overwrite: bool,
                           deadline: float) -> Any: ...
    async def upload_part(self, upload: Any, part: "Part", body: bytes, deadline: float) -> Any: ...
    async def complete_upload(self, upload: Any, sent: list[Any], deadline: float) -> None: ...
    async def abort_upload(self, upload: Any) -> None: ...
    async def list_uploads(self, prefix: RemotePath, deadline: float) -> list[tuple[Any, float]]: ...
    async def put(self, target: RemotePath, data: bytes, no_overwrite: bool, deadline: float) -> None: ...
    async def head(self, target: RemotePath, deadline: float) -> tuple[int, str]: ...
    async def get_range(self, target: RemotePath, version: str, first: int, last: int, deadline: float) -> bytes: ...
    async def read_tail(self, target: RemotePath, nbytes: int, deadline: float) -> tuple[int, bytes]: ...
    async def copy(self, source: RemotePath, dest: RemotePath, deadline: float) -> None: ...
    async def delete(self, target: RemotePath, deadline: float) -> None: ...
    async def list_objects(self, directory: RemotePath, deadline: float,
                           recursive: bool = False) -> list[RemoteObject]: ...


# ---------------------------------------------------------------------- running and calling


def run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run ``await fn(*args)`` on a private event loop (in a short-lived thread where a loop already runs)."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is None:
        return asyncio.run(fn(*args))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="lightning_ckpt-remote") as pool:
        return pool.submit(lambda: asyncio.run(fn(*args))).result()


def store_module(protocol: str) -> Any:
    """The module that speaks ``protocol``'s API (imported on first use)."""
    try:
        return importlib.import_module(STORES[protocol])
    except KeyError:
        raise ValueError(f"no remote store for protocol {protocol!r} (known: {sorted(STORES)})") from None


def _client(target: RemotePath, config: RemoteConfig, timeout_secs: float) -> Any:
    """An async context manager yielding a session on ``target``'s store (``remote_s3.S3Store``,
    ``remote_gcs.GCSStore``): the one object every call below goes through."""
    return store_module(target.protocol).open_store(target, config, timeout_secs)


async def _call(what: str, target: RemotePath, awaitable: Awaitable[Any], deadline: float) -> Any:
    """Await one store request before ``deadline``; its store turns errors into ours, naming operation and object.

    Raises:
        CheckpointTimeoutError: the deadline passed. FileNotFoundError, FileExistsError, CheckpointWriteError:
            as the store's ``translate_error`` says.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        if asyncio.iscoroutine(awaitable):
            awaitable.close()  # never started
        raise CheckpointTimeoutError(f"{what} of {target.url} did not start before its deadline")
    try:
        return await asyncio.wait_for(awaitable, remaining)
    except asyncio.TimeoutError as e:
        if time.monotonic() < deadline:  # the request's own read or connect timeout (aiohttp's are TimeoutErrors)
            raise CheckpointWriteError(f"{what} of {target.url} failed: it timed out ({type(e).__name__}: {e}) "
                                       f"with {deadline - time.monotonic():.1f} s of its deadline left") from e
        raise CheckpointTimeoutError(
            f"{what} of {target.url} did not finish before its deadline ({remaining:.1f} s left)") from e
    except Exception as e:
        translated = store_module(target.protocol).translate_error(what, target, e)
        if translated is None:
            raise
        raise translated from e


async def _send(what: str, target: RemotePath, request: Callable[[], Awaitable[Any]], nbytes: int,
                config: RemoteConfig, timeout_secs: float, deadline: float) -> Any:
    """``_call`` for a request that sends an ``nbytes`` body, each attempt bounded by ``config.attempt_secs``: an
    attempt still sending or waiting past its bound (a peer that stopped reading the body holds the sender in a
    zero TCP window, where the read timeout never starts) is cancelled and ``request()`` made again, up to
    ``config.max_attempts`` times. Only for requests that may be repeated: an upload part or chunk at its offset,
    a whole-object put.
    """
    bound = config.attempt_secs(nbytes, timeout_secs)
    for attempt in range(1, config.max_attempts + 1):
        attempt_deadline = min(deadline, time.monotonic() + bound)
        try:
            return await _call(what, target, request(), attempt_deadline)
        except CheckpointTimeoutError:
            if attempt_deadline >= deadline or attempt == config.max_attempts:
                raise
            log.warning("%s of %s (%d bytes) took over %.1f s, the bound for sending it at "
                        "RemoteConfig.min_send_bytes_per_sec=%.0f (a stalled connection?); retrying (attempt %d of "
                        "%d)", what, target.url, nbytes, bound, config.min_send_bytes_per_sec, attempt + 1,
                        config.max_attempts)
    raise AssertionError("unreachable")


async def _gather_or_cancel(coros: list[Awaitable[Any]]) -> list[Any]:
    """Run ``coros`` concurrently; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()
        return [t.result() for t in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------- upload


@dataclass(frozen=True)
class Part:
    """One part of an upload: its 1-based number, offset and length, and whether it is the last."""

    number: int
    offset: int
    nbytes: int
    last: bool


def plan_parts(size: int, config: RemoteConfig, align: int = 1) -> list[Part]:
    """The parts of a ``size``-byte upload: ``config.part_size_bytes`` (raised to fit in 10,000 parts, rounded up to
    a multiple of ``align``), at least one part (an empty file is one empty part)."""
    part_size = max(config.part_size_bytes, -(-size // MAX_PARTS))
    part_size = -(-part_size // align) * align
    offsets = range(0, max(size, 1), part_size)
    return [Part(n + 1, off, min(part_size, size - off), n == len(offsets) - 1) for n, off in enumerate(offsets)]


async def upload_file(client: Any, local_path: str, target: RemotePath, config: RemoteConfig,
                      deadline: float) -> None:
    """Upload ``local_path`` to ``target`` through the store session ``client`` (from ``_client``); only the
    store's completion makes the object visible.

    Raises:
        FileExistsError: a step-named object exists already (``RemoteConfig.no_overwrite_pattern``).
        CheckpointWriteError, CheckpointTimeoutError: the store refused, or the deadline passed; the upload is
            aborted (nothing is published, no parts stay billed).
    """
    size = os.path.getsize(local_path)
    fd = os.open(local_path, os.O_RDONLY)
    try:
        async def read(offset: int, nbytes: int) -> bytes:
            return await asyncio.to_thread(os.pread, fd, nbytes, offset)

        await upload_from(client, read, size, target, config, deadline)
    finally:
        os.close(fd)


async def upload_from(client: Any, read: Callable[[int, int], Awaitable[Any]], size: int, target: RemotePath,
                      config: RemoteConfig, deadline: float) -> None:
    """Upload ``size`` bytes that ``await read(offset, nbytes)`` returns (a file, or staging memory) to ``target``:
    begin, send the parts (concurrently where the store allows), complete; abort on every failure."""
    parts = plan_parts(size, config, client.part_align)
    upload = await client.begin_upload(target, parts, config.no_overwrite(target.name), deadline)
    completed = False
    try:
        if client.parallel_parts and len(parts) > 1:
            limit = asyncio.Semaphore(config.max_concurrency)
            sent = await _gather_or_cancel([_upload_part(client, upload, read, part, limit, deadline)
                                            for part in parts])
        else:
            limit = asyncio.Semaphore(1)
            sent = [await _upload_part(client, upload, read, part, limit, deadline) for part in parts]
        await client.complete_upload(upload, sent, deadline)
        completed = True
    finally:
        if not completed:
            await client.abort_upload(upload)


async def _upload_part(client: Any, upload: Any, read: Callable[[int, int], Awaitable[Any]], part: Part,
                       limit: asyncio.Semaphore, deadline: float) -> Any:
    async with limit:
        body = await read(part.offset, part.nbytes)
        if len(body) != part.nbytes:
            raise CheckpointWriteError(
                f"{upload.target.url}: the source changed during the upload (part {part.number})")
        return await client.upload_part(upload, part, body, deadline)


async def _abort_stale_uploads(client: Any, target: RemotePath, older_than_secs: float) -> None:
    """Abort uploads left in ``target``'s prefix by killed writers: older than the write timeout (a live writer
    of ours is killed by then), direct children of the prefix only, once per prefix and process."""
    prefix = target.key.rsplit("/", 1)[0] + "/" if "/" in target.key else ""
    marker = (target.protocol, target.storage_options.get("endpoint_url"), target.bucket, prefix)
    if marker in _swept_prefixes:
        return
    deadline = time.monotonic() + _ABORT_TIMEOUT_SECS
    now = time.time()
    for upload, initiated in await client.list_uploads(target.sibling(""), deadline):
        key = upload.target.key
        age = now - initiated
        if "/" in key[len(prefix):] or age <= older_than_secs:
            continue
        log.warning("aborting a dangling upload of %s (%.0f s old; its writer was killed)", upload.target.url, age)
        await client.abort_upload(upload)
    _swept_prefixes.add(marker)


# ---------------------------------------------------------------------- trees, leftovers of dead ranks


def list_tree(directory: RemotePath, config: RemoteConfig, timeout_secs: float) -> list[tuple[str, int, float]]:
    """Every object under ``directory`` (a prefix, at any depth): ``(key below the prefix, size, mtime)``."""
    async def listing() -> list[tuple[str, int, float]]:
        prefix = directory.key.rstrip("/") + "/"
        async with _client(directory, config, timeout_secs) as client:
            found = await client.list_objects(directory, time.monotonic() + timeout_secs, recursive=True)
        return [(o.path.key[len(prefix):], o.nbytes, o.modified) for o in found]

    return run(listing)


def abort_stale_uploads_below(directory: RemotePath, config: RemoteConfig, older_than_secs: float,
                              match: Callable[[str], bool]) -> list[str]:
    """Abort the uploads under ``directory`` (any depth) whose key below it ``match`` accepts and that are older
    than ``older_than_secs`` (their writers are dead by then); returns their keys. For a multi-rank checkpoint's
    generations, whose killed ranks leave uploads in prefixes that no later save writes to again."""
    async def sweep() -> list[str]:
        prefix = directory.key.rstrip("/") + "/"
        now, aborted = time.time(), []
        async with _client(directory, config, _ABORT_TIMEOUT_SECS) as client:
            listed = await client.list_uploads(directory.child(""), time.monotonic() + _ABORT_TIMEOUT_SECS)
            for upload, initiated in listed:
                below = upload.target.key[len(prefix):]
                if match(below) and now - initiated > older_than_secs:
                    log.warning("aborting a dangling upload of %s (its writer was killed)", upload.target.url)
                    await client.abort_upload(upload)
                    aborted.append(below)
        return aborted

    return run(sweep)
