"""A partial read's targets: checks and fills a user's ``state_dict`` from the loaded state, materializing leaves."""

from __future__ import annotations

import itertools
from typing import Any, Callable

import torch

from lightning_ckpt.tree import is_namedtuple, iter_leaves, json_key, path_str
from lightning_ckpt.verification import ChecksumRecord, copy_out_of_mapping, verify_tensor


def make_materializer(map_location: Any, locations: dict[int, str], mapped: bool) -> Callable[[Any], Any]:
    """Turns a loaded subtree into what the read returns: each storage restored as ``torch.load`` restores it
    (``map_location`` given the saved location), never left on the file mapping; type, ``requires_grad`` and
    attributes of each tensor kept (``copy_out_of_mapping``).

    Args:
        map_location: as in ``torch.load``.
        locations: the saved location of each loaded storage, by ``_cdata`` (absent: ``"cpu"``).
        mapped: whether the loaded storages may lie on the file's mapping (``torch.load(mmap=True)``).

    Returns:
        ``fill_targets``'s ``materialize``: one function for the whole read, so that tied storages stay tied.
    """
    restore = torch.serialization._get_restore_location(map_location)

    def relocate(storage: torch.UntypedStorage) -> torch.UntypedStorage:
        out = restore(storage, locations.get(storage._cdata, "cpu"))
        if mapped and out.device.type == "cpu" and out.data_ptr() == storage.data_ptr():
            return None  # still the file's mapping: copy_out_of_mapping copies it
        return out

    memo: dict = {}  # a storage under two requested keys (tied weights) stays one storage
    return lambda obj: copy_out_of_mapping(obj, relocate=relocate, memo=memo)


_ABSENT = object()


def fill_targets(target: Any, loaded: Any, path: str, record: ChecksumRecord | None,
                 materialize: Callable[[Any], Any] | None = None) -> list[str]:
    """Fill the requested leaves of ``target`` from ``loaded``, as torch's ``_experimental`` reader does; returns
    the key paths ``loaded`` lacks.

    Dicts keep their object and are filled key by key; lists are filled in place item by item (the file's items
    past the target's end are added) and tuples rebuilt; a target tensor is filled with ``copy_`` (unless its
    memory was read into already). Other leaves are replaced by ``materialize(loaded leaf)`` (None: as loaded,
    for tensors in memory of their own).

    Args:
        target: the requested ``state_dict``, filled in place.
        loaded: what the file holds (at least the requested leaves).
        path: the file, named in errors.
        record: the file's checksum record: each requested tensor is checked once (None: unverified).
        materialize: see above (``make_materializer``).

    Returns:
        The key paths of ``target`` that ``loaded`` lacks.

    Raises:
        RuntimeError: a target tensor whose size or dtype differs from the file's, or whose value in the file is
            not a tensor (names the key and both), before any target is written.
        CorruptCheckpointError: a checksum mismatch.
    """
    _check_targets(target, loaded, ())
    by_key_path = record.by_key_path if record is not None else {}
    missing: list[str] = []
    checked: set[str] = set()

    def check(key_path: tuple, tensor: torch.Tensor) -> None:
        key = by_key_path.get(key_path)
        if key is not None and key not in checked:
            verify_tensor(path, tensor, record, key)
            checked.add(key)

    def take(src: Any, prefix: tuple) -> Any:
        if record is not None:
            for sub_path, leaf in iter_leaves(src, prefix):
                if isinstance(leaf, torch.Tensor):
                    check(sub_path, leaf)
        return src if materialize is None else materialize(src)

    def visit(dst: Any, src: Any, prefix: tuple) -> Any:
        if isinstance(dst, dict):
            if not isinstance(src, dict):
                missing.append(path_str(prefix))
                return dst
            for k in list(dst):
                child = prefix + (json_key(k),)
                if k not in src:
                    missing.append(path_str(child))
                else:
                    dst[k] = visit(dst[k], src[k], child)
            return dst
        if isinstance(dst, (list, tuple)) and isinstance(src, (list, tuple)):
            items = []
            for i, (d, s) in enumerate(itertools.zip_longest(dst, src, fillvalue=_ABSENT)):
                if s is _ABSENT:
                    missing.append(path_str(prefix + (i,)))
                    items.append(d)
                else:
                    items.append(take(s, prefix + (i,)) if d is _ABSENT else visit(d, s, prefix + (i,)))
            return _same_sequence(dst, items)
        if isinstance(dst, torch.Tensor):  # _check_targets: src is a tensor of its size and dtype
            check(prefix, src)
            if dst.untyped_storage().data_ptr() != src.untyped_storage().data_ptr():  # equal: read into in place
                with torch.no_grad():
                    dst.copy_(src)
            return dst
        return take(src, prefix)

    visit(target, loaded, ())
    return missing


def _check_targets(dst: Any, src: Any, prefix: tuple) -> None:
    """Raise RuntimeError, as torch's reader does, for a target tensor the file's value cannot fill in place."""
    if isinstance(dst, dict):
        if isinstance(src, dict):
            for k, v in dst.items():
                if k in src:
                    _check_targets(v, src[k], prefix + (json_key(k),))
    elif isinstance(dst, (list, tuple)):
        if isinstance(src, (list, tuple)):
            for i, (d, s) in enumerate(zip(dst, src)):
                _check_targets(d, s, prefix + (i,))
    elif isinstance(dst, torch.Tensor):
        key = path_str(prefix)
        if not isinstance(src, torch.Tensor):
            raise RuntimeError(f"Target value {key} is set to {type(dst)}, but source value is {type(src)}")
        if dst.size() != src.size() or dst.dtype != src.dtype:
            raise RuntimeError(f"Target tensor size={dst.size()} dtype={dst.dtype} does not match source tensor "
                               f"size={src.size()} dtype={src.dtype} for key {key}")


def _same_sequence(template: list | tuple, items: list) -> list | tuple:
    """``items`` in ``template``'s container: a list filled in place, a tuple (or namedtuple) rebuilt."""
    if isinstance(template, list):
        template[:] = items
        return template
    if is_namedtuple(template):
        return type(template)(*items)
    return tuple(items) if type(template) is tuple else type(template)(items)
