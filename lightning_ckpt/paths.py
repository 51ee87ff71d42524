"""Where a checkpoint path points: a local file, or an object in a remote store (resolved with fsspec, here only)."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Union

# Protocols that name this machine's filesystem (``file:///abs/k`` is ``/abs/k``).
LOCAL_PROTOCOLS = ("file", "local")
_LOCAL_PREFIXES = tuple(f"{p}:" for p in LOCAL_PROTOCOLS)
# Remote protocols we write to, and the protocol they are normalised to.
REMOTE_PROTOCOLS = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs"}
# Per normalised protocol: the pip extra and the module its client needs.
REMOTE_EXTRAS = {"s3": ("s3", "aiobotocore"), "gs": ("gcs", "gcsfs")}
# Local directory where remote checkpoints are committed before their upload and downloaded before loading.
CACHE_DIR_ENV = "LIGHTNING_CKPT_CACHE_DIR"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "lightning_ckpt")

_CACHE_NAME_BYTES = 128  # a cache file's name: the object's name, sanitized and capped (NAME_MAX is 255)
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._=+@,-]")

_PROCESS_LOCAL = ("memory",)  # stores that live inside one process: the writer process cannot see them


@dataclass(frozen=True)
class RemotePath:
    """An object in a remote store: ``s3://bucket/key`` or ``gs://bucket/key``, and the fsspec ``storage_options``
    to reach it.

    It is deliberately not ``os.PathLike``: nothing may turn it into a local path by accident.
    """

    protocol: str  # normalised: "s3" or "gs"
    bucket: str
    key: str
    storage_options: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.bucket}/{self.key}"

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def sibling(self, name: str) -> "RemotePath":
        """The object ``name`` in the same "directory" (prefix)."""
        prefix = self.key.rsplit("/", 1)[0] + "/" if "/" in self.key else ""
        return RemotePath(self.protocol, self.bucket, prefix + name, self.storage_options)

    def child(self, name: str) -> "RemotePath":
        """The object ``name`` under this path taken as a directory."""
        return RemotePath(self.protocol, self.bucket, f"{self.key.rstrip('/')}/{name}".lstrip("/"),
                          self.storage_options)

    def cache_path(self, kind: str = "upload") -> str:
        """A local path for this object under the cache directory (``$LIGHTNING_CKPT_CACHE_DIR``):
        ``<cache>/<kind>/<hash of the URL>/<name>``. Keys are arbitrary bytes to a store (``..``, ``.``, empty
        or 1000-byte segments), so no key segment becomes a local path component: the path is always two levels
        below ``<cache>/<kind>``, one per URL, and its name is the object's name made safe and short."""
        return url_cache_path(self.url, self.name, kind)

    def __str__(self) -> str:
        return self.url


Location = Union[str, RemotePath]  # a local absolute path, or a remote object


def url_cache_path(url: str, name: str, kind: str) -> str:
    """``<cache>/<kind>/<hash of url>/<name made safe>``: the local cache path of the object at ``url``."""
    digest = hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return os.path.join(cache_dir(), kind, digest, _cache_name(name))


def download_path(url: str, name: str) -> str:
    """A new local path for one download of the object at ``url``:
    ``<cache>/download/<hash of url>-<random>-<name made safe>``, so concurrent loads of one URL (the ranks of a
    node, several processes) never share or remove each other's copy, and no per-URL folder is left to remove
    (one that a load removed while another was about to write into it would fail that load). The caller removes
    the file (``commit.remove_path``)."""
    import secrets

    digest = hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(cache_dir(), "download", f"{digest}-{secrets.token_hex(8)}-{_cache_name(name)}")


def _cache_name(name: str) -> str:
    """``name`` as one safe local file name: unusual characters replaced, at most ``_CACHE_NAME_BYTES``, never
    ``.``/``..``/empty (the extension is kept: logs and tools recognise ``.ckpt``)."""
    safe = _UNSAFE_NAME_CHARS.sub("_", name).lstrip(".")
    if len(safe) > _CACHE_NAME_BYTES:
        stem, dot, ext = safe.rpartition(".")
        ext = ext[:16] if dot and stem else ""
        safe = safe[:_CACHE_NAME_BYTES - len(ext) - 1] + ("." + ext if ext else "")
    return safe or "object"


def cache_dir() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR))


def protocol_of(path: Any) -> str:
    """The fsspec protocol of ``path`` (``"file"`` for plain local paths)."""
    if isinstance(path, RemotePath):
        return path.protocol
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if "://" not in text and "::" not in text:
        return "file"  # fast path, and no fsspec import for local paths
    from fsspec.utils import get_protocol

    return get_protocol(text)


def resolve(path: Any, storage_options: dict | None = None) -> Location:
    """Resolve a checkpoint path once: a local absolute path (str), or a ``RemotePath``.

    Args:
        path: a local path, ``file://`` URL, ``s3://bucket/key``, ``gs://bucket/key`` (or ``gcs://``), or a
            ``RemotePath`` (returned as is, with ``storage_options`` merged over its own).
        storage_options: fsspec options for a remote store (endpoint, credentials, client and config kwargs).

    Raises:
        ValueError: a protocol we cannot write from the writer process (``memory://``, unknown, chained URLs),
            or a remote URL without bucket and key.
        ImportError: the protocol's client is not installed (names the pip extra).
    """
    if isinstance(path, RemotePath):
        if storage_options:
            return RemotePath(path.protocol, path.bucket, path.key, {**path.storage_options, **storage_options})
        return path
    protocol = protocol_of(path)
    text = os.fsdecode(os.fspath(path))
    if protocol in LOCAL_PROTOCOLS:
        if "://" in text or text.startswith(_LOCAL_PREFIXES):  # file:/abs (RFC 8089) too, as fsspec reads it
            from fsspec.implementations.local import LocalFileSystem

            text = LocalFileSystem._strip_protocol(text)
        return os.path.abspath(text)
    _check_supported(protocol, text)
    rest = text.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    key = key.strip("/")
    if not bucket or not key:
        raise ValueError(f"checkpoint path {text!r} needs a bucket and a key, like s3://bucket/run/last.ckpt")
    return RemotePath(REMOTE_PROTOCOLS[protocol], bucket, key, dict(storage_options or {}))


def _check_supported(protocol: str, text: str) -> None:
    if protocol in _PROCESS_LOCAL:
        raise ValueError(
            f"checkpoint path {text!r}: fsspec's {protocol}:// store lives inside one process, and checkpoints are "
            "written from a separate writer process; use a local path, file://, s3:// or gs://"
        )
    if protocol not in REMOTE_PROTOCOLS:
        from fsspec.registry import known_implementations, registry

        known = protocol in known_implementations or protocol in registry
        what = "unsupported" if known else "unknown"
        raise ValueError(
            f"checkpoint path {text!r}: {what} protocol {protocol!r}; lightning_ckpt writes local paths, file://, "
            "s3:// (any S3-compatible store: AWS, MinIO, SeaweedFS ...) and gs:// (Google Cloud Storage)"
        )
    import importlib.util

    extra, module = REMOTE_EXTRAS[REMOTE_PROTOCOLS[protocol]]
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"checkpoint path {text!r} needs {module}: pip install 'lightning_ckpt[{extra}]'")


def is_remote(path: Any) -> bool:
    return isinstance(path, RemotePath) or protocol_of(path) not in LOCAL_PROTOCOLS


def local_path(path: Any) -> str:
    """``path`` as a local absolute path, for components that only write local files.

    Raises:
        ValueError: ``path`` is remote (use the Lightning plugins, which commit locally and then upload).
    """
    resolved = resolve(path)
    if isinstance(resolved, RemotePath):
        raise ValueError(
            f"{resolved.url} is a remote path; this component writes local files only (the AsyncCheckpointIO and "
            "SyncCheckpointIO plugins write remote checkpoints)"
        )
    return resolved


def path_key(path: Any) -> str:
    """One string per location, to compare paths: the absolute local path, or the remote URL."""
    resolved = path if isinstance(path, (str, RemotePath)) and (
        isinstance(path, RemotePath) or os.path.isabs(path) and "://" not in path) else resolve(path)
    return resolved.url if isinstance(resolved, RemotePath) else resolved
