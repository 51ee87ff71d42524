"""The S3 store (any S3-compatible server) for ``lightning_ckpt.remote``: requests through aiobotocore.

``pip install 'lightning_ckpt[s3]'``; imported only in the process that makes a call. Endpoint and credentials come
from ``storage_options`` (s3fs's names: ``endpoint_url``, ``key``, ``secret``, ``token``, ``profile``, ``anon``,
``client_kwargs``, ``config_kwargs``) or else from botocore's standard places (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``~/.aws``). Retries: botocore's standard mode (5xx, throttling, dropped connections), and
``remote._send`` around it for a body whose sending stalls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from lightning_ckpt.errors import CheckpointWriteError
from lightning_ckpt.paths import RemotePath
from lightning_ckpt.remote import (
    _ABORT_TIMEOUT_SECS, _LIST_PAGES, MAX_COPY_OBJECT_BYTES, MAX_PARTS, ObjectReplacedError, Part, RemoteConfig,
    RemoteObject, _call, _gather_or_cancel, _send,
)

log = logging.getLogger(__name__)

_COPY_PART_BYTES = 512 << 20
_BODY_BACKOFF_MAX_SECS = 2.0
_sessions: dict[str | None, Any] = {}  # one botocore session per profile and process


@dataclass
class S3Upload:
    """A multipart upload in progress."""

    target: RemotePath
    upload_id: str
    no_overwrite: bool = False  # completed with If-None-Match: *


@contextlib.asynccontextmanager
async def open_store(target: RemotePath, config: RemoteConfig, timeout_secs: float) -> AsyncIterator["S3Store"]:
    """A session on ``target``'s S3 endpoint (closed on exit)."""
    async with _client(target, config, timeout_secs) as client:
        yield S3Store(client, config, timeout_secs)


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
    connect, read = config.timeouts(timeout_secs)
    settings: dict[str, Any] = {
        "connect_timeout": connect,
        "read_timeout": read,
        "retries": {"max_attempts": config.max_attempts, "mode": "standard"},
        "max_pool_connections": max(10, config.max_concurrency),
    }
    if opts.pop("anon", False):
        from botocore import UNSIGNED

        settings["signature_version"] = UNSIGNED
    settings.update(config_kwargs)
    profile = opts.pop("profile", None)
    session = _sessions.get(profile)
    if session is None:  # it caches the service model (0.5 s to load)
        session = _sessions[profile] = get_session()
        if profile:
            session.set_config_variable("profile", profile)
    if opts:
        log.debug("storage_options not used by lightning_ckpt's S3 client: %s", sorted(opts))
    return session.create_client("s3", config=AioConfig(**settings), **client_kwargs)


def translate_error(what: str, target: RemotePath, e: BaseException) -> BaseException | None:
    """Our error for a botocore one (None: raise ``e`` as it is)."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(e, ClientError):
        error = e.response.get("Error", {})
        code, message = error.get("Code", "?"), error.get("Message", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404") and what in ("HeadObject", "GetObject"):
            return FileNotFoundError(f"Checkpoint file not found: {target.url}")
        if code == "PreconditionFailed" and what in ("CompleteMultipartUpload", "PutObject"):
            return FileExistsError(
                f"{target.url} already exists (another run wrote it?); step-named checkpoints are never "
                "overwritten (RemoteConfig.no_overwrite_pattern)")
        if code == "PreconditionFailed" and what == "GetObject":
            return ObjectReplacedError(f"{target.url} was replaced during its download; load it again")
        return CheckpointWriteError(f"{what} of {target.url} failed: {code} (HTTP {status}) {message}")
    if isinstance(e, BotoCoreError):
        return CheckpointWriteError(f"{what} of {target.url} failed: {type(e).__name__}: {e}")
    return None


class S3Store:
    """``remote.Store`` over one aiobotocore client (``client``: for calls this interface does not cover); requests
    that send a body are bounded by ``config.attempt_secs`` under a call's ``timeout_secs``."""

    part_align = 1
    parallel_parts = True

    def __init__(self, client: Any, config: RemoteConfig, timeout_secs: float) -> None:
        self.client = client
        self.config = config
        self.timeout_secs = timeout_secs

    async def begin_upload(self, target: RemotePath, parts: list[Part], no_overwrite: bool,
                           deadline: float) -> S3Upload:
        created = await _call("CreateMultipartUpload", target, self.client.create_multipart_upload(
            Bucket=target.bucket, Key=target.key), deadline)
        return S3Upload(target, created["UploadId"], no_overwrite)

    async def upload_part(self, upload: S3Upload, part: Part, body: bytes, deadline: float) -> dict:
        target = upload.target
        response = await _send(f"UploadPart {part.number}", target, lambda: self.client.upload_part(
            Bucket=target.bucket, Key=target.key, UploadId=upload.upload_id, PartNumber=part.number, Body=body),
            len(body), self.config, self.timeout_secs, deadline)
        return {"PartNumber": part.number, "ETag": response["ETag"]}

    async def complete_upload(self, upload: S3Upload, sent: list[dict], deadline: float) -> None:
        target = upload.target
        extra = {"IfNoneMatch": "*"} if upload.no_overwrite else {}
        await _call("CompleteMultipartUpload", target, self.client.complete_multipart_upload(
            Bucket=target.bucket, Key=target.key, UploadId=upload.upload_id, MultipartUpload={"Parts": sent},
            **extra), deadline)

    async def abort_upload(self, upload: S3Upload) -> None:
        target = upload.target
        try:
            await _call("AbortMultipartUpload", target, self.client.abort_multipart_upload(
                Bucket=target.bucket, Key=target.key, UploadId=upload.upload_id),
                time.monotonic() + _ABORT_TIMEOUT_SECS)
            log.info("aborted the upload of %s", target.url)
        except BaseException as e:  # noqa: BLE001 - the upload's own error is what propagates
            log.warning("could not abort the upload %s of %s: %s", upload.upload_id, target.url, e)

    async def list_uploads(self, prefix: RemotePath, deadline: float) -> list[tuple[S3Upload, float]]:
        found: list[tuple[S3Upload, float]] = []
        kwargs: dict[str, Any] = {"Bucket": prefix.bucket, "Prefix": prefix.key}
        for _ in range(_LIST_PAGES):
            page = await _call("ListMultipartUploads", prefix, self.client.list_multipart_uploads(**kwargs), deadline)
            for item in page.get("Uploads", []):
                target = RemotePath(prefix.protocol, prefix.bucket, item["Key"], prefix.storage_options)
                found.append((S3Upload(target, item["UploadId"]), item["Initiated"].timestamp()))
            if not page.get("IsTruncated"):
                break
            kwargs.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))
        return found

    async def put(self, target: RemotePath, data: bytes, no_overwrite: bool, deadline: float) -> None:
        extra = {"IfNoneMatch": "*"} if no_overwrite else {}
        await _send("PutObject", target, lambda: self.client.put_object(
            Bucket=target.bucket, Key=target.key, Body=data, **extra), len(data), self.config, self.timeout_secs,
            deadline)

    async def head(self, target: RemotePath, deadline: float) -> tuple[int, str]:
        head = await _call("HeadObject", target, self.client.head_object(Bucket=target.bucket, Key=target.key),
                           deadline)
        return int(head["ContentLength"]), head["ETag"]

    async def get_range(self, target: RemotePath, version: str, first: int, last: int, deadline: float) -> bytes:
        _, body = await _call("GetObject", target, self._get_object(
            target, Range=f"bytes={first}-{last}", IfMatch=version), deadline)
        return body

    async def read_tail(self, target: RemotePath, nbytes: int, deadline: float) -> tuple[int, bytes]:
        response, body = await _call("GetObject", target, self._get_object(target, Range=f"bytes=-{nbytes}"),
                                     deadline)
        return int(response.get("ContentRange", "/0").rsplit("/", 1)[-1] or response["ContentLength"]), body

    async def _get_object(self, target: RemotePath, **kwargs: Any) -> tuple[dict, bytes]:
        """A GetObject and its whole body, the pair repeated when the body stalls past the read timeout or the
        connection drops mid-body (``config.max_attempts`` in all; botocore's own retries end with the headers,
        before the body is read). The caller's ``_call`` bounds it all by the deadline."""
        for attempt in range(1, self.config.max_attempts + 1):
            response = await self.client.get_object(Bucket=target.bucket, Key=target.key, **kwargs)
            try:
                async with response["Body"] as stream:
                    return response, await stream.read()
            except Exception as e:  # noqa: BLE001 - any failure mid-body: a timeout, a reset, a short read
                if attempt == self.config.max_attempts:
                    raise
                log.warning("the body of GetObject %s failed (%s: %s); retrying (attempt %d of %d)", target.url,
                            type(e).__name__, e, attempt + 1, self.config.max_attempts)
                await asyncio.sleep(min(_BODY_BACKOFF_MAX_SECS, 0.1 * 2 ** attempt))
        raise AssertionError("unreachable")

    async def copy(self, source: RemotePath, dest: RemotePath, deadline: float) -> None:
        size, _ = await self.head(source, deadline)
        copy_source = {"Bucket": source.bucket, "Key": source.key}
        if size <= MAX_COPY_OBJECT_BYTES:
            await _call("CopyObject", dest, self.client.copy_object(Bucket=dest.bucket, Key=dest.key,
                                                                    CopySource=copy_source), deadline)
            return
        await self._copy_parts(copy_source, dest, size, deadline)

    async def _copy_parts(self, copy_source: dict, dest: RemotePath, size: int, deadline: float) -> None:
        """A copy of an object over 5 GiB: UploadPartCopy ranges, completed (the commit) or aborted."""
        step = max(_COPY_PART_BYTES, -(-size // MAX_PARTS))
        upload = await self.begin_upload(dest, [], False, deadline)
        completed = False
        try:
            async def part(number: int, first: int) -> dict:
                last = min(size, first + step) - 1
                response = await _call(f"UploadPartCopy {number}", dest, self.client.upload_part_copy(
                    Bucket=dest.bucket, Key=dest.key, UploadId=upload.upload_id, PartNumber=number,
                    CopySource=copy_source, CopySourceRange=f"bytes={first}-{last}"), deadline)
                return {"PartNumber": number, "ETag": response["CopyPartResult"]["ETag"]}

            parts = await _gather_or_cancel([part(n + 1, off) for n, off in enumerate(range(0, size, step))])
            await self.complete_upload(upload, parts, deadline)
            completed = True
        finally:
            if not completed:
                await self.abort_upload(upload)

    async def delete(self, target: RemotePath, deadline: float) -> None:
        await _call("DeleteObject", target, self.client.delete_object(Bucket=target.bucket, Key=target.key),
                    deadline)

    async def list_objects(self, directory: RemotePath, deadline: float, recursive: bool = False) -> list[RemoteObject]:
        prefix = directory.key.rstrip("/") + "/"
        found: list[RemoteObject] = []
        kwargs: dict[str, Any] = {"Bucket": directory.bucket, "Prefix": prefix}
        if not recursive:
            kwargs["Delimiter"] = "/"
        for _ in range(_LIST_PAGES):
            page = await _call("ListObjectsV2", directory, self.client.list_objects_v2(**kwargs), deadline)
            for item in page.get("Contents", []):
                found.append(RemoteObject(directory.child(item["Key"][len(prefix):]), int(item["Size"]),
                                          item["LastModified"].timestamp()))
            if not page.get("IsTruncated"):
                return found
            kwargs["ContinuationToken"] = page["NextContinuationToken"]
        log.warning("listed only the first %d objects of %s", len(found), directory.url)
        return found
