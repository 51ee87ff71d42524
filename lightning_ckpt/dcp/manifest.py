"""What a committed DCP checkpoint directory holds: file names, the manifest with per-chunk xxh3, its checks."""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from typing import Any

from lightning_ckpt import layout
from lightning_ckpt.errors import CorruptCheckpointError, IncompleteCheckpointError

# DCP's own name for the pickled ``Metadata`` (plain ``dcp.load`` reads it).
METADATA_NAME = ".metadata"
# One data file per rank, named as DCP's FileSystemWriter names them.
DATA_FILE_TEMPLATE = "__{rank}_0.distcp"
# One file per chunk, as the writer process writes an async save (DCP's ``single_file_per_rank=False`` layout).
CHUNK_FILE_TEMPLATE = "__{rank}_{item}.distcp"
# Marks a manifest written for a DCP directory (rank-file directories have no ``layout`` field).
MANIFEST_LAYOUT = "dcp"


@dataclass(frozen=True)
class ChunkInfo:
    """Where one chunk landed (the fields of DCP's ``_StorageInfo``) and the xxh3 of its bytes, or (a chunk
    the writer process wrote as a torch zip, hashing each record as it wrote it) the xxh3 of each record."""

    relative_path: str
    offset: int
    length: int
    xxh3: str | None
    records: dict[str, str] | None = None


def is_local_checkpoint_id(checkpoint_id: Any) -> bool:
    """True for a checkpoint id our storage plugins can write and read: a local path, not a URL."""
    return isinstance(checkpoint_id, (str, os.PathLike)) and "://" not in os.fspath(checkpoint_id)


def chunk_key(relative_path: str, offset: int) -> str:
    """The manifest key of the chunk at ``offset`` in ``relative_path``."""
    return f"{relative_path}@{offset}"


def build_manifest(chunks: list[ChunkInfo], files: dict[str, dict], world_size: int) -> dict:
    """The manifest: every file with its size (and xxh3 where hashed whole), every chunk with its xxh3."""
    from lightning_ckpt.checkpoint_writer import _torch_version, _version

    return {
        "format": layout.FORMAT_VERSION,
        "layout": MANIFEST_LAYOUT,
        "world_size": world_size,
        "files": files,
        "chunks": {chunk_key(c.relative_path, c.offset): _chunk_entry(c) for c in chunks},
        "lightning_ckpt_version": _version(),
        "torch_version": _torch_version(),
        "created_unix": time.time(),
    }


def _chunk_entry(chunk: ChunkInfo) -> dict:
    if chunk.records is not None:
        return {"nbytes": chunk.length, "records": dict(chunk.records)}
    return {"nbytes": chunk.length, "xxh3": chunk.xxh3}


def read_manifest(path: str) -> dict:
    """The manifest of the committed DCP checkpoint at ``path``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        IncompleteCheckpointError: ``path`` has no manifest (never committed, or written by plain DCP).
        CorruptCheckpointError: the manifest is unreadable or not a DCP manifest.
    """
    dir_fd = open_checkpoint_dir(path)
    try:
        return read_manifest_at(path, dir_fd)[0]
    finally:
        os.close(dir_fd)


def open_checkpoint_dir(path: str) -> int:
    """A descriptor of the checkpoint directory ``path``: what a later commit over ``path`` does not change.

    Raises:
        FileNotFoundError: nothing at ``path``.
        IncompleteCheckpointError: ``path`` is not a directory.
    """
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no checkpoint at {path}") from e
    except NotADirectoryError as e:
        raise _no_manifest(path) from e


def read_manifest_at(path: str, dir_fd: int) -> tuple[dict, bytes]:
    """The manifest of the checkpoint directory ``path`` open as ``dir_fd``, and its bytes.

    Raises:
        IncompleteCheckpointError: the directory has no manifest.
        CorruptCheckpointError: the manifest is unreadable or not a DCP manifest.
    """
    manifest_path = os.path.join(path, layout.MANIFEST_NAME)
    try:
        fd = os.open(layout.MANIFEST_NAME, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise _no_manifest(path) from e
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise _no_manifest(path)
            data = f.read()
        manifest = json.loads(data)
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"corrupt checkpoint {path}: unreadable manifest: {e}", path=manifest_path) from e
    if not isinstance(manifest, dict) or manifest.get("layout") != MANIFEST_LAYOUT or "chunks" not in manifest:
        raise CorruptCheckpointError(f"corrupt checkpoint {path}: {layout.MANIFEST_NAME} is not a DCP manifest",
                                     path=manifest_path)
    return manifest, data


def _no_manifest(path: str) -> IncompleteCheckpointError:
    return IncompleteCheckpointError(
        f"incomplete checkpoint: {path} has no {layout.MANIFEST_NAME} (never committed, or not written by "
        "lightning_ckpt; torch.distributed.checkpoint.FileSystemReader reads it unverified)"
    )


def verify_bytes(path: str, key: str, data: Any, expected: str | None) -> None:
    """Compare the xxh3 of ``data`` with ``expected``.

    Raises:
        CorruptCheckpointError: naming ``path``, ``key`` and both checksums (also when nothing was recorded).
    """
    from lightning_ckpt.torch_zip import checksum

    actual = checksum(data)
    if expected != actual:
        raise CorruptCheckpointError(
            f"corrupt checkpoint {path}: {key} checksum mismatch (expected {expected}, got {actual})",
            path=path, key=key, expected=expected, actual=actual,
        )


def verify_chunk(path: str, key: str, data: Any, entry: dict) -> None:
    """Check one chunk's bytes against its manifest entry: the xxh3 of the whole chunk, or of each zip record.

    Raises:
        CorruptCheckpointError: a checksum differs, a record is missing, or the zip is unreadable (names ``path``
            and ``key``).
    """
    records = entry.get("records")
    if records is None:
        verify_bytes(path, key, data, entry.get("xxh3"))
        return
    import io
    import zipfile

    from lightning_ckpt.torch_zip import record_spans

    try:
        spans = record_spans(io.BytesIO(data), path, set(records))
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"corrupt checkpoint {path}: chunk {key} is not a readable torch zip: {e}",
                                     path=path, key=key) from e
    with memoryview(data) as view:  # released on the way out, also when a mismatch raises (the caller may be a mmap)
        for name, expected in sorted(records.items()):
            start, size = spans.get(name, (0, -1))
            if size < 0 or start + size > len(view):
                raise CorruptCheckpointError(f"corrupt checkpoint {path}: chunk {key} lacks its record {name}",
                                             path=path, key=f"{key}:{name}")
            with view[start:start + size] as record:
                verify_bytes(path, f"{key}:{name}", record, expected)
