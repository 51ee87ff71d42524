"""Operations on committed remote checkpoints: ranged parallel download, server-side copy, delete, list."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from lightning_ckpt import layout
from lightning_ckpt.commit import Commit
from lightning_ckpt.errors import CheckpointError
from lightning_ckpt.paths import RemotePath
from lightning_ckpt.remote import (
    MAX_COPY_OBJECT_BYTES, MAX_PARTS, RemoteConfig, _abort, _call, _client, _gather_or_cancel, run,
)

log = logging.getLogger(__name__)

_LIST_PAGES = 100  # at most 100k objects listed under one prefix
_COPY_PART_BYTES = 512 << 20
LOOKUP_TIMEOUT_SECS = 300.0  # listing and checking checkpoints to resume from
TAIL_BYTES = 1 << 20  # holds the checksum record and the zip's central directory of up to ~10k tensors


@dataclass
class RemoteObject:
    """One listed object: its path, size and modification time (unix seconds)."""

    path: RemotePath
    nbytes: int
    modified: float


def forget_listings(target: RemotePath) -> None:
    """Drop what fsspec's S3 filesystems in this process cached about ``target``'s prefix: they cache listings
    (Lightning's ``ckpt_path="last"`` and ModelCheckpoint use them), and we changed the store behind their back."""
    s3fs = sys.modules.get("s3fs")  # never imported here: if nobody uses it, nothing is cached
    if s3fs is None:
        return
    for fs in list(getattr(s3fs.S3FileSystem, "_cache", {}).values()):
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
    deadline = time.monotonic() + timeout_secs
    async with _client(target, config, timeout_secs) as client:
        head = await _call("HeadObject", target, client.head_object(Bucket=target.bucket, Key=target.key), deadline)
        size, etag = int(head["ContentLength"]), head["ETag"]
        limit = asyncio.Semaphore(config.max_concurrency)
        os.ftruncate(fd, size)
        step = config.part_size_bytes
        await _gather_or_cancel([_get_range(client, target, etag, fd, off, min(size, off + step) - 1, limit,
                                            deadline) for off in range(0, size, step)])


async def _get_range(client: Any, target: RemotePath, etag: str, fd: int, first: int, last: int,
                     limit: asyncio.Semaphore, deadline: float) -> None:
    async with limit:
        try:
            response = await _call("GetObject", target, client.get_object(
                Bucket=target.bucket, Key=target.key, Range=f"bytes={first}-{last}", IfMatch=etag), deadline)
        except CheckpointError as e:
            if "PreconditionFailed" in str(e):
                raise CheckpointError(f"{target.url} was replaced during its download; load it again") from e
            raise
        async with response["Body"] as stream:
            data = await _call("GetObject body", target, stream.read(), deadline)
        if len(data) != last - first + 1:
            raise CheckpointError(f"{target.url}: bytes {first}-{last} came back short ({len(data)} bytes)")
        await asyncio.to_thread(os.pwrite, fd, data, first)


class _BeforeTail(OSError):
    """A read reached before the fetched tail of an object."""


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
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        if self.pos < self.start:
            raise _BeforeTail(f"offset {self.pos} lies before the last {len(self.data)} bytes that were fetched")
        chunk = self.data[self.pos - self.start:self.pos - self.start + len(buffer)]
        buffer[:len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def read_checksum_record(target: RemotePath, config: RemoteConfig, timeout_secs: float) -> dict | None:
    """The checksum record of a remote checkpoint, from one ranged GET of its tail (the record is written last).

    Raises:
        ValueError: not a readable torch zip. OSError: the record lies before the fetched tail.
    """
    from lightning_ckpt.checkpoint_file import read_checksum_record as read_record_of

    size, data = read_tail(target, TAIL_BYTES, config, timeout_secs)
    return read_record_of(_Tail(size, data))


def list_checkpoints(directory: RemotePath) -> list[RemoteObject]:
    """The objects directly under ``directory`` (for resuming: default config, ``LOOKUP_TIMEOUT_SECS``)."""
    return list_dir(directory, RemoteConfig(), LOOKUP_TIMEOUT_SECS)


def is_complete(target: RemotePath, verify: bool = False) -> bool:
    """True iff ``target`` holds a checkpoint of ours: its checksum record reads (``verify``: every tensor too).

    A listed object is complete by construction (a multipart upload appears only when completed); the record
    check rules out foreign or damaged objects.
    """
    from lightning_ckpt.integrity import check_checkpoint  # from the bytes: never unpickles the download

    config = RemoteConfig()
    try:
        if read_checksum_record(target, config, LOOKUP_TIMEOUT_SECS) is None:
            return False
        if verify:
            local = download(target, target.cache_path("download"), config, LOOKUP_TIMEOUT_SECS)
            try:
                result = check_checkpoint(local)
            finally:
                layout.remove_tree(local)
            if not result.ok:
                log.warning("skipping %s: %s (%s)", target.url, result.status, result.detail)
                return False
    except _BeforeTail:
        log.info("%s: checksum record beyond the fetched tail; listed objects are complete", target.url)
    except FileNotFoundError:
        return False
    except (RuntimeError, OSError, ValueError, CheckpointError) as e:
        log.warning("skipping %s: not a complete checkpoint (%s)", target.url, e)
        return False
    return True


def read_tail(target: RemotePath, nbytes: int, config: RemoteConfig, timeout_secs: float) -> tuple[int, bytes]:
    """The object's size and its last ``nbytes`` bytes (one ranged GET)."""
    return run(_read_tail, target, nbytes, config, timeout_secs)


async def _read_tail(target: RemotePath, nbytes: int, config: RemoteConfig, timeout_secs: float) -> tuple[int, bytes]:
    deadline = time.monotonic() + timeout_secs
    async with _client(target, config, timeout_secs) as client:
        response = await _call("GetObject", target, client.get_object(
            Bucket=target.bucket, Key=target.key, Range=f"bytes=-{nbytes}"), deadline)
        size = int(response.get("ContentRange", "/0").rsplit("/", 1)[-1] or response["ContentLength"])
        async with response["Body"] as stream:
            return size, await _call("GetObject body", target, stream.read(), deadline)


def copy(source: RemotePath, dest: RemotePath, config: RemoteConfig, timeout_secs: float) -> None:
    """Server-side copy of ``source`` to ``dest`` (no bytes pass through this machine); atomic at ``dest``.

    Raises:
        FileNotFoundError: ``source`` is missing. CheckpointError: the store refused.
    """
    if (source.bucket, source.storage_options.get("endpoint_url")) != (dest.bucket,
                                                                       dest.storage_options.get("endpoint_url")):
        raise ValueError(f"server-side copy needs one store and bucket: {source.url} -> {dest.url}")
    try:
        run(_copy, source, dest, config, timeout_secs)
    finally:
        forget_listings(dest)


async def _copy(source: RemotePath, dest: RemotePath, config: RemoteConfig, timeout_secs: float) -> None:
    deadline = time.monotonic() + timeout_secs
    copy_source = {"Bucket": source.bucket, "Key": source.key}
    async with _client(dest, config, timeout_secs) as client:
        head = await _call("HeadObject", source, client.head_object(Bucket=source.bucket, Key=source.key), deadline)
        size = int(head["ContentLength"])
        if size <= MAX_COPY_OBJECT_BYTES:
            await _call("CopyObject", dest, client.copy_object(Bucket=dest.bucket, Key=dest.key,
                                                               CopySource=copy_source), deadline)
            return
        await _copy_parts(client, copy_source, dest, size, deadline)


async def _copy_parts(client: Any, copy_source: dict, dest: RemotePath, size: int, deadline: float) -> None:
    """A copy of an object over 5 GiB: UploadPartCopy ranges, completed (the commit) or aborted."""
    step = max(_COPY_PART_BYTES, -(-size // MAX_PARTS))
    created = await _call("CreateMultipartUpload", dest, client.create_multipart_upload(
        Bucket=dest.bucket, Key=dest.key), deadline)
    upload_id = created["UploadId"]
    completed = False
    try:
        async def part(number: int, first: int) -> dict:
            last = min(size, first + step) - 1
            response = await _call(f"UploadPartCopy {number}", dest, client.upload_part_copy(
                Bucket=dest.bucket, Key=dest.key, UploadId=upload_id, PartNumber=number, CopySource=copy_source,
                CopySourceRange=f"bytes={first}-{last}"), deadline)
            return {"PartNumber": number, "ETag": response["CopyPartResult"]["ETag"]}

        parts = await _gather_or_cancel([part(n + 1, off) for n, off in enumerate(range(0, size, step))])
        await _call("CompleteMultipartUpload", dest, client.complete_multipart_upload(
            Bucket=dest.bucket, Key=dest.key, UploadId=upload_id, MultipartUpload={"Parts": parts}), deadline)
        completed = True
    finally:
        if not completed:
            await _abort(client, dest, upload_id)


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
    async with _client(target, config, timeout_secs) as client:
        await _call("DeleteObject", target, client.delete_object(Bucket=target.bucket, Key=target.key),
                    time.monotonic() + timeout_secs)


def list_dir(directory: RemotePath, config: RemoteConfig, timeout_secs: float) -> list[RemoteObject]:
    """The objects directly under ``directory`` (taken as a prefix ending in ``/``)."""
    return run(_list_dir, directory, config, timeout_secs)


async def _list_dir(directory: RemotePath, config: RemoteConfig, timeout_secs: float) -> list[RemoteObject]:
    deadline = time.monotonic() + timeout_secs
    prefix = directory.key.rstrip("/") + "/"
    found: list[RemoteObject] = []
    kwargs: dict[str, Any] = {"Bucket": directory.bucket, "Prefix": prefix, "Delimiter": "/"}
    async with _client(directory, config, timeout_secs) as client:
        for _ in range(_LIST_PAGES):
            page = await _call("ListObjectsV2", directory, client.list_objects_v2(**kwargs), deadline)
            for item in page.get("Contents", []):
                found.append(RemoteObject(directory.child(item["Key"][len(prefix):]), int(item["Size"]),
                                          item["LastModified"].timestamp()))
            if not page.get("IsTruncated"):
                return found
            kwargs["ContinuationToken"] = page["NextContinuationToken"]
    log.warning("listed only the first %d objects of %s", len(found), directory.url)
    return found
