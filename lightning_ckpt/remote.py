"""Remote checkpoint objects on S3-compatible stores: a multipart upload is the commit; ranged download, copy, delete.

Every call goes through aiobotocore (``pip install 'lightning_ckpt[s3]'``), imported only in the process that makes
the call, on a private event loop that is closed afterwards (no background threads remain). Endpoint and
credentials come from ``storage_options`` (s3fs's names: ``endpoint_url``, ``key``, ``secret``, ``token``,
``client_kwargs``, ``config_kwargs``) or else from botocore's standard places (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``~/.aws``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from lightning_ckpt.errors import CheckpointTimeoutError, CheckpointWriteError
from lightning_ckpt.paths import RemotePath

log = logging.getLogger(__name__)

MIN_PART_BYTES = 5 << 20  # S3's minimum for every part but the last
MAX_PART_BYTES = 5 << 30
MAX_PARTS = 10_000
MAX_COPY_OBJECT_BYTES = 5 << 30  # larger objects are copied part by part
_ABORT_TIMEOUT_SECS = 30.0
_LIST_PAGES = 100  # at most 100k objects or uploads listed under one prefix

_swept_prefixes: set[tuple] = set()
_sessions: dict[str | None, Any] = {}  # prefixes whose stale uploads this process already aborted


@dataclass
class RemoteConfig:
    """How remote checkpoints are uploaded and downloaded.

    Args:
        part_size_bytes: multipart part size (>= 5 MiB, S3's minimum; raised for files over 10,000 parts).
        max_concurrency: parts uploaded or ranges downloaded at once (each holds one part in memory).
        max_attempts: attempts per request (botocore's standard retry mode: 5xx, throttling, dropped connections).
        connect_timeout_secs: None: derived from ``process_config.write_timeout_secs`` (at most 10 s).
        read_timeout_secs: None: derived from ``process_config.write_timeout_secs`` (at most 60 s).
        no_overwrite_pattern: a regex; file names it matches (step-named ones) are completed with
            ``If-None-Match: *``, so two runs never clobber each other's checkpoint ("" disables it).
        stream_from_staging: upload parts straight from the staged bytes, with no commit to the local cache
            first (for nodes without scratch disk). The staging buffer is then held until the upload completes,
            not only until the local commit: the next save may wait longer for it, and memory stays taken longer.
    """

    part_size_bytes: int = 32 << 20
    max_concurrency: int = 4
    max_attempts: int = 5
    connect_timeout_secs: float | None = None
    read_timeout_secs: float | None = None
    no_overwrite_pattern: str = r"step=\d+"
    stream_from_staging: bool = False

    def __post_init__(self) -> None:
        if not MIN_PART_BYTES <= self.part_size_bytes <= MAX_PART_BYTES:
            raise ValueError(f"RemoteConfig.part_size_bytes must be in [5 MiB, 5 GiB], got {self.part_size_bytes}")
        for name in ("max_concurrency", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"RemoteConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("connect_timeout_secs", "read_timeout_secs"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"RemoteConfig.{name} must be > 0 or None, got {value}")
        re.compile(self.no_overwrite_pattern)

    def no_overwrite(self, name: str) -> bool:
        return bool(self.no_overwrite_pattern) and re.search(self.no_overwrite_pattern, name) is not None


@dataclass
class RemoteUpload:
    """Runs in the writer process once the checkpoint is committed locally: upload it to ``target``, then free the
    local copy. The object appears only when CompleteMultipartUpload succeeds; every failure aborts the upload.

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

    def __call__(self, local_path: str) -> dict:
        start = time.monotonic()
        run(self._upload, local_path)
        os.remove(local_path)  # the store holds it now; the cache keeps no second copy
        return {"path": self.target.url, "upload_secs": time.monotonic() - start}

    async def _upload(self, local_path: str) -> None:
        deadline = time.monotonic() + self.timeout_secs
        async with _client(self.target, self.config, self.timeout_secs) as client:
            if self.sweep_stale:
                await _abort_stale_uploads(client, self.target, self.timeout_secs)
            await upload_file(client, local_path, self.target, self.config, deadline)


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


def _client(target: RemotePath, config: RemoteConfig, timeout_secs: float) -> Any:
    """An aiobotocore S3 client context for ``target``'s storage options (s3fs's option names)."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    opts = dict(target.storage_options)
    client_kwargs = dict(opts.pop("client_kwargs", None) or {})
    config_kwargs = dict(opts.pop("config_kwargs", None) or {})
    for ours, theirs in (("endpoint_url", "endpoint_url"), ("key", "aws_access_key_id"),
                         ("secret", "aws_secret_access_key"), ("token", "aws_session_token")):
        value = opts.pop(ours, None)
        if value is not None:
            client_kwargs.setdefault(theirs, value)
    settings: dict[str, Any] = {
        "connect_timeout": config.connect_timeout_secs or min(10.0, max(1.0, timeout_secs / 10)),
        "read_timeout": config.read_timeout_secs or min(60.0, max(1.0, timeout_secs / 4)),
        "retries": {"max_attempts": config.max_attempts, "mode": "standard"},
        "max_pool_connections": max(10, config.max_concurrency),
    }
    if opts.pop("anon", False):
        from botocore import UNSIGNED

        settings["signature_version"] = UNSIGNED
    settings.update(config_kwargs)
    profile = opts.pop("profile", None)
    session = _sessions.get(profile)
    if session is None:  # one per profile and process: it caches the service model (0.5 s to load)
        session = _sessions[profile] = get_session()
        if profile:
            session.set_config_variable("profile", profile)
    if opts:
        log.debug("storage_options not used by lightning_ckpt's S3 client: %s", sorted(opts))
    return session.create_client("s3", config=AioConfig(**settings), **client_kwargs)


async def _call(what: str, target: RemotePath, awaitable: Awaitable[Any], deadline: float) -> Any:
    """Await one S3 request before ``deadline``; errors name the operation and the object."""
    from botocore.exceptions import BotoCoreError, ClientError

    remaining = deadline - time.monotonic()
    if remaining <= 0:
        if asyncio.iscoroutine(awaitable):
            awaitable.close()  # never started
        raise CheckpointTimeoutError(f"{what} of {target.url} did not start before its deadline")
    try:
        return await asyncio.wait_for(awaitable, remaining)
    except asyncio.TimeoutError as e:
        raise CheckpointTimeoutError(
            f"{what} of {target.url} did not finish before its deadline ({remaining:.1f} s left)") from e
    except ClientError as e:
        error = e.response.get("Error", {})
        code, message = error.get("Code", "?"), error.get("Message", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404") and what in ("HeadObject", "GetObject"):
            raise FileNotFoundError(f"Checkpoint file not found: {target.url}") from e
        if code == "PreconditionFailed" and what == "CompleteMultipartUpload":
            raise FileExistsError(
                f"{target.url} already exists (another run wrote it?); step-named checkpoints are never "
                "overwritten (RemoteConfig.no_overwrite_pattern)"
            ) from e
        raise CheckpointWriteError(f"{what} of {target.url} failed: {code} (HTTP {status}) {message}") from e
    except BotoCoreError as e:
        raise CheckpointWriteError(f"{what} of {target.url} failed: {type(e).__name__}: {e}") from e


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


async def upload_file(client: Any, local_path: str, target: RemotePath, config: RemoteConfig,
                      deadline: float) -> None:
    """Multipart-upload ``local_path`` to ``target``; only CompleteMultipartUpload makes the object visible.

    Raises:
        FileExistsError: a step-named object exists already (``If-None-Match``).
        CheckpointWriteError, CheckpointTimeoutError: the store refused, or the deadline passed; the upload is
            aborted (nothing is published, no parts stay billed).
    """
    size = os.path.getsize(local_path)
    part_size = max(config.part_size_bytes, -(-size // MAX_PARTS))
    bucket, key = target.bucket, target.key
    created = await _call("CreateMultipartUpload", target,
                          client.create_multipart_upload(Bucket=bucket, Key=key), deadline)
    upload_id = created["UploadId"]
    completed = False
    try:
        limit = asyncio.Semaphore(config.max_concurrency)
        fd = os.open(local_path, os.O_RDONLY)
        try:
            offsets = range(0, max(size, 1), part_size)
            parts = await _gather_or_cancel([
                _upload_part(client, target, upload_id, fd, n + 1, off, min(part_size, size - off), limit, deadline)
                for n, off in enumerate(offsets)
            ])
        finally:
            os.close(fd)
        extra = {"IfNoneMatch": "*"} if config.no_overwrite(target.name) else {}
        await _call("CompleteMultipartUpload", target, client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}, **extra), deadline)
        completed = True
    finally:
        if not completed:
            await _abort(client, target, upload_id)


async def _upload_part(client: Any, target: RemotePath, upload_id: str, fd: int, number: int, offset: int,
                       nbytes: int, limit: asyncio.Semaphore, deadline: float) -> dict:
    async with limit:
        body = await asyncio.to_thread(os.pread, fd, nbytes, offset)
        if len(body) != nbytes:
            raise CheckpointWriteError(f"{target.url}: the local file changed during the upload (part {number})")
        response = await _call(f"UploadPart {number}", target, client.upload_part(
            Bucket=target.bucket, Key=target.key, UploadId=upload_id, PartNumber=number, Body=body), deadline)
        return {"PartNumber": number, "ETag": response["ETag"]}


async def _abort(client: Any, target: RemotePath, upload_id: str) -> None:
    """Abort an upload of ours (bounded; a failure is logged: the next writer or a lifecycle rule cleans up)."""
    try:
        await _call("AbortMultipartUpload", target, client.abort_multipart_upload(
            Bucket=target.bucket, Key=target.key, UploadId=upload_id), time.monotonic() + _ABORT_TIMEOUT_SECS)
        log.info("aborted the upload of %s", target.url)
    except BaseException as e:  # noqa: BLE001 - the upload's own error is what propagates
        log.warning("could not abort the upload %s of %s: %s", upload_id, target.url, e)


async def _abort_stale_uploads(client: Any, target: RemotePath, older_than_secs: float) -> None:
    """Abort uploads left in ``target``'s prefix by killed writers: older than the write timeout (a live writer
    of ours is killed by then), direct children of the prefix only, once per prefix and process."""
    prefix = target.key.rsplit("/", 1)[0] + "/" if "/" in target.key else ""
    marker = (target.storage_options.get("endpoint_url"), target.bucket, prefix)
    if marker in _swept_prefixes:
        return
    deadline = time.monotonic() + _ABORT_TIMEOUT_SECS
    now = time.time()
    kwargs: dict[str, Any] = {"Bucket": target.bucket, "Prefix": prefix}
    for _ in range(_LIST_PAGES):
        page = await _call("ListMultipartUploads", target, client.list_multipart_uploads(**kwargs), deadline)
        for upload in page.get("Uploads", []):
            key = upload["Key"]
            age = now - upload["Initiated"].timestamp()
            if "/" in key[len(prefix):] or age <= older_than_secs:
                continue
            log.warning("aborting a dangling upload of %s (%.0f s old; its writer was killed)", key, age)
            await _abort(client, target.sibling(key[len(prefix):]), upload["UploadId"])
        if not page.get("IsTruncated"):
            break
        kwargs.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))
    _swept_prefixes.add(marker)


# ---------------------------------------------------------------------- small objects, trees, leftovers of dead ranks


def put_object(target: RemotePath, data: bytes, config: RemoteConfig, timeout_secs: float) -> None:
    """Write a small object in one PUT (atomic: the object appears whole or not at all), e.g. a manifest.

    Raises:
        CheckpointWriteError, CheckpointTimeoutError: the store refused, or the deadline passed.
    """
    async def put() -> None:
        async with _client(target, config, timeout_secs) as client:
            await _call("PutObject", target, client.put_object(Bucket=target.bucket, Key=target.key, Body=data),
                        time.monotonic() + timeout_secs)

    run(put)


def list_tree(directory: RemotePath, config: RemoteConfig, timeout_secs: float) -> list[tuple[str, int, float]]:
    """Every object under ``directory`` (a prefix, at any depth): ``(key below the prefix, size, mtime)``."""
    async def listing() -> list[tuple[str, int, float]]:
        deadline = time.monotonic() + timeout_secs
        prefix = directory.key.rstrip("/") + "/"
        found: list[tuple[str, int, float]] = []
        kwargs: dict[str, Any] = {"Bucket": directory.bucket, "Prefix": prefix}
        async with _client(directory, config, timeout_secs) as client:
            for _ in range(_LIST_PAGES):
                page = await _call("ListObjectsV2", directory, client.list_objects_v2(**kwargs), deadline)
                found += [(o["Key"][len(prefix):], int(o["Size"]), o["LastModified"].timestamp())
                          for o in page.get("Contents", [])]
                if not page.get("IsTruncated"):
                    return found
                kwargs["ContinuationToken"] = page["NextContinuationToken"]
        log.warning("listed only the first %d objects under %s", len(found), directory.url)
        return found

    return run(listing)


def abort_stale_uploads_below(directory: RemotePath, config: RemoteConfig, older_than_secs: float,
                              match: Callable[[str], bool]) -> list[str]:
    """Abort the uploads under ``directory`` (any depth) whose key below it ``match`` accepts and that are older
    than ``older_than_secs`` (their writers are dead by then); returns their keys. For a multi-rank checkpoint's
    generations, whose killed ranks leave uploads in prefixes that no later save writes to again."""
    async def sweep() -> list[str]:
        prefix = directory.key.rstrip("/") + "/"
        deadline, now, aborted = time.monotonic() + _ABORT_TIMEOUT_SECS, time.time(), []
        kwargs: dict[str, Any] = {"Bucket": directory.bucket, "Prefix": prefix}
        async with _client(directory, config, _ABORT_TIMEOUT_SECS) as client:
            for _ in range(_LIST_PAGES):
                page = await _call("ListMultipartUploads", directory, client.list_multipart_uploads(**kwargs),
                                   deadline)
                for upload in page.get("Uploads", []):
                    below = upload["Key"][len(prefix):]
                    if match(below) and now - upload["Initiated"].timestamp() > older_than_secs:
                        log.warning("aborting a dangling upload of %s (its writer was killed)", upload["Key"])
                        await _abort(client, directory.child(below), upload["UploadId"])
                        aborted.append(below)
                if not page.get("IsTruncated"):
                    return aborted
                kwargs.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))
        return aborted

    return run(sweep)
