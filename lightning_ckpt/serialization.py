"""The bytes format: a plain ``torch.save`` zip plus a checksum record, written from staged or live storages.

The main process pickles the state dict exactly as ``torch.save`` does (same persistent ids, so ``torch.load`` and
``weights_only`` loading work unchanged) but without touching tensor bytes; each storage becomes a record that is
later written straight from its memory (a staging buffer or a live tensor). The writer therefore never unpickles
user objects and never imports user code.
"""

from __future__ import annotations

import ctypes
import io
import pickle
from typing import Any, Iterator

import torch
from torch.serialization import location_tag, normalize_storage_type

from lightning_ckpt import torch_zip
from lightning_ckpt.checkpoint_file import PreparedCheckpoint, Record

PICKLE_PROTOCOL = 2  # torch.save's default; keeps files loadable by every torch that reads the zip format
KeyPath = tuple  # path of a leaf inside nested dicts/lists, e.g. ("state_dict", "layer.weight")


def for_transfer(prepared: PreparedCheckpoint) -> PreparedCheckpoint:
    """A copy without live storages, fit to pickle through the pipe (buffer records keep their offsets)."""
    records = []
    for r in prepared.records:
        inline = r.inline
        if r.offset is None and r.storage is not None:
            inline = bytes(storage_view(r.storage.cpu())) if r.nbytes else b""
        elif isinstance(inline, memoryview):
            inline = bytes(inline)
        records.append(Record(r.key, r.nbytes, r.location, r.offset, None, inline))
    return PreparedCheckpoint(prepared.data_pkl, records, prepared.key_paths, prepared.metadata)


def resolve_storages(prepared: PreparedCheckpoint) -> PreparedCheckpoint:
    """Point each live-storage record at its bytes (copied to the CPU first if needed), for an in-process write."""
    for r in prepared.records:
        if r.offset is None and r.inline is None and r.storage is not None:
            if r.storage.device.type != "cpu":
                r.storage = r.storage.cpu()
            r.inline = storage_view(r.storage)
    return prepared


def path_str(path: KeyPath | list) -> str:
    return ".".join(str(p) for p in path)


def json_key(key: Any) -> Any:
    return key if isinstance(key, (str, int)) and not isinstance(key, bool) else repr(key)


def iter_leaves(obj: Any, prefix: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    """Yield ``(key_path, leaf)`` for every leaf of nested dicts, lists and tuples (depth first, in order)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_leaves(v, prefix + (json_key(k),))
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
    return torch_zip.checksum(data)


_NOT_STORAGE = frozenset({str, int, float, bool, type(None), bytes, dict, list, tuple, torch.Size, torch.dtype})


class _Pickler(pickle.Pickler):
    """``torch.save``'s pickling of storages as persistent ids, recording each storage instead of writing it."""

    def __init__(self, buf: io.BytesIO, buffer_range: tuple[int, int] | None) -> None:
        super().__init__(buf, protocol=PICKLE_PROTOCOL)
        self.records: list[Record] = []
        self.keys_by_cdata: dict[int, str] = {}
        self._dtypes: dict[int, torch.dtype] = {}
        self._range = buffer_range

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) in _NOT_STORAGE:  # called for every object pickled: answer the common ones at once
            return None
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
