"""Operations on committed remote checkpoints (any store of ``remote.STORES``): ranged parallel download, ranged
reads of some byte ranges of one version, tail read, server-side copy, delete, list, one-request put."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from lightning_ckpt import paths
from lightning_ckpt.commit import Commit, remove_path
from lightning_ckpt.errors import CheckpointError, CorruptCheckpointError, IncompleteCheckpointError
from lightning_ckpt.manifest import ChecksumRecord
from lightning_ckpt.paths import RemotePath
from lightning_ckpt.remote import RemoteConfig, RemoteObject, ObjectReplacedError, _client, _gather_or_cancel, run

log = logging.getLogger(__name__)

# fsspec filesystems that cache listings, per protocol: (module, class)
_FSSPEC_CLASSES = {"s3": (("s3fs", "S3FileSystem"),),
                   "gs": (("gcsfs", "GCSFileSystem"), ("gcsfs.core", "GCSFileSystem"))}
LOOKUP_TIMEOUT_SECS = 300.0  # listing and checking checkpoints to resume from
TAIL_BYTES = 1 << 20  # holds the checksum record and the zip's central directory of up to ~10k tensors
_TAIL_ROUNDS = 4  # fetches of an object's end: the first, then from where a read reached before it (twice for a zip)
_READ_ATTEMPTS = 3  # downloads of an object replaced while it is read
_MERGE_GAP_BYTES = 64 << 10  # ranges closer than this are fetched as one GET (a round trip costs more)
# What the bytes say about an object that is not a checkpoint of ours (a store that cannot be read is not that).
NOT_A_CHECKPOINT = (ValueError, CorruptCheckpointError, IncompleteCheckpointError)


def forget_listings(target: RemotePath) -> None:
    """Drop what fsspec's filesystems for ``target``'s store in this process cached about its prefix: they cache
    listings (Lightning's ``ckpt_path="last"`` and ModelCheckpoint use them), and we changed the store behind
    their back."""
    for module_name, class_name in _FSSPEC_CLASSES.get(target.protocol, ()):
        module = sys.modules.get(module_name)  # never imported here: if nobody uses it, nothing is cached
        cls = getattr(module, class_name, None)
        for fs in list(getattr(cls, "_cache", {}).values()):
            fs.invalidate_cache(f"{target.bucket}/{target.key}")


def download(target: RemotePath, dest: str, config: RemoteConfig, timeout_secs: float) -> str:
    """Download ``target`` into the local file ``dest`` (ranged GETs in parallel, all of one object version).

    Raises:
        FileNotFoundError: no such object.
        CheckpointError: the object changed during the download, or the store refused.
    """
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with Commit.create(dest, fsync=False) as commit:  # a cache copy: durability is the store's
        fd = commit.open_new()
        try:
            run(_download, target, fd, config, timeout_secs)
        finally:
            os.close(fd)
        commit.publish()
    return dest


async def _download(target: RemotePath, fd: int, config: RemoteConfig, timeout_secs: float) -> None:
    """All ranges of one version; an object replaced meanwhile is read again from its HEAD (the new version),
    ``_READ_ATTEMPTS`` times at most, as the local reader rereads a file replaced under it."""
    deadline = time.monotonic() + timeout_secs
    async with _client(target, config, timeout_secs) as store:
        for attempt in range(1, _READ_ATTEMPTS + 1):
            size, version = await store.head(target, deadline)
            limit = asyncio.Semaphore(config.max_concurrency)
            os.ftruncate(fd, size)
            step = config.part_size_bytes
            try:
                await _gather_or_cancel([_get_range(store, target, version, fd, off, min(size, off + step) - 1,
                                                    limit, deadline) for off in range(0, size, step)])
                return
            except ObjectReplacedError:
                if attempt == _READ_ATTEMPTS:
                    raise
                log.info("%s was replaced during its download; reading the new version", target.url)


async def _get_range(store: Any, target: RemotePath, version: str, fd: int, first: int, last: int,
                     limit: asyncio.Semaphore, deadline: float) -> None:
    """One range of the object's version ``version`` (a replaced object fails: the download is of one version)."""
    async with limit:
        data = await store.get_range(target, version, first, last, deadline)
        if len(data) != last - first + 1:
            raise CheckpointError(f"{target.url}: bytes {first}-{last} came back short ({len(data)} bytes)")
        await asyncio.to_thread(os.pwrite, fd, data, first)


class _BeforeTail(OSError):
    """A read reached before the fetched tail of an object (``offset``: where it started)."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class _Tail(io.RawIOBase):
    """The last bytes of a remote object as a seekable read-only file; reading before them fails."""

    def __init__(self, size: int, data: bytes) -> None:
        super().__init__()
        self.size, self.data, self.start, self.pos = size, data, size - len(data), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        if pos < 0:  # as a real file: zipfile probes a too-short object this way
            raise OSError(errno.EINVAL, f"negative seek position {pos}")
        self.pos = pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        if self.pos < self.start:
            raise _BeforeTail(f"offset {self.pos} lies before the last {len(self.data)} bytes that were fetched",
                              self.pos)
        chunk = self.data[self.pos - self.start:self.pos - self.start + len(buffer)]
        buffer[:len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def read_checksum_record(target: RemotePath, config: RemoteConfig, timeout_secs: float) -> ChecksumRecord | None:
    """The checksum record of a remote checkpoint, from ranged GETs of its tail (the record is written last, one
    GET for up to ~10k tensors); ``checkpoint_file.read_checksum_record`` over those bytes.

    Raises:
        ValueError: not a readable torch zip. CorruptCheckpointError: a malformed record.
        CheckpointError: the store refused, or the object kept changing while it was read.
    """
    from lightning_ckpt.checkpoint_file import read_checksum_record as read_record_of

    return read_from_tail(target, read_record_of, config, timeout_secs)


def read_from_tail(target: RemotePath, parse: Callable[[Any], Any], config: RemoteConfig,
                   timeout_secs: float) -> Any:
    """``parse(file)`` over the end of ``target``: its last ``TAIL_BYTES`` fetched as a seekable file, fetched
    again from further back whenever ``parse`` reads before them (a large zip directory, a large manifest).

    Raises:
        FileNotFoundError: no such object. CheckpointError: still reading before the fetched bytes after
            ``_TAIL_ROUNDS`` fetches (the object kept changing), or the store refused.
    """
    return run(_read_from_tail, target, parse, config, timeout_secs)


async def _read_from_tail(target: RemotePath, parse: Callable[[Any], Any], config: RemoteConfig,
                          timeout_secs: float) -> Any:
    deadline = time.monotonic() + timeout_secs
    async with _client(target, config, timeout_secs) as store:

        async def read(nbytes: int) -> tuple[int, bytes] | None:
            try:
                return await store.read_tail(target, nbytes, deadline)
            except ObjectReplacedError:  # between a GCS HEAD and its GET: read the new version
                return None

        parsed, _, _ = await _parse_tail(read, parse, target.url)
        return parsed


async def _parse_tail(read: Callable[[int], Awaitable[tuple[int, bytes] | None]], parse: Callable[[Any], Any],
                      url: str) -> tuple[Any, int, bytes]:
    """``(parse(tail), object size, tail bytes)``: the tail read reads the object's size and its last ``nbytes``
    (None: the object was replaced in between; read again), from further back while ``parse`` reads before it."""
    nbytes = TAIL_BYTES
    for _ in range(_TAIL_ROUNDS):
        got = await read(nbytes)
        if got is None:
            continue
        size, data = got
        try:
            return parse(_Tail(size, data)), size, data
        except _BeforeTail as e:
            if len(data) >= size:  # cannot happen for one version: the object changed between the reads
                raise CheckpointError(f"{url} changed while its end was read; read it again") from e
            nbytes = size - e.offset
    raise CheckpointError(f"{url}: its end kept changing over {_TAIL_ROUNDS} reads; read it again")


@dataclass
class RangesRead:
    """What ``read_ranges`` fetched of one version of an object: its size, ``plan``'s result, and the bytes
    fetched (tails included, of every attempt) in how many requests (HEADs and GETs)."""

    size: int
    planned: Any
    fetched_bytes: int = 0
    requests: int = 0


def read_ranges(target: RemotePath, plan: Callable[[Any], tuple[Any, list[tuple[int, int]] | None]], fd: int,
                config: RemoteConfig, timeout_secs: float) -> RangesRead:
    """Fetch some byte ranges of one version of ``target`` into the local file ``fd`` (at their own offsets, the
    file as long as the object; what is not fetched reads as zeros).

    ``plan(tail)`` gets the object's end as a seekable file (as ``read_from_tail``'s ``parse``; ``tail.start``:
    the offset its fetched bytes begin at) and returns
    ``(planned, ranges)``: ``ranges`` are ``(offset, length)`` pairs to fetch, None to fetch nothing (then the
    tail is not written either). Adjacent or nearby ranges are fetched as one, large ones in parts of
    ``config.part_size_bytes``, ``config.max_concurrency`` GETs at once, all of the version the HEAD named; an
    object replaced meanwhile is read again from its HEAD (the new version), ``_READ_ATTEMPTS`` times at most,
    as ``download`` does.

    Raises:
        FileNotFoundError: no such object. CheckpointError: the object kept changing, or the store refused.
    """
    return run(_read_ranges, target, plan, fd, config, timeout_secs)


async def _read_ranges(target: RemotePath, plan: Callable[[Any], Any], fd: int, config: RemoteConfig,
                       timeout_secs: float) -> RangesRead:
    deadline = time.monotonic() + timeout_secs
    async with _client(target, config, timeout_secs) as store:
        done = RangesRead(0, None)  # counts what every attempt fetched
        for attempt in range(1, _READ_ATTEMPTS + 1):
            size, version = await store.head(target, deadline)
            done.size = size
            done.requests += 1

            async def read(nbytes: int) -> tuple[int, bytes]:
                data = b"" if size == 0 else await store.get_range(target, version, max(0, size - nbytes),
                                                                   size - 1, deadline)
                done.fetched_bytes += len(data)
                done.requests += 1
                return size, data

            try:
                (done.planned, ranges), _, tail = await _parse_tail(read, plan, target.url)
                if ranges is None:
                    return done
                os.ftruncate(fd, 0)  # nothing of a version read before stays
                os.ftruncate(fd, size)
                os.pwrite(fd, tail, size - len(tail))
                limit = asyncio.Semaphore(config.max_concurrency)
                pieces = _pieces(_coalesce(ranges, size - len(tail)), config.part_size_bytes)
                if pieces:
                    await _gather_or_cancel([_get_range(store, target, version, fd, first, last, limit, deadline)
                                             for first, last in pieces])
                done.fetched_bytes += sum(last - first + 1 for first, last in pieces)
                done.requests += len(pieces)
                return done
            except ObjectReplacedError:
                if attempt == _READ_ATTEMPTS:
                    raise
                log.info("%s was replaced while its ranges were read; reading the new version", target.url)
    raise AssertionError("unreachable")


def _coalesce(ranges: list[tuple[int, int]], fetched_from: int) -> list[tuple[int, int]]:
    """``(offset, length)`` ranges as sorted ``[first, end)`` spans, those less than ``_MERGE_GAP_BYTES`` apart
    merged, less what lies at or after ``fetched_from`` (the tail, fetched already)."""
    merged: list[list[int]] = []
    for offset, length in sorted(ranges):
        end = min(offset + length, fetched_from)
        if end <= offset:
            continue
        if merged and offset <= merged[-1][1] + _MERGE_GAP_BYTES:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([offset, end])
    return [(first, end) for first, end in merged]


def _pieces(spans: list[tuple[int, int]], part_bytes: int) -> list[tuple[int, int]]:
    """``[first, end)`` spans as inclusive ``(first, last)`` GET ranges of at most ``part_bytes`` each."""
    return [(off, min(end, off + part_bytes) - 1) for first, end in spans for off in range(first, end, part_bytes)]


def list_checkpoints(directory: RemotePath) -> list[RemoteObject]:
    """The objects directly under ``directory`` (for resuming: default config, ``LOOKUP_TIMEOUT_SECS``)."""
    return list_dir(directory, RemoteConfig(), LOOKUP_TIMEOUT_SECS)


def is_complete(target: RemotePath, verify: bool = False) -> bool:
    """True iff ``target`` holds a checkpoint of ours: its checksum record reads (``verify``: every tensor too).

    A listed object is complete by construction (a multipart upload appears only when completed); the record
    check rules out foreign or damaged objects.

    Raises:
        CheckpointError: the store could not be read (refused, timed out, dropped after every retry): whether
            ``target`` is complete is unknown, and a resume must not silently pick an older checkpoint.
    """
    from lightning_ckpt.integrity import check_checkpoint  # from the bytes: never unpickles the download

    config = RemoteConfig()
    try:
        if read_checksum_record(target, config, LOOKUP_TIMEOUT_SECS) is None:
            return False
        if verify:
            local = download(target, paths.download_path(target.url, target.name), config, LOOKUP_TIMEOUT_SECS)
            try:
                result = check_checkpoint(local)
            finally:
                remove_path(local)
            if not result.ok:
                log.warning("skipping %s: %s (%s)", target.url, result.status, result.detail)
                return False
    except FileNotFoundError:
        return False
    except NOT_A_CHECKPOINT as e:
        log.warning("skipping %s: not a complete checkpoint (%s)", target.url, e)
        return False
    return True


def copy(source: RemotePath, dest: RemotePath, config: RemoteConfig, timeout_secs: float) -> None:
    """Server-side copy of ``source`` to ``dest`` (no bytes pass through this machine); atomic at ``dest``.

    Raises:
        FileNotFoundError: ``source`` is missing. CheckpointError: the store refused.
    """
    if (source.protocol, source.bucket, source.storage_options.get("endpoint_url")) != (
            dest.protocol, dest.bucket, dest.storage_options.get("endpoint_url")):
        raise ValueError(f"server-side copy needs one store and bucket: {source.url} -> {dest.url}")
    try:
        run(_copy, source, dest, config, timeout_secs)
    finally:
        forget_listings(dest)


async def _copy(source: RemotePath, dest: RemotePath, config: RemoteConfig, timeout_secs: float) -> None:
    async with _client(dest, config, timeout_secs) as store:
        await store.copy(source, dest, time.monotonic() + timeout_secs)


def delete(target: RemotePath, config: RemoteConfig, timeout_secs: float) -> None:
    """Delete ``target`` (missing is fine).

    Raises:
        OSError: the store refused (removals are best effort, like local ones).
    """
    try:
        run(_delete, target, config, timeout_secs)
    except CheckpointError as e:
        raise OSError(f"could not delete {target.url}: {e}") from e
    finally:
        forget_listings(target)


async def _delete(target: RemotePath, config: RemoteConfig, timeout_secs: float) -> None:
    async with _client(target, config, timeout_secs) as store:
        try:
            await store.delete(target, time.monotonic() + timeout_secs)
        except FileNotFoundError:
            pass


def list_dir(directory: RemotePath, config: RemoteConfig, timeout_secs: float) -> list[RemoteObject]:
    """The objects directly under ``directory`` (taken as a prefix ending in ``/``)."""
    return run(_list_dir, directory, config, timeout_secs)


async def _list_dir(directory: RemotePath, config: RemoteConfig, timeout_secs: float) -> list[RemoteObject]:
    async with _client(directory, config, timeout_secs) as store:
        return await store.list_objects(directory, time.monotonic() + timeout_secs)


def put_bytes(target: RemotePath, data: bytes, config: RemoteConfig, timeout_secs: float,
              no_overwrite: bool = False) -> None:
    """Store a small object (a manifest) in one request: it appears whole or not at all.

    Raises:
        FileExistsError: ``no_overwrite`` and an object is there. CheckpointError: the store refused.
    """
    try:
        run(_put, target, data, config, timeout_secs, no_overwrite)
    finally:
        forget_listings(target)


async def _put(target: RemotePath, data: bytes, config: RemoteConfig, timeout_secs: float,
               no_overwrite: bool) -> None:
    async with _client(target, config, timeout_secs) as store:
        await store.put(target, data, no_overwrite, time.monotonic() + timeout_secs)
