"""One checkpoint file opened once, its checksum record validated, and its bytes checked against it."""

from __future__ import annotations

import logging
import mmap
import os
import stat
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from lightning_ckpt import layout
from lightning_ckpt.commit import is_temp_name
from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.manifest import ChecksumRecord
from lightning_ckpt.serialization import checksum
from lightning_ckpt.tree import iter_leaves, map_leaves_with_paths
from lightning_ckpt.torch_zip import CompressedRecordError, record_spans

log = logging.getLogger(__name__)


def is_temp(name: str) -> bool:
    """Whether ``name`` is a temp of ours (the commit primitive's, or the marker of earlier versions): never a checkpoint."""
    return is_temp_name(name) or layout.TMP_MARKER in name


class OpenedFile:
    """A checkpoint file opened once: every later read (zip directory, records, ``torch.load``) goes to this file.

    A writer that replaces the path meanwhile (a rename, as every commit is) does not change what is read: the
    descriptor keeps the file it opened. ``source`` names that same file for APIs that want a path
    (``/proc/self/fd/<fd>`` on Linux; elsewhere the path itself, without that guarantee).

    Args:
        path: the file, as given (used in messages).
        dir_fd: a directory descriptor that ``name`` is relative to (a checkpoint directory opened once).
        name: the file's name inside ``dir_fd``.
    """

    def __init__(self, path: str, dir_fd: int | None = None, name: str | None = None) -> None:
        self.path = path
        try:
            # O_NONBLOCK: opening a FIFO (or a device) would otherwise block until a writer shows up, forever
            self.fd = os.open(name if dir_fd is not None else path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK,
                              dir_fd=dir_fd)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"checkpoint file not found: {path}") from e
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(f"not a checkpoint file: {path} is a directory")
            raise CorruptCheckpointError(
                f"not a checkpoint file: {path} is a {_file_kind(st.st_mode)}, not a regular file", path=path)
        os.set_blocking(self.fd, True)
        self.size = st.st_size
        self._spans: dict[str, tuple[int, int]] | None = None
        self._spans_error: CorruptCheckpointError | None = None
        self._torch_only: str | None = None  # why only torch.load reads it (set by spans)
        proc = f"/proc/self/fd/{self.fd}"
        self.source = proc if os.path.exists(proc) else path

    def advise_sequential(self) -> None:
        """Ask the kernel to read the whole file ahead, in order (best effort)."""
        try:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except (AttributeError, OSError):
            pass

    def spans(self) -> dict[str, tuple[int, int]]:
        """``{record name: (offset, size)}`` of the torch zip; CorruptCheckpointError when it is not one of stored
        records (``torch_only`` tells a file that ``torch.load`` still reads from a damaged one)."""
        if self._spans is not None:
            return self._spans
        if self._spans_error is not None:  # parsed once (a zip of 100k compressed records takes seconds)
            raise self._spans_error
        try:
            self._spans = self._read_spans()
        except CorruptCheckpointError as e:
            self._spans_error = e
            raise
        return self._spans

    def _read_spans(self) -> dict[str, tuple[int, int]]:
        if self.size == 0:
            raise CorruptCheckpointError(f"corrupt checkpoint {self.path}: empty file (0 bytes)", path=self.path)
        try:
            with os.fdopen(os.dup(self.fd), "rb") as f:
                spans = record_spans(f, self.path)
        except CompressedRecordError as e:
            if layout.CHECKSUM_RECORD not in e.names:  # ours are never compressed: one that is was tampered with
                self._torch_only = f"compressed records ({e})"
            raise CorruptCheckpointError(f"corrupt checkpoint {self.path}: unreadable zip ({e})", path=self.path) from e
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            if _is_legacy_torch_file(self.read_span((0, _LEGACY_HEAD_BYTES))):
                self._torch_only = "torch's legacy (non-zip) format"
            raise CorruptCheckpointError(f"corrupt checkpoint {self.path}: unreadable zip ({e})", path=self.path) from e
        for name, (offset, size) in spans.items():
            if offset + size > self.size:
                raise CorruptCheckpointError(f"corrupt checkpoint {self.path}: record {name} is truncated",
                                             path=self.path, key=name)
        return spans

    def torch_only(self) -> str | None:
        """Why only ``torch.load`` reads this file (torch's legacy format, compressed records; neither carries our
        checksums), or None for a zip of stored records, which every reader here reads.

        Raises:
            CorruptCheckpointError: neither (empty, truncated, junk).
        """
        try:
            self.spans()
        except CorruptCheckpointError:
            if self._torch_only is None:
                raise
        return self._torch_only

    def read_span(self, span: tuple[int, int]) -> bytes:
        return os.pread(self.fd, span[1], span[0])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OpenedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # what torch's legacy format pickles first (torch.serialization.MAGIC_NUMBER)
_LEGACY_HEAD_BYTES = 512  # a legacy file's magic lies in its first bytes; a tar's header in its first 512


def _is_legacy_torch_file(head: bytes) -> bool:
    """Whether ``head`` starts a file of torch's legacy formats (``_use_new_zipfile_serialization=False``: a pickle
    whose first object is torch's magic number, any protocol; or the older tar format)."""
    pickled = (b"\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little"), b"L%dL\n" % _LEGACY_MAGIC, b"I%d\n" % _LEGACY_MAGIC)
    return any(p in head[:32] for p in pickled) or head[257:262] == b"ustar"


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"))
    return next((name for test, name in kinds if test(mode)), "special file")


def read_checksum_record(opened: OpenedFile) -> ChecksumRecord | None:
    """Reads and validates the checksum record and checks the pickle against it; None for a plain torch file
    (also one that only ``torch.load`` reads: torch's legacy format, compressed records).

    Every storage of the file must have a checksum: one that has none is refused, never loaded unverified.

    Raises:
        CorruptCheckpointError: unreadable zip, malformed record, a storage without a checksum, or a pickle mismatch.
    """
    if opened.torch_only() is not None:
        return None
    spans = opened.spans()
    if layout.CHECKSUM_RECORD not in spans:
        return None
    record = ChecksumRecord.from_json(opened.read_span(spans[layout.CHECKSUM_RECORD]), opened.path)
    unrecorded = sorted(n for n in spans if n.startswith("data/") and n[len("data/"):] not in record.records)
    if unrecorded:
        raise CorruptCheckpointError(
            f"corrupt checkpoint {opened.path}: storage {unrecorded[0]} has no checksum in {layout.CHECKSUM_RECORD}"
            f" ({len(unrecorded)} such)", path=opened.path, key=unrecorded[0])
    missing = sorted(k for k in record.records if f"data/{k}" not in spans)
    if missing:
        raise CorruptCheckpointError(f"corrupt checkpoint {opened.path}: record data/{missing[0]} is missing",
                                     path=opened.path, key=f"data/{missing[0]}")
    if "data.pkl" not in spans:
        raise CorruptCheckpointError(f"corrupt checkpoint {opened.path}: no data.pkl", path=opened.path, key="data.pkl")
    _compare(opened.path, None, "data.pkl", checksum(opened.read_span(spans["data.pkl"])), record.data_pkl_xxh3)
    return record


def verify_records(opened: OpenedFile, record: ChecksumRecord, keys: list[str] | None = None) -> int:
    """Checks storages straight from the file's bytes, nothing unpickled; returns the bytes hashed.

    Args:
        opened: the file.
        record: its validated checksum record (``read_checksum_record``).
        keys: the storage keys to check (default: all).
    """
    spans = opened.spans()
    keys = list(record.records) if keys is None else keys
    if not keys or opened.size == 0:
        return 0
    hashed = 0
    with mmap.mmap(opened.fd, 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            for key in keys:
                offset, size = spans[f"data/{key}"]
                chunk = view[offset:offset + size]
                try:
                    _compare(opened.path, record, key, checksum(chunk))
                finally:
                    chunk.release()
                hashed += size
        finally:
            view.release()
    return hashed


def _compare(path: str, record: ChecksumRecord | None, key: str, actual: str, expected: str | None = None) -> None:
    """Raise naming ``key`` (``record.describe``: the tensor or run on a storage) unless ``actual`` is expected."""
    if expected is None:
        expected = record.records[key].xxh3
    if actual != expected:
        label, name = record.describe(key) if record is not None else (key, key)
        raise CorruptCheckpointError(
            f"corrupt checkpoint {path}: {label} checksum mismatch (expected {expected}, got {actual})",
            path=path, key=name, expected=expected, actual=actual,
        )


def storage_checksum(tensor: torch.Tensor) -> str:
    storage = tensor.untyped_storage()
    if storage.device.type != "cpu":
        storage = storage.cpu()
    return checksum(storage)


def verify_tensor(path: str, tensor: torch.Tensor, record: ChecksumRecord, key: str) -> None:
    """Checks one loaded tensor's storage (record ``key``) against its checksum."""
    _compare(path, record, key, storage_checksum(tensor))


def verify_tree(opened: OpenedFile, loaded: Any, record: ChecksumRecord) -> None:
    """Checks every reachable tensor's storage (each once), and from the file the storages no key path reaches or
    that were loaded without bytes (``map_location="meta"``)."""
    done: set[str] = set()
    for key_path, leaf in iter_leaves(loaded):
        key = record.by_key_path.get(key_path)
        if isinstance(leaf, torch.Tensor) and key is not None and key not in done and leaf.device.type != "meta":
            verify_tensor(opened.path, leaf, record, key)
            done.add(key)
    verify_records(opened, record, [k for k in record.records if k not in done])


def copy_and_verify(opened: OpenedFile, mapped: Any, record: ChecksumRecord | None) -> Any:
    """``copy_out_of_mapping`` with each copied storage hashed on a worker thread (xxhash releases the GIL)."""
    if record is None:
        return copy_out_of_mapping(mapped)
    hashes: dict[str, Future] = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_ckpt-verify") as pool:

        def on_copy(key_path: tuple, tensor: torch.Tensor) -> None:
            key = record.by_key_path.get(key_path)
            if key is not None and key not in hashes:
                hashes[key] = pool.submit(storage_checksum, tensor)

        loaded = copy_out_of_mapping(mapped, on_copy)
        for key, future in hashes.items():
            _compare(opened.path, record, key, future.result())
    verify_records(opened, record, [k for k in record.records if k not in hashes])
    return loaded


def copy_out_of_mapping(obj: Any, on_copy: Callable[[tuple, torch.Tensor], None] | None = None,
                        relocate: Callable[[torch.UntypedStorage], torch.UntypedStorage | None] | None = None,
                        memo: dict | None = None) -> Any:
    """Replace the file-mapped tensors of a ``torch.load(mmap=True)`` result with in-memory copies.

    Each storage is copied once, so tensors that shared a storage (views, tied weights) still share it; each copy
    keeps the original's type (``Parameter``, subclasses), ``requires_grad`` and Python attributes, as
    ``torch.load`` rebuilds them. ``relocate(storage)`` makes the new storage (e.g. on another device; None, and
    by default: a CPU copy). ``on_copy(key_path, tensor)`` is told of every copied tensor reachable through dicts,
    lists, tuples and namedtuples. ``memo`` (a dict the caller keeps) shares the copies across calls.
    """
    copies: dict[tuple[int, int], torch.UntypedStorage] = {} if memo is None else memo

    def copy_storage(src: torch.UntypedStorage) -> torch.UntypedStorage:
        out = relocate(src) if relocate is not None else None
        if out is None:
            out = torch.empty(0, dtype=torch.uint8).set_(src).clone().untyped_storage()
        return out

    def copy_tensor(t: torch.Tensor) -> torch.Tensor:
        if (t.layout != torch.strided or t.device.type != "cpu"
                or type(t).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__):  # a wrapper owns no bytes
            return t
        src = t.untyped_storage()
        key = (src.data_ptr(), src.nbytes())
        dst = copies.get(key)
        if dst is None:
            dst = copies[key] = copy_storage(src)
        with torch.no_grad():
            out = torch.empty(0, dtype=t.dtype, device=dst.device).set_(dst, t.storage_offset(), t.size(), t.stride())
        return rebuilt_like(t, out)

    def visit(key_path: tuple, o: Any) -> Any:
        if not isinstance(o, torch.Tensor):
            return o
        out = copy_tensor(o)
        if on_copy is not None and out is not o:
            on_copy(key_path, out)
        return out

    return map_leaves_with_paths(visit, obj)


def rebuilt_like(original: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``data`` (a plain leaf tensor) as ``torch.load`` rebuilds ``original``: a ``Parameter`` as a ``Parameter``,
    another subclass as that subclass, with its ``requires_grad`` and Python attributes."""
    if isinstance(original, torch.nn.Parameter):
        out = torch.nn.Parameter(data, requires_grad=original.requires_grad)
    else:
        out = data if type(original) is torch.Tensor else data.as_subclass(type(original))
        if original.requires_grad:
            out.requires_grad_(True)
    attributes = getattr(original, "__dict__", None)
    if attributes:
        out.__dict__.update(attributes)
    return out
