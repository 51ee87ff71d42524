"""The bytes format: a plain ``torch.save`` zip plus a checksum record, written from staged or live storages.

The main process pickles the state dict exactly as ``torch.save`` does (same persistent ids, so ``torch.load`` and
``weights_only`` loading work unchanged) but without touching tensor bytes; each storage becomes a record that is
later written straight from its memory (a staging buffer or a live tensor). The writer therefore never unpickles
user objects and never imports user code.
"""

from __future__ import annotations

import ctypes
import io
import json
import pickle
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import xxhash
from torch.serialization import location_tag, normalize_storage_type

from lightning_ckpt.layout import CHECKSUM_RECORD, FORMAT_VERSION

PICKLE_PROTOCOL = 2  # torch.save's default; keeps files loadable by every torch that reads the zip format
STORAGE_ALIGNMENT = 64
KeyPath = tuple  # path of a leaf inside nested dicts/lists, e.g. ("state_dict", "layer.weight")


@dataclass
class Record:
    """One tensor storage to write as ``data/<key>``: either at ``offset`` in a staging buffer or a live storage."""

    key: str
    nbytes: int
    location: str
    offset: int | None = None
    storage: Any = None  # torch.UntypedStorage when written in-process (never sent to the writer process)
    inline: bytes | None = None  # bytes of a storage outside the staging buffer, shipped with the request


@dataclass
class PreparedCheckpoint:
    """Everything the writer needs: the pickle bytes, the records, and which key path names each record."""

    data_pkl: bytes
    records: list[Record]
    key_paths: list[tuple[list, str]] = field(default_factory=list)  # (json-able key path, record key)
    metadata: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return len(self.data_pkl) + sum(r.nbytes for r in self.records)

    def for_transfer(self) -> "PreparedCheckpoint":
        """A copy without live storages, fit to pickle through the pipe (buffer records keep their offsets)."""
        records = []
        for r in self.records:
            if r.offset is None and r.inline is None and r.storage is not None:
                inline = bytes(storage_view(r.storage.cpu())) if r.nbytes else b""
                records.append(Record(r.key, r.nbytes, r.location, inline=inline))
            else:
                records.append(Record(r.key, r.nbytes, r.location, r.offset, None, r.inline))
        return PreparedCheckpoint(self.data_pkl, records, self.key_paths, self.metadata)


def path_str(path: KeyPath | list) -> str:
    return ".".join(str(p) for p in path)


def _json_key(key: Any) -> Any:
    return key if isinstance(key, (str, int)) and not isinstance(key, bool) else repr(key)


def iter_leaves(obj: Any, prefix: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    """Yield ``(key_path, leaf)`` for every leaf of nested dicts, lists and tuples (depth first, in order)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_leaves(v, prefix + (_json_key(k),))
    elif isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        for i, v in enumerate(obj):
            yield from iter_leaves(v, prefix + (i,))
    else:
        yield prefix, obj


def storage_view(storage: torch.UntypedStorage) -> memoryview:
    """A zero-copy memoryview of a CPU storage's bytes."""
    n = storage.nbytes()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(storage.data_ptr())).cast("B")


def checksum(data: Any) -> str:
    """xxh3-64 hex digest of bytes, a buffer, or a CPU storage (hashed in place, no copy)."""
    if isinstance(data, torch.UntypedStorage):
        data = storage_view(data)
    return xxhash.xxh3_64_hexdigest(data)


class _Pickler(pickle.Pickler):
    """``torch.save``'s pickling of storages as persistent ids, recording each storage instead of writing it."""

    def __init__(self, buf: io.BytesIO, buffer_range: tuple[int, int] | None) -> None:
        super().__init__(buf, protocol=PICKLE_PROTOCOL)
        self.records: list[Record] = []
        self.keys_by_cdata: dict[int, str] = {}
        self._dtypes: dict[int, torch.dtype] = {}
        self._range = buffer_range

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.storage.TypedStorage):
            storage, dtype = obj._untyped_storage, obj.dtype
            storage_type, numel = getattr(torch, obj._pickle_storage_type()), obj._size()
        elif torch.is_storage(obj):
            storage, dtype = obj, torch.uint8
            storage_type, numel = normalize_storage_type(type(obj)), obj.nbytes()
        else:
            return None
        ptr = storage.data_ptr()
        if storage.device.type != "meta" and ptr != 0:
            if self._dtypes.setdefault(ptr, dtype) != dtype:
                raise RuntimeError("Cannot save multiple tensors or storages that view the same data as different types")
        key = self.keys_by_cdata.get(storage._cdata)
        if key is None:
            key = self.keys_by_cdata[storage._cdata] = str(len(self.keys_by_cdata))
            self.records.append(self._record(key, storage))
        return ("storage", storage_type, key, location_tag(storage), numel)

    def _record(self, key: str, storage: torch.UntypedStorage) -> Record:
        nbytes = storage.nbytes()
        location = location_tag(storage)
        if storage.device.type == "meta":
            return Record(key, 0, location, inline=b"")
        ptr = storage.data_ptr()
        if self._range is not None and self._range[0] <= ptr and ptr + nbytes <= self._range[1]:
            return Record(key, nbytes, location, offset=ptr - self._range[0])
        return Record(key, nbytes, location, storage=storage)


def prepare(obj: Any, buffer_range: tuple[int, int] | None = None, metadata: dict | None = None) -> PreparedCheckpoint:
    """Pickle ``obj`` like ``torch.save`` and list its storages as records.

    Args:
        obj: the state dict (any picklable object; tensors are found wherever they are).
        buffer_range: ``(start, end)`` addresses of a staging buffer; storages inside it become offset records.
        metadata: small json-able facts stored beside the checksums (e.g. ``step``).

    Raises:
        TypeError: an object in ``obj`` cannot be pickled; the message names its key path when known.
    """
    buf = io.BytesIO()
    pickler = _Pickler(buf, buffer_range)
    try:
        pickler.dump(obj)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise TypeError(f"cannot pickle the state dict: {_find_unpicklable(obj) or e}") from e
    key_paths = []
    for path, leaf in iter_leaves(obj):
        if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided:
            key = pickler.keys_by_cdata.get(leaf.untyped_storage()._cdata)
            if key is not None:
                key_paths.append((list(path), key))
    return PreparedCheckpoint(buf.getvalue(), pickler.records, key_paths, dict(metadata or {}))


def _find_unpicklable(obj: Any) -> str | None:
    for path, leaf in iter_leaves(obj):
        if isinstance(leaf, torch.Tensor):
            continue
        try:
            pickle.dumps(leaf, protocol=PICKLE_PROTOCOL)
        except Exception as e:  # noqa: BLE001 - we only look for the culprit's name
            return f"value at key '{path_str(path)}' of type {type(leaf).__qualname__}: {e}"
    return None


def write_file(path: str, prepared: PreparedCheckpoint, buffer: memoryview | None = None) -> dict:
    """Write ``prepared`` as a torch zip file at ``path`` (not fsynced); returns the checksum record written.

    Records with an ``offset`` are read from ``buffer`` (a staging buffer mapping); others from their storage or
    inline bytes. Each record is hashed from the same memory it is written from.

    Raises:
        OSError: the disk refused (ENOSPC, EFBIG, EACCES, ...), with its errno and ``path``.
    """
    try:
        # A Python file keeps the OS error (torch's own file writer reports any failure as "iostream error").
        with open(path, "wb") as stream:
            writer = torch._C.PyTorchFileWriter(stream, False, STORAGE_ALIGNMENT)
            try:
                return _write_records(writer, prepared, buffer)
            except BaseException:
                _finalize_quietly(writer)
                raise
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, path) from e
        raise


def _finalize_quietly(writer: torch._C.PyTorchFileWriter) -> None:
    """Mark a failed writer finalized: its destructor would otherwise retry the end record and std::terminate."""
    try:
        writer.write_end_of_file()
    except Exception:  # noqa: BLE001 - the first error is the one raised
        pass


def _write_records(writer: torch._C.PyTorchFileWriter, prepared: PreparedCheckpoint,
                   buffer: memoryview | None) -> dict:
    writer.write_record("data.pkl", prepared.data_pkl, len(prepared.data_pkl))
    writer.write_record(".format_version", "1", 1)
    writer.write_record(".storage_alignment", str(STORAGE_ALIGNMENT), len(str(STORAGE_ALIGNMENT)))
    sums = {}
    for rec in prepared.records:
        data = _record_bytes(rec, buffer)
        sums[rec.key] = {"nbytes": rec.nbytes, "xxh3": checksum(data)}
        if isinstance(data, torch.UntypedStorage):
            writer.write_record(f"data/{rec.key}", data, rec.nbytes)
        else:
            writer.write_record(f"data/{rec.key}", bytes(data) if rec.nbytes == 0 else data, rec.nbytes)
    record = {
        "format": FORMAT_VERSION,
        "data_pkl_xxh3": checksum(prepared.data_pkl),
        "records": sums,
        "key_paths": prepared.key_paths,
        "metadata": prepared.metadata,
    }
    payload = json.dumps(record).encode()
    writer.write_record(CHECKSUM_RECORD, payload, len(payload))
    writer.write_end_of_file()
    return record


def _record_bytes(rec: Record, buffer: memoryview | None) -> Any:
    if rec.inline is not None:
        return rec.inline
    if rec.offset is not None:
        if buffer is None:
            raise ValueError(f"record {rec.key} points into a staging buffer but none was given")
        if rec.nbytes == 0:
            return b""
        return torch.frombuffer(buffer, dtype=torch.uint8, count=rec.nbytes, offset=rec.offset).untyped_storage()
    storage = rec.storage
    if storage.device.type != "cpu":
        storage = storage.cpu()
    return storage if rec.nbytes else b""


def read_checksum_record(path: str) -> dict | None:
    """The checksum record of a checkpoint file, or None for a plain ``torch.save`` file without one."""
    reader = torch._C.PyTorchFileReader(path)
    if not reader.has_record(CHECKSUM_RECORD):
        return None
    return json.loads(bytes(reader.get_record(CHECKSUM_RECORD)))
