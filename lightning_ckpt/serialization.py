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
import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch._utils import _rebuild_tensor_v2
from torch.serialization import location_tag, normalize_storage_type

from lightning_ckpt import torch_zip
from lightning_ckpt.checkpoint_file import PreparedCheckpoint, Record
from lightning_ckpt.tree import Tree, flatten, iter_leaves, path_str

PICKLE_PROTOCOL = 2  # torch.save's default; keeps files loadable by every torch that reads the zip format


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


@dataclass
class StorageLayout:
    """Tensors known to be plain views of a few storages (what staging made), or to stand for such views (the owned
    small tensors a synchronous write copied into runs), so that pickling one of them needs no per-tensor storage
    work: its reduction is written directly, naming its storage's precomputed persistent id.

    Attributes:
        storages: one tensor per storage, covering it whole (its dtype is the storage's).
        members: ``id(tensor) -> (storage index, storage offset in elements, shape tuple)`` for every such
            tensor; each is of that dtype, ``pickles_as_view`` and alive while pickling (its strides are its own).
    """

    storages: list[torch.Tensor]
    members: dict[int, tuple[int, int, tuple]]


def pickles_as_view(t: torch.Tensor) -> bool:
    """Whether ``torch.save`` writes ``t`` as a bare view of its storage (``_rebuild_tensor_v2`` without metadata): a
    plain ``torch.Tensor`` without requires_grad, Python state or conj/neg bit. Only such tensors may be members of a
    ``StorageLayout``; any other goes through torch's own reduction: in a synchronous write the caller's tensor, in a
    staged one its copy made the same kind of tensor (``as_kind_of``), so both write what torch.save does."""
    return type(t) is _TENSOR and not (t.requires_grad or t.__dict__ or _tensor_metadata(t))


_TENSOR = torch.Tensor
_tensor_metadata = torch._C._get_tensor_metadata  # what torch.save writes beside a tensor: its conj/neg bits


def has_bits(t: torch.Tensor) -> bool:
    """Whether ``t`` has a conj or neg bit (written by ``torch.save`` beside its bytes)."""
    return bool(_tensor_metadata(t))


def raw_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its conj/neg bits: a view of the same bytes, which is what staging copies (``torch.save`` too
    writes the bytes as they are, with the bits beside them)."""
    if t.is_conj():
        t = t.conj()
    if t.is_neg():
        t = torch._neg_view(t)
    return t


def as_kind_of(copy: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """A new tensor on ``copy``'s memory (staging's copy of ``leaf``'s raw bytes) that is the kind of tensor ``leaf``
    is, as ``torch.load`` rebuilds it: its type (``nn.Parameter``, a subclass), requires_grad, conj/neg bits and
    Python state (attributes shared with ``leaf``, as a shallow copy)."""
    out = torch.Tensor._make_subclass(type(leaf), copy, leaf.requires_grad)
    metadata = torch._utils.get_tensor_metadata(leaf)
    if metadata:
        torch._utils.set_tensor_metadata(out, metadata)
    state = torch._utils._get_obj_state(leaf)
    if state:
        torch._utils._set_obj_state(out, state)
    return out


class _StorageRef:
    """Stands for one storage of a ``StorageLayout`` in a tensor's reduction; pickled as its persistent id."""

    __slots__ = ("pid",)

    def __init__(self, pid: tuple) -> None:
        self.pid = pid


_NOT_STORAGE = frozenset({str, int, float, bool, type(None), bytes, dict, list, tuple, torch.Size, torch.dtype,
                          torch.Tensor, torch.nn.Parameter, OrderedDict, type, types.FunctionType,
                          types.BuiltinFunctionType})
_EMPTY_ORDERED_DICT = (OrderedDict, ())  # a tensor's backward hooks, as torch.save writes them (a fresh one each)


class _Pickler(pickle.Pickler):
    """``torch.save``'s pickling of storages as persistent ids, recording each storage instead of writing it."""

    def __init__(self, buf: io.BytesIO, buffer_range: tuple[int, int] | None,
                 layout: StorageLayout | None = None) -> None:
        super().__init__(buf, protocol=PICKLE_PROTOCOL)
        self.records: list[Record] = []
        self.keys_by_cdata: dict[int, str] = {}
        self._dtypes: dict[int, torch.dtype] = {}
        self._range = buffer_range
        self.layout = layout
        self.layout_keys: list[str] = []
        self._refs: list[_StorageRef | None] = [self._ref(base) for base in layout.storages] if layout else []
        self._members = layout.members if layout else {}
        self._tuples: dict[tuple, tuple] = {}  # one object per distinct shape or stride: pickled once, then memo hits

    def _ref(self, base: torch.Tensor) -> _StorageRef | None:
        """The persistent id of a layout storage, as ``persistent_id`` would give its ``TypedStorage``."""
        storage = base.untyped_storage()
        key = self.keys_by_cdata[storage._cdata] = str(len(self.keys_by_cdata))
        self.layout_keys.append(key)
        self.records.append(self._record(key, storage))
        if base.dtype in torch.storage._new_dtypes():  # pickled as untyped storages: left to torch's reduction
            return None
        self._dtypes[storage.data_ptr()] = base.dtype
        typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=base.dtype, _internal=True)
        return _StorageRef(("storage", getattr(torch, typed._pickle_storage_type()), key, location_tag(storage),
                            typed._size()))

    def reducer_override(self, obj: Any) -> Any:
        member = self._members.get(id(obj))
        if member is None:
            if type(obj) is OrderedDict and not obj and not obj.__dict__:
                return _EMPTY_ORDERED_DICT  # skips the generic reduction (copyreg's slot lookup on every call)
            return NotImplemented
        ref = self._refs[member[0]]
        if ref is None:
            return NotImplemented
        # What torch's Tensor.__reduce_ex__ gives a plain CPU tensor, without building its TypedStorage.
        tuples = self._tuples
        shape = member[2]
        stride = obj.stride()
        return _rebuild_tensor_v2, (ref, member[1], tuples.setdefault(shape, shape), tuples.setdefault(stride, stride),
                                    obj.requires_grad, OrderedDict())

    def persistent_id(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is _StorageRef:
            return obj.pid
        if kind in _NOT_STORAGE:  # called for every object pickled: answer the common ones at once
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


def prepare(obj: Any, buffer_range: tuple[int, int] | None = None, metadata: dict | None = None, *,
            layout: StorageLayout | None = None, tree: Tree | None = None) -> PreparedCheckpoint:
    """Pickle ``obj`` like ``torch.save`` and list its storages as records.

    Args:
        obj: the state dict (any picklable object; tensors are found wherever they are).
        buffer_range: ``(start, end)`` addresses of a staging buffer; storages inside it become offset records.
        metadata: small json-able facts stored beside the checksums (e.g. ``step``).
        layout: tensors of ``obj`` known to be views of a few storages (staging's), pickled without per-tensor
            storage work; their storages come first among the records.
        tree: ``flatten(obj, paths=True)`` when the caller has it (saves a walk).

    Raises:
        TypeError: an object in ``obj`` cannot be pickled; the message names its key path when known.
    """
    buf = io.BytesIO()
    pickler = _Pickler(buf, buffer_range, layout)
    try:
        pickler.dump(obj)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise TypeError(f"cannot pickle the state dict: {_find_unpicklable(obj) or e}") from e
    tree = tree if tree is not None else flatten(obj, paths=True)
    return PreparedCheckpoint(buf.getvalue(), pickler.records, _key_paths(tree, pickler), dict(metadata or {}))


def _key_paths(tree: Tree, pickler: _Pickler) -> list[tuple[tuple, str]]:
    """``(key path, record key)`` of every tensor leaf whose storage was recorded."""
    members, layout_keys, keys_by_cdata = pickler._members, pickler.layout_keys, pickler.keys_by_cdata
    key_paths = []
    for path, leaf in zip(tree.paths, tree.leaves):
        member = members.get(id(leaf))
        if member is not None:
            key_paths.append((path, layout_keys[member[0]]))  # tuples: written as JSON lists
        elif isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided:
            key = keys_by_cdata.get(leaf.untyped_storage()._cdata)
            if key is not None:
                key_paths.append((path, key))
    return key_paths


def _find_unpicklable(obj: Any) -> str | None:
    for path, leaf in iter_leaves(obj):
        if isinstance(leaf, torch.Tensor):
            continue
        try:
            pickle.dumps(leaf, protocol=PICKLE_PROTOCOL)
        except Exception as e:  # noqa: BLE001 - we only look for the culprit's name
            return f"value at key '{path_str(path)}' of type {type(leaf).__qualname__}: {e}"
    return None
