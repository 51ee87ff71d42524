"""Loading a checkpoint from an fsspec URL that lightning_ckpt does not write (``http(s)://``, ``memory://``, ...).

Lightning's default CheckpointIO loads any fsspec URL, so a ``ckpt_path`` of that kind must load with ours too
(drop-in). We only write local paths, ``s3://`` and ``gs://``; a URL of any other protocol fsspec knows is read once
through fsspec into a new private file of the local cache (one per load: concurrent loads of one URL never share
it), read by our reader from there (a file of ours is verified against its checksums as a local one is; a plain
``torch.save`` file is read as ``torch.load`` reads it), and removed. Saves to such URLs are still refused
(``paths.resolve``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from lightning_ckpt import paths
from lightning_ckpt.commit import Commit
from lightning_ckpt.errors import CheckpointTimeoutError

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20
HTTP_PROTOCOLS = ("http", "https")


def is_read_only_url(path: object) -> bool:
    """Whether ``path`` is a URL we only read, through fsspec: a protocol fsspec knows other than local paths,
    ``s3://`` and ``gs://``, or a chained URL (``simplecache::...``)."""
    if isinstance(path, paths.RemotePath) or not isinstance(path, (str, os.PathLike)):
        return False
    text = os.fsdecode(os.fspath(path))
    if "://" not in text:
        return False
    if "::" in text.split("?", 1)[0]:
        return True  # a chained URL (simplecache::https://...): fsspec opens it, as Lightning's default does
    protocol = paths.protocol_of(text)
    if protocol in paths.LOCAL_PROTOCOLS or protocol in paths.REMOTE_PROTOCOLS:
        return False
    from fsspec.registry import known_implementations, registry

    return protocol in known_implementations or protocol in registry


def weights_only_default(url: str, weights_only: bool | None) -> bool | None:
    """Lightning's default for a URL: ``weights_only=False`` for ``http(s)://`` (its ``_load`` says so), else as given."""
    return False if weights_only is None and paths.protocol_of(url) in HTTP_PROTOCOLS else weights_only


def download(url: str, timeout_secs: float) -> str:
    """Copy the object at ``url`` through fsspec (with its defaults, as Lightning's loads use) into a new file of
    the local cache; returns its path (the caller removes it: ``commit.remove_path``). An ``http(s)``
    object is streamed (servers without range requests too), the whole request bounded by ``timeout_secs``;
    nothing is left behind when the copy fails.

    Raises:
        FileNotFoundError: nothing at ``url``.
        CheckpointTimeoutError: the copy took longer than ``timeout_secs``.
        OSError: the copy failed (naming ``url``). ImportError: the protocol's package is not installed.
    """
    dest = paths.download_path(url, url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    _copy(url, dest, timeout_secs)  # a failed copy leaves nothing: its temp is removed
    log.debug("read %s through fsspec into %s", url, dest)
    return dest


def _copy(url: str, dest: str, timeout_secs: float) -> None:
    import fsspec

    deadline = time.monotonic() + timeout_secs
    options: dict = {}
    if paths.protocol_of(url) in HTTP_PROTOCOLS:
        import aiohttp

        options = {"block_size": 0, "client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout_secs)}}
    try:
        with Commit.create(dest, fsync=False) as c:  # a cache copy, read once
            fd = c.open_new()
            try:
                with fsspec.open(url, "rb", **options) as src:
                    while chunk := src.read(CHUNK_BYTES):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view):]
                        if time.monotonic() > deadline:
                            raise CheckpointTimeoutError(f"reading {url} took longer than {timeout_secs:.0f}s")
            finally:
                os.close(fd)
            c.publish()
    except (FileNotFoundError, CheckpointTimeoutError, ImportError):
        raise
    except (asyncio.TimeoutError, TimeoutError) as e:
        raise CheckpointTimeoutError(f"reading {url} took longer than {timeout_secs:.0f}s") from e
    except Exception as e:  # fsspec's and its clients' errors (aiohttp's are not OSErrors)
        raise OSError(f"could not read {url}: {type(e).__name__}: {e}") from e
