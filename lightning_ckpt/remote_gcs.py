"""The Google Cloud Storage store for ``lightning_ckpt.remote``: requests through gcsfs's async session (JSON API).

``pip install 'lightning_ckpt[gcs]'``; imported only in the process that makes a call. An upload is a resumable
session whose final chunk is the commit (a failure DELETEs the session: nothing is published), or one media
request for a file of one part; never gcsfs's autocommitting ``open(..., "wb")``. Options come from
``storage_options`` (gcsfs's names: ``token``, ``project``, ``endpoint_url``, ``requester_pays``) or the standard
places (``STORAGE_EMULATOR_HOST``, then application default credentials); with ``STORAGE_EMULATOR_HOST`` and no
``token`` the session is anonymous, as Google's own clients do for emulators.

Resumable sessions cannot be listed, so there is no sweep of stale ones: a killed writer's session publishes
nothing, and GCS drops it after a week.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from lightning_ckpt.errors import CheckpointWriteError
from lightning_ckpt.paths import RemotePath
from lightning_ckpt.remote import (
    _ABORT_TIMEOUT_SECS, _LIST_PAGES, ObjectReplacedError, Part, RemoteConfig, RemoteObject, _call, _send,
)

log = logging.getLogger(__name__)

CHUNK_ALIGN = 256 << 10  # every chunk of a resumable session but the last is a multiple of 256 KiB
_REWRITE_ROUNDS = 1000  # a rewrite copies ~1 GiB per round at least
_RESEND_ROUNDS = 16  # a chunk the server kept only part of is resent (bounded)
_BACKOFF_MAX_SECS = 8.0


@dataclass
class GCSUpload:
    """An upload in progress: a resumable session (``location``), or none for a one-request media upload."""

    target: RemotePath
    size: int
    no_overwrite: bool
    location: str | None


@contextlib.asynccontextmanager
async def open_store(target: RemotePath, config: RemoteConfig, timeout_secs: float) -> AsyncIterator["GCSStore"]:
    """A gcsfs session on ``target``'s endpoint (its HTTP session closed on exit)."""
    import aiohttp
    from gcsfs.core import GCSFileSystem  # the plain one: gcsfs's experimental subclass probes every bucket

    opts = dict(target.storage_options)
    if "token" not in opts and os.environ.get("STORAGE_EMULATOR_HOST") and "endpoint_url" not in opts:
        opts["token"] = "anon"
    connect, read = config.timeouts(timeout_secs)
    timeout = aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect, sock_read=read)
    fs = await asyncio.to_thread(  # credentials may read files or ask a metadata server
        GCSFileSystem, asynchronous=True, skip_instance_cache=True, session_kwargs={"timeout": timeout}, **opts)
    try:
        yield GCSStore(fs, config, timeout_secs)
    finally:
        session = fs._session
        if session is not None and not session.closed:
            await session.close()


def translate_error(what: str, target: RemotePath, e: BaseException) -> BaseException | None:
    """Our error for a gcsfs/aiohttp one (None: raise ``e`` as it is)."""
    import aiohttp
    from gcsfs.retry import HttpError

    if isinstance(e, FileNotFoundError):
        return FileNotFoundError(f"Checkpoint file not found: {target.url}")
    if isinstance(e, FileExistsError):
        return FileExistsError(
            f"{target.url} already exists (another run wrote it?); step-named checkpoints are never "
            "overwritten (RemoteConfig.no_overwrite_pattern)")
    if isinstance(e, HttpError):
        return CheckpointWriteError(f"{what} of {target.url} failed: HTTP {e.code} {e.message}")
    if isinstance(e, (OSError, ValueError, aiohttp.ClientError)):  # gcsfs: 403 is OSError, 400 ValueError
        return CheckpointWriteError(f"{what} of {target.url} failed: {type(e).__name__}: {e}")
    return None


class GCSStore:
    """``remote.Store`` over one gcsfs ``GCSFileSystem`` (``fs``), its JSON API requests retried here; requests
    that send a body are bounded by ``config.attempt_secs`` under a call's ``timeout_secs``."""

    part_align = CHUNK_ALIGN
    parallel_parts = False

    def __init__(self, fs: Any, config: RemoteConfig, timeout_secs: float) -> None:
        self.fs = fs
        self.config = config
        self.timeout_secs = timeout_secs

    async def _request(self, method: str, path: str, *args: Any, **kwargs: Any) -> tuple[int, Any, bytes]:
        """One JSON API request, ``max_attempts`` tries on 5xx, 408, 429 and dropped connections."""
        from gcsfs.retry import is_retriable

        once = type(self.fs)._request.__wrapped__  # gcsfs's own retry decorator would wait up to 31 s more
        for attempt in range(self.config.max_attempts):
            try:
                status, headers, _, contents = await once(self.fs, method, path, *args, **kwargs)
                return status, headers, contents
            except Exception as e:
                if attempt == self.config.max_attempts - 1 or not is_retriable(e):
                    raise
                await asyncio.sleep(min(_BACKOFF_MAX_SECS, 0.25 * 2 ** attempt) * (0.5 + random.random() / 2))
        raise AssertionError("unreachable")

    async def _json(self, what: str, target: RemotePath, deadline: float, method: str, path: str, *args: Any,
                    **kwargs: Any) -> dict:
        _, _, contents = await _call(what, target, self._request(method, path, *args, **kwargs), deadline)
        return json.loads(contents) if contents else {}

    def _upload_url(self, target: RemotePath) -> str:
        return f"{self.fs._location}/upload/storage/v1/b/{_quote(target.bucket)}/o"

    # ------------------------------------------------------------------ uploads

    async def begin_upload(self, target: RemotePath, parts: list[Part], no_overwrite: bool,
                           deadline: float) -> GCSUpload:
        size = parts[-1].offset + parts[-1].nbytes
        if len(parts) == 1:
            return GCSUpload(target, size, no_overwrite, None)  # one media request: nothing to begin or abort
        _, headers, _ = await _call("resumable upload start", target, self._request(
            "POST", self._upload_url(target), uploadType="resumable", name=target.key, json={"name": target.key},
            headers={"X-Upload-Content-Type": "application/octet-stream", "X-Upload-Content-Length": str(size)},
            **_precondition(no_overwrite)), deadline)
        location = headers.get("Location")
        if not location:
            raise CheckpointWriteError(f"resumable upload start of {target.url}: the store returned no session")
        return GCSUpload(target, size, no_overwrite, location)

    async def upload_part(self, upload: GCSUpload, part: Part, body: bytes, deadline: float) -> dict | None:
        target = upload.target
        if upload.location is None:
            _, _, contents = await _send("media upload", target, lambda: self._request(
                "POST", self._upload_url(target), uploadType="media", name=target.key, data=body,
                headers={"Content-Type": "application/octet-stream"}, **_precondition(upload.no_overwrite)),
                len(body), self.config, self.timeout_secs, deadline)
            return json.loads(contents) if contents else {}
        offset, view = part.offset, memoryview(body)
        for _ in range(_RESEND_ROUNDS):
            total = str(upload.size) if part.last else "*"
            end = offset + len(view) - 1
            status, headers, contents = await _send(f"upload chunk {part.number}", target, lambda: self._request(
                "PUT", upload.location, data=view,
                headers={"Content-Range": f"bytes {offset}-{end}/{total}", "Content-Type": "application/octet-stream"},
            ), len(view), self.config, self.timeout_secs, deadline)
            if "Range" in headers:  # 308: the bytes the session holds so far
                kept = int(headers["Range"].rsplit("-", 1)[1])
            else:
                kept = end if status < 300 else offset - 1
            if kept >= end:
                return json.loads(contents) if part.last and contents else None
            view, offset = view[kept + 1 - offset:], kept + 1  # the server kept less: send the rest
        raise CheckpointWriteError(f"upload chunk {part.number} of {target.url}: the store kept taking only part of it")

    async def complete_upload(self, upload: GCSUpload, sent: list[dict | None], deadline: float) -> None:
        """The final chunk committed the object; check that the store says so."""
        final = sent[-1] if sent else None
        if not isinstance(final, dict) or final.get("name") != upload.target.key:
            raise CheckpointWriteError(f"{upload.target.url}: the final chunk did not complete the object ({final!r})")

    async def abort_upload(self, upload: GCSUpload) -> None:
        if upload.location is None:
            return  # a failed media request publishes nothing
        try:
            once = type(self.fs)._request.__wrapped__  # one try: real GCS answers 499 (cancelled), accepted
            await _call("resumable upload cancel", upload.target, once(self.fs, "DELETE", upload.location),
                        time.monotonic() + _ABORT_TIMEOUT_SECS)
            log.info("cancelled the upload of %s", upload.target.url)
        except BaseException as e:  # noqa: BLE001 - the upload's own error is what propagates
            log.warning("could not cancel the upload session of %s (it publishes nothing, and expires): %s",
                        upload.target.url, e)

    async def list_uploads(self, prefix: RemotePath, deadline: float) -> list[tuple[GCSUpload, float]]:
        return []  # resumable sessions cannot be listed (see the module docstring)

    async def put(self, target: RemotePath, data: bytes, no_overwrite: bool, deadline: float) -> None:
        await self.upload_part(GCSUpload(target, len(data), no_overwrite, None), Part(1, 0, len(data), True), data,
                               deadline)

    # ------------------------------------------------------------------ committed objects

    async def head(self, target: RemotePath, deadline: float) -> tuple[int, str]:
        meta = await self._json("object get", target, deadline, "GET", "b/{}/o/{}", target.bucket, target.key)
        return int(meta["size"]), str(meta["generation"])

    async def get_range(self, target: RemotePath, version: str, first: int, last: int, deadline: float) -> bytes:
        try:
            _, _, contents = await _call("object read", target, self._request(
                "GET", "b/{}/o/{}", target.bucket, target.key, alt="media", generation=version,
                headers={"Range": f"bytes={first}-{last}"}), deadline)
        except FileNotFoundError as e:  # that generation is gone
            raise ObjectReplacedError(f"{target.url} was replaced during its download; load it again") from e
        return contents

    async def read_tail(self, target: RemotePath, nbytes: int, deadline: float) -> tuple[int, bytes]:
        size, version = await self.head(target, deadline)
        if size == 0:
            return 0, b""
        return size, await self.get_range(target, version, max(0, size - nbytes), size - 1, deadline)

    async def copy(self, source: RemotePath, dest: RemotePath, deadline: float) -> None:
        """``objects.rewrite``, repeated with its token until done (large or cross-location copies take rounds)."""
        params: dict[str, Any] = {}
        for _ in range(_REWRITE_ROUNDS):
            answer = await self._json("object rewrite", source, deadline, "POST", "b/{}/o/{}/rewriteTo/b/{}/o/{}",
                                      source.bucket, source.key, dest.bucket, dest.key, **params)
            if answer.get("done"):
                return
            params["rewriteToken"] = answer["rewriteToken"]
        raise CheckpointWriteError(f"object rewrite of {source.url} to {dest.url} did not finish")

    async def delete(self, target: RemotePath, deadline: float) -> None:
        await _call("object delete", target, self._request("DELETE", "b/{}/o/{}", target.bucket, target.key),
                    deadline)

    async def list_objects(self, directory: RemotePath, deadline: float, recursive: bool = False) -> list[RemoteObject]:
        prefix = directory.key.rstrip("/") + "/"
        found: list[RemoteObject] = []
        params: dict[str, Any] = {"prefix": prefix}
        if not recursive:
            params["delimiter"] = "/"
        for _ in range(_LIST_PAGES):
            page = await self._json("object list", directory, deadline, "GET", "b/{}/o", directory.bucket, **params)
            for item in page.get("items", []):
                found.append(RemoteObject(directory.child(item["name"][len(prefix):]), int(item["size"]),
                                          self.fs._parse_timestamp(item["updated"]).timestamp()))
            if not page.get("nextPageToken"):
                return found
            params["pageToken"] = page["nextPageToken"]
        log.warning("listed only the first %d objects of %s", len(found), directory.url)
        return found


def _precondition(no_overwrite: bool) -> dict:
    return {"ifGenerationMatch": "0"} if no_overwrite else {}


def _quote(text: str) -> str:
    from gcsfs.core import quote

    return quote(text)
