"""Unpickles a torch zip's ``data.pkl`` onto storages allocated beforehand, as ``torch.load`` does but per tensor cheaper."""

from __future__ import annotations

import io
import pickle
from typing import Any, Callable

import torch
from torch import _weights_only_unpickler as _wo
from torch.serialization import StorageType

_CPU = "cpu"


class Refused(Exception):
    """What this unpickler will not do itself (a global outside the weights-only allowlist, a storage that
    ``map_location`` would move off the CPU): the caller falls back to ``torch.load``, whose messages and rules
    then apply unchanged."""


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: tuple, stride: tuple, requires_grad: bool,
                       backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` without its fake-tensor-mode probe (a pytree walk per tensor)."""
    t = torch.empty(0, dtype=storage.dtype, device=storage._untyped_storage.device)
    t.set_(storage._untyped_storage, storage_offset, size, stride)
    if requires_grad:
        t.requires_grad = True
    if metadata:
        torch._utils.set_tensor_metadata(t, metadata)
    if backward_hooks:
        t._backward_hooks = backward_hooks
    return t


_REPLACED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2}


class _Unpickler(pickle.Unpickler):
    """The C unpickler with ``torch.load``'s storage persistent ids; with ``allowed``, only those globals resolve
    (the weights-only allowlist, the same names ``torch.load(weights_only=True)`` accepts)."""

    def __init__(self, data: bytes, storage: Callable[[Any, str, str, int], Any], allowed: dict | None) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._storage = storage
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.tensor":  # torch.load's mapping of an old module path
            module = "torch._tensor"
        replaced = _REPLACED.get((module, name))
        if replaced is not None:
            return replaced
        if type(name) is str and "Storage" in name:
            try:
                return StorageType(name)
            except KeyError:
                pass
        if self._allowed is not None:
            found = self._allowed.get(f"{module}.{name}")
            if found is None:
                raise Refused(f"{module}.{name} is not an allowed global")
            return found
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and _ascii(pid[0]) == "storage"):
            raise Refused(f"unknown persistent id {pid!r:.100}")
        _, storage_type, key, location, numel = pid
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        return self._storage(dtype, _ascii(key), _ascii(location), numel)


def _ascii(v: Any) -> Any:
    return v.decode("ascii") if isinstance(v, bytes) else v


def allowed_globals() -> dict[str, Any]:
    """The globals ``torch.load(weights_only=True)`` resolves: torch's allowlist plus ``add_safe_globals``."""
    return {**_wo._get_allowed_globals(), **_wo._get_user_allowed_globals()}


def unpickle(data_pkl: bytes, storages: dict[str, torch.UntypedStorage], weights_only: bool,
             meta_keys: frozenset[str] = frozenset()) -> Any:
    """The object of ``data_pkl`` with every storage id resolved to ``storages[key]`` (CPU).

    Args:
        data_pkl: the pickle bytes.
        storages: the storages, already allocated (their bytes may still be arriving).
        weights_only: resolve only the globals ``torch.load(weights_only=True)`` allows.
        meta_keys: storages not read (a partial read): their tensors are built on the meta device, with no bytes.

    Raises:
        Refused: something only ``torch.load`` handles (the caller falls back to it).
    """
    typed: dict[str, Any] = {}

    def storage(dtype: torch.dtype, key: str, location: str, numel: int) -> Any:
        found = typed.get(key)
        if found is not None:
            return found
        if key in meta_keys:
            untyped = torch.UntypedStorage(numel * torch._utils._element_size(dtype), device="meta")
        elif location != _CPU or key not in storages:
            raise Refused(f"storage {key} at {location}")
        else:
            untyped = storages[key]
        found = typed[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return found

    unpickler = _Unpickler(data_pkl, storage, allowed_globals() if weights_only else None)
    result = unpickler.load()
    torch._utils._validate_loaded_sparse_tensors()
    return result
