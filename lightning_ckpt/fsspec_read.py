"""Loading a checkpoint from an fsspec URL that lightning_ckpt does not write (``http(s)://``, ``memory://``, ...).

Lightning's default CheckpointIO loads any fsspec URL, so a ``ckpt_path`` of that kind must load with ours too
(drop-in). We only write local paths, ``s3://`` and ``gs://``; a URL of any other protocol fsspec knows is read once
through fsspec into a private file of the local cache, read by our reader from there (a file of ours is verified
against its checksums as a local one is; a plain ``torch.save`` file is read as ``torch.load`` reads it), and
removed. Saves to such URLs are still refused (``paths.resolve``).
"""

from __future__ import annotations

import logging
import os
import time

from lightning_ckpt import paths
from lightning_ckpt.commit import Commit
from lightning_ckpt.errors import CheckpointTimeoutError

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20


def is_read_only_url(path: object) -> bool:
    """Whether ``path`` is a URL of a protocol fsspec knows that we only read (not local, ``s3://`` or ``gs://``)."""
    if isinstance(path, paths.RemotePath) or not isinstance(path, (str, os.PathLike)):
        return False
    text = os.fsdecode(os.fspath(path))
    if "://" not in text:
        return False
    protocol = paths.protocol_of(text)
    if protocol in paths.LOCAL_PROTOCOLS or protocol in paths.REMOTE_PROTOCOLS or "::" in text:
        return False
    from fsspec.registry import known_implementations, registry

    return protocol in known_implementations or protocol in registry


def download(url: str, storage_options: dict | None, timeout_secs: float) -> str:
    """Copy the object at ``url`` through fsspec into a new file of the local cache; returns its path (the caller
    removes it with ``commit.remove_path``). Nothing is left behind when the copy fails.

    Raises:
        FileNotFoundError: nothing at ``url``.
        CheckpointTimeoutError: the copy took longer than ``timeout_secs``.
        OSError, ImportError: as fsspec raises them (the store refused; its package is not installed).
    """
    import fsspec

    dest = paths.url_cache_path(url, url.rstrip("/").rsplit("/", 1)[-1], "download")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    deadline = time.monotonic() + timeout_secs
    with Commit.create(dest, fsync=False) as c:  # a cache copy, read once
        fd = c.open_new()
        try:
            with fsspec.open(url, "rb", **(storage_options or {})) as src:
                while chunk := src.read(CHUNK_BYTES):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                    if time.monotonic() > deadline:
                        raise CheckpointTimeoutError(f"reading {url} took longer than {timeout_secs:.0f}s")
        finally:
            os.close(fd)
        c.publish()
    log.debug("read %s through fsspec into %s", url, dest)
    return dest
