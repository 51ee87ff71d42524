"""A CPU load without ``torch.load``: which storages to read and check, read in parallel while the pickle loads."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections import Counter
from typing import Any

import torch

from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.read_engine import Check, ReadStats, StorageReader
from lightning_ckpt.tree import iter_leaves, json_key
from lightning_ckpt.torch_unpickle import unpickle
from lightning_ckpt.verification import ChecksumRecord, OpenedFile

log = logging.getLogger(__name__)

READ_TIMEOUT_SECS = 3600.0  # one load's reads; far above any disk's time for a checkpoint that fits in memory
_TRUE_VALUES = ("1", "y", "yes", "true")  # what torch.load takes as a set environment override


def resolve_weights_only(weights_only: bool | None) -> bool:
    """``weights_only`` as ``torch.load`` (torch 2.13, ``torch/serialization.py``) decides it: None is True
    (False in fbcode builds); ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` set to 1/y/yes/true forces True even over an
    explicit False; ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` so set makes an unset ``weights_only`` False (warned).

    Raises:
        RuntimeError: both variables set, as ``torch.load`` raises.
    """
    not_set = weights_only is None
    if not_set:
        weights_only = hasattr(torch.version, "git_version")  # torch's _default_to_weights_only(pickle_module=None)
    force = os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in _TRUE_VALUES
    force_no = os.getenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in _TRUE_VALUES
    if force and force_no:
        raise RuntimeError("Only one of `TORCH_FORCE_WEIGHTS_ONLY_LOAD` or `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` "
                           "should be set, but both were set.")
    if force:
        return True
    if force_no and not_set:
        warnings.warn("Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD detected, since the `weights_only` "
                      "argument was not explicitly passed, forcing weights_only=False.", UserWarning, stacklevel=3)
        return False
    return bool(weights_only)


def load_storages(opened: OpenedFile, record: ChecksumRecord | None, state_dict: dict | None,
                  weights_only: bool | None, threads: int) -> tuple[Any, ReadStats] | None:
    """Load ``opened`` onto CPU storages read by ``StorageReader``; None where ``torch.load`` must do it instead.

    Args:
        opened: the file.
        record: its validated checksum record (None: read unverified).
        state_dict: for a partial read, the requested structure: only the storages its leaves reach are read
            (those of other keys become meta tensors, which the caller drops). Needs ``record`` (its key paths).
            A requested contiguous CPU tensor laid out exactly as the saved one is read into in place (no copy;
            after a checksum mismatch it holds the damaged bytes).
        weights_only: as in ``torch.load``, environment overrides included (``resolve_weights_only``).
        threads: reads in flight.

    Returns:
        ``(loaded object, stats)``, or None: not a zip this can read, a partial read without key paths, a foreign
        byte order, a storage saved off the CPU, a global outside the weights-only allowlist, or a pickle this
        unpickler refuses (``torch.load`` then gives its own result or error).

    Raises:
        CorruptCheckpointError: a checksum mismatch or a truncated record.
    """
    weights_only = resolve_weights_only(weights_only)
    spans = _spans(opened)
    if spans is None or (state_dict is not None and record is None):
        return None
    storage_spans = {name[len("data/"):]: span for name, span in spans.items() if name.startswith("data/")}
    wanted = storage_spans if state_dict is None else wanted_storages(state_dict, record, storage_spans)
    checks = [] if record is None else _checks(record, wanted)
    meta = frozenset(storage_spans.keys() - wanted.keys())
    into = {} if state_dict is None else _destinations(state_dict, record, wanted)
    reader = StorageReader(opened.fd, opened.path, wanted, checks, threads, destinations=into)
    if not into:
        reader.start()  # the reads run while the pickle loads
    try:
        data_pkl = opened.read_span(spans["data.pkl"])
        loaded = unpickle(data_pkl, reader.storages, weights_only, meta)
        if into:  # the targets' memory is only written once the file's tensors are known to match them
            if not _laid_out_as(loaded, state_dict, record, into):
                reader = StorageReader(opened.fd, opened.path, wanted, checks, threads)
                loaded = unpickle(data_pkl, reader.storages, weights_only, meta)
            reader.start()
    except Exception as e:  # noqa: BLE001 - any refusal or damage: torch.load says what is wrong, as before
        reader.cancel()
        log.debug("%s: loading through torch.load (%s: %s)", opened.path, type(e).__name__, e)
        return None
    except BaseException:  # KeyboardInterrupt: stop the reads before it propagates
        reader.cancel()
        raise
    try:
        stats = reader.finish(READ_TIMEOUT_SECS)
    except OSError as e:
        raise CorruptCheckpointError(f"corrupt checkpoint {opened.path}: {e}", path=opened.path) from e
    return loaded, stats


def _spans(opened: OpenedFile) -> dict[str, tuple[int, int]] | None:
    try:
        spans = opened.spans()
    except CorruptCheckpointError:
        return None  # not a zip of stored records (torch's legacy format, compressed records): torch.load decides
    if "data.pkl" not in spans:
        return None
    order = spans.get("byteorder")
    if order is not None and opened.read_span(order).strip() != sys.byteorder.encode():
        return None
    return spans


def wanted_storages(state_dict: dict, record: ChecksumRecord, storage_spans: dict) -> dict[str, tuple[int, int]]:
    """The storages a partial read needs: those under a requested leaf, and any that no key path reaches."""
    requested = set(_requested_paths(state_dict, ()))
    reached: set[str] = set()
    keep: set[str] = set()
    for key_path, key in record.by_key_path.items():
        reached.add(key)
        if any(key_path[:n] in requested for n in range(len(key_path) + 1)):
            keep.add(key)
    return {k: span for k, span in storage_spans.items() if k in keep or k not in reached}


def _requested_leaves(target: Any, prefix: tuple) -> Any:
    """``(key path, leaf)`` of the requested leaves, through dicts, lists and tuples (as
    ``partial_read.fill_targets`` fills them)."""
    if isinstance(target, dict):
        for k, v in target.items():
            yield from _requested_leaves(v, prefix + (json_key(k),))
    elif isinstance(target, (list, tuple)):
        for i, v in enumerate(target):
            yield from _requested_leaves(v, prefix + (i,))
    else:
        yield prefix, target


def _destinations(state_dict: dict, record: ChecksumRecord, wanted: dict) -> dict[str, torch.UntypedStorage]:
    """Storages of requested tensors that the file's bytes can be read into directly: contiguous CPU tensors that
    own their whole storage, of the recorded size, for storages reached by that one key path only; never a lazily
    conjugated or negated view (``is_conj``, ``is_neg``: its bytes are not its values) nor a wrapper subclass
    (its own dispatch: no bytes of its own). Those are filled by ``copy_``."""
    reached = Counter(record.by_key_path.values())
    into: dict[str, torch.UntypedStorage] = {}
    seen: set[int] = set()
    for key_path, dst in _requested_leaves(state_dict, ()):
        key = record.by_key_path.get(key_path)
        if (key is None or key not in wanted or reached[key] != 1 or not isinstance(dst, torch.Tensor)
                or dst.device.type != "cpu" or dst.layout != torch.strided or not dst.is_contiguous()
                or dst.storage_offset() != 0 or dst.is_conj() or dst.is_neg()
                or type(dst).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__):
            continue
        storage = dst.untyped_storage()
        if storage.nbytes() == wanted[key][1] == dst.numel() * dst.element_size() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())  # two requested tensors sharing memory: only the first is read into
            into[key] = storage
    return into


def _laid_out_as(loaded: Any, state_dict: dict, record: ChecksumRecord, into: dict) -> bool:
    """Whether every tensor built on a target's storage has that target's dtype, shape and strides."""
    targets = dict(_requested_leaves(state_dict, ()))
    for key_path, tensor in iter_leaves(loaded):
        key = record.by_key_path.get(key_path) if isinstance(tensor, torch.Tensor) else None
        if key in into:
            dst = targets.get(key_path)
            if not (isinstance(dst, torch.Tensor) and tensor.dtype == dst.dtype and tensor.shape == dst.shape
                    and tensor.stride() == dst.stride() and tensor.storage_offset() == 0):
                return False
    return True


def _requested_paths(target: Any, prefix: tuple) -> Any:
    """Key paths of what a partial read reads: dicts select their keys; a list or tuple is read whole
    (``partial_read.fill_targets`` fills the target's items and takes the file's items past the target's end, as
    torch's reader does)."""
    if not isinstance(target, dict):
        yield prefix
        return
    for k, v in target.items():
        yield from _requested_paths(v, prefix + (json_key(k),))


def _checks(record: ChecksumRecord, wanted: dict) -> list[Check]:
    """One check per recorded checksum of a wanted storage, named in errors by the key paths reaching it."""
    records, paths = record.records, record.paths_by_key
    return [Check(records[key].xxh3, [key], paths.get(key, [])) for key in wanted]
