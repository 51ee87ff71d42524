"""Lightning's FSDP and ModelParallel strategies with sharded checkpoints committed and verified by lightning_ckpt."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import FSDPStrategy as _LightningFSDPStrategy
from lightning.pytorch.strategies import ModelParallelStrategy as _LightningModelParallelStrategy
from typing_extensions import override

from lightning_ckpt.dcp.checkpointer import DistributedCheckpointer
from lightning_ckpt.dcp.failures import unwrapped_failures
from lightning_ckpt.dcp.manifest import open_checkpoint_dir, read_manifest, verify_bytes
from lightning_ckpt.dcp.storage_reader import StorageReader
from lightning_ckpt.dcp.storage_writer import StorageWriter
from lightning_ckpt.errors import (
    CheckpointError, CheckpointTimeoutError, IncompleteCheckpointError, rename_in_error,
)

log = logging.getLogger(__name__)


class _CommittedShards:
    """What both strategies share: removals, teardown and loads wait for the sharded save in flight, and a
    sharded load is verified (``_verified_reads`` routes Lightning's DCP reads to our reader)."""

    def remove_checkpoint(self, filepath: _PATH) -> None:
        _sharded_saves(self).wait()  # top-k removal and last.ckpt follow the commit of the saves before
        super().remove_checkpoint(filepath)

    def teardown(self) -> None:
        try:
            _sharded_saves(self).close()
        finally:
            super().teardown()

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        _sharded_saves(self).wait()
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():
            return super().load_checkpoint(path, weights_only)
        with pinned_directory(path) as pinned, _errors_naming(path, pinned):
            try:
                verify_sharded(pinned)
                with unwrapped_failures(f"loading {path}", writing=False), self._verified_reads(), \
                        _own_pin_broadcast(self, pinned):
                    return super().load_checkpoint(pinned, weights_only)
            except (IncompleteCheckpointError, FileNotFoundError) as e:
                if _same_directory(path, pinned):
                    raise
                raise CheckpointError(
                    f"{path} was replaced by another save while it was being loaded, and the version this load "
                    f"began with was removed before all of it was read ({e}); no pass read the newer version: "
                    "load it again") from e


class FSDPStrategy(_CommittedShards, _LightningFSDPStrategy):
    """Lightning's ``FSDPStrategy`` whose sharded checkpoints (``state_dict_type="sharded"``) are ours.

    Accepts every argument of its parent. Only the sharded branches of ``save_checkpoint`` and
    ``load_checkpoint`` differ: every rank writes its shards through ``lightning_ckpt.dcp.StorageWriter``, and
    Lightning's ``meta.pt`` (the non-tensor state) joins the same atomic commit, so a checkpoint directory is
    complete or absent (an overwrite never leaves a torn one) and every chunk is checksummed. Loading verifies
    the manifest, ``meta.pt`` and every chunk read, then runs Lightning's own loading code. Full state dicts
    (``state_dict_type="full"``) go through the CheckpointIO plugin as before.
    Use it as ``Trainer(strategy=FSDPStrategy(...), plugins=[AsyncCheckpointIO()])``: with our
    ``AsyncCheckpointIO`` the sharded saves are asynchronous too (see ``ShardedSaves``).
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH,
                        storage_options: Optional[Any] = None) -> None:
        if self._state_dict_type != "sharded":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        _refuse_storage_options(self, storage_options)
        _sharded_saves(self).save(self, checkpoint, filepath, model_key="model")

    @contextlib.contextmanager
    def _verified_reads(self) -> Iterator[None]:
        import lightning.pytorch.strategies.fsdp as fsdp_module
        import torch.distributed.checkpoint as dcp_module

        with _routed(fsdp_module, "_distributed_checkpoint_load", load_verified), \
                _routed(dcp_module, "FileSystemReader", StorageReader):  # the optimizer's reader
            yield


class ModelParallelStrategy(_CommittedShards, _LightningModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` whose distributed checkpoints (the default,
    ``save_distributed_checkpoint=True``) are ours: atomic, checksummed, verified on load (see ``FSDPStrategy``).

    Accepts every argument of its parent; only the distributed branches of ``save_checkpoint`` and
    ``load_checkpoint`` differ (plus waiting for an async save in ``remove_checkpoint`` and ``teardown``). Use it
    as ``Trainer(strategy=ModelParallelStrategy(...), plugins=[AsyncCheckpointIO()])``.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH,
                        storage_options: Optional[Any] = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        _refuse_storage_options(self, storage_options)
        _sharded_saves(self).save(self, checkpoint, filepath, model_key="state_dict")

    @contextlib.contextmanager
    def _verified_reads(self) -> Iterator[None]:
        import lightning.fabric.strategies.model_parallel as model_parallel_module

        with _routed(model_parallel_module, "_distributed_checkpoint_load", load_verified):
            yield


class ShardedSaves:
    """A strategy's sharded saves: Lightning's checkpoint dict as one committed DCP directory, the model and
    optimizer shards from every rank and ``meta.pt`` (everything else) from global rank 0, in one commit.

    Synchronous, unless the strategy's CheckpointIO is our ``AsyncCheckpointIO`` and the trainer is fitting: then
    ``save`` returns once DCP planned (on the training thread) and the local shards are staged into reused shared
    memory; each rank's persistent writer process writes them, and the commit runs on a background thread whose
    collectives use a dedicated gloo group (``DistributedCheckpointer.async_save``, ``AsyncShardedSaver``). One
    save is in flight; the next save, a load, a removal and teardown wait for it, and raise its error (on every
    rank, once). Teardown also stops the writer processes and frees the staging buffers (restarted by the next
    save).

    Args:
        timeout_secs: how long a wait for the save in flight may take.
    """

    def __init__(self, timeout_secs: float = 3600.0) -> None:
        self.timeout_secs = timeout_secs
        self._checkpointer: DistributedCheckpointer | None = None
        self._pending: Future | None = None

    def save(self, strategy: Any, checkpoint: dict[str, Any], filepath: _PATH, model_key: str) -> None:
        """Save (every rank calls).

        Raises:
            CheckpointError: this or the previous save failed on a rank or in the commit, naming the rank; nothing
                changed at the path of the failed save.
        """
        self.wait()
        path = Path(strategy.broadcast(filepath))
        state = {model_key: checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        writer = StorageWriter(path)
        if strategy.global_rank == 0:
            meta = io.BytesIO()
            torch.save(checkpoint, meta)
            writer.add_file(_METADATA_FILENAME, meta.getvalue())
        if not _saves_async(strategy):
            DistributedCheckpointer(writer).save(state)
            return
        if self._checkpointer is None:
            self._checkpointer = DistributedCheckpointer(writer, timeout_secs=self.timeout_secs)
        self._checkpointer.storage_writer = writer
        self._pending = self._checkpointer.async_save(state)

    def wait(self) -> None:
        """Wait for the save in flight; raise its error once.

        Raises:
            CheckpointTimeoutError: it did not finish within ``timeout_secs``.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result(timeout=self.timeout_secs)
        except FutureTimeoutError as e:
            raise CheckpointTimeoutError(f"the async sharded save did not finish within {self.timeout_secs}s") from e

    def close(self) -> None:
        """Wait for the save in flight, then free the background thread and group (restarted by the next save)."""
        try:
            self.wait()
        finally:
            checkpointer, self._checkpointer = self._checkpointer, None
            if checkpointer is not None:
                checkpointer.close()


def _sharded_saves(strategy: Any) -> ShardedSaves:
    saves = strategy.__dict__.get("_lightning_ckpt_saves")
    if saves is None:
        saves = strategy.__dict__["_lightning_ckpt_saves"] = ShardedSaves()
    return saves


def _saves_async(strategy: Any) -> bool:
    """Async with our AsyncCheckpointIO, and only while fitting: a save outside the training loop (a user's
    ``trainer.save_checkpoint`` after ``fit``) returns once committed, so whoever sees it return may read it."""
    from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

    from lightning_ckpt.lightning.async_io import AsyncCheckpointIO
    from lightning_ckpt.lightning.binding import find_plugin

    module = strategy.lightning_module
    trainer = getattr(module, "_trainer", None) if module is not None else None
    fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING and \
        trainer.state.status == TrainerStatus.RUNNING
    return fitting and isinstance(find_plugin(strategy), AsyncCheckpointIO)


@contextlib.contextmanager
def pinned_directory(path: Path) -> Iterator[Path]:
    """``path`` as the one version of the checkpoint directory there now, for the whole of a load.

    Lightning reads a sharded checkpoint in several passes by path (the model's shards, each optimizer's, then
    ``meta.pt``); a save committing over ``path`` between two of them (it exchanges the directory) would give a
    model of one save and an optimizer and loop state of another. The directory is opened once here and every
    pass reads through ``/proc/self/fd/<fd>``, which resolves to that directory whatever is at ``path`` later; a
    file of the replaced version already removed is then missing (an error), never another save's. Without
    ``/proc`` the path itself is used.

    Raises:
        FileNotFoundError: nothing at ``path``.
        IncompleteCheckpointError: ``path`` is not a directory.
    """
    fd = open_checkpoint_dir(os.fspath(path))
    try:
        held = Path(f"/proc/self/fd/{fd}")
        yield held if held.is_dir() else path
    finally:
        os.close(fd)


@contextlib.contextmanager
def _errors_naming(path: Path, pinned: Path) -> Iterator[None]:
    """An error raised in the block names ``path``, the directory the user gave, where it named a pin of it
    (``/proc/self/fd/<fd>`` means nothing to the user and is gone once the load ends). Every rank pins the same
    ``path`` (rank 0's, broadcast) with its own descriptor, and a failure gathered from another rank names that
    rank's: this rank's pin, and any descriptor path with a file name under it (so a directory's), are this
    checkpoint's; a descriptor path of a file stays as it is."""
    try:
        yield
    except BaseException as e:
        if pinned != path:
            pins = re.compile(re.escape(os.fspath(pinned)) + r"(?![0-9])|/proc/self/fd/[0-9]+(?=/)")
            rename_in_error(e, pins, os.fspath(path))
        raise


def _same_directory(path: Path, pinned: Path) -> bool:
    try:
        now, held = os.stat(path), os.stat(pinned)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


@contextlib.contextmanager
def _own_pin_broadcast(strategy: Any, pinned: Path) -> Iterator[None]:
    """Lightning's load broadcasts the path it was given from rank 0; each rank's pin is its own descriptor, so
    broadcasting it still runs (the ranks stay in step) but gives every rank back its own."""
    broadcast = strategy.broadcast

    def own_pin(obj: Any, src: int = 0) -> Any:
        out = broadcast(obj, src)
        return pinned if obj == pinned else out

    strategy.broadcast = own_pin
    try:
        yield
    finally:
        del strategy.broadcast


def verify_sharded(path: Path) -> None:
    """Refuse an uncommitted directory and check ``meta.pt`` against the manifest before Lightning reads it.

    Raises:
        IncompleteCheckpointError: no manifest (never committed, or saved by the stock strategy).
        CorruptCheckpointError: ``meta.pt`` does not match its checksum.
    """
    manifest = read_manifest(os.fspath(path))
    meta_path = path / _METADATA_FILENAME
    data = meta_path.read_bytes()
    verify_bytes(os.fspath(meta_path), _METADATA_FILENAME, data,
                 manifest["files"].get(_METADATA_FILENAME, {}).get("xxh3"))


def load_verified(state: dict[str, Any], path: Path) -> None:
    """Lightning's ``_distributed_checkpoint_load``, through our verifying reader."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, storage_reader=StorageReader(path))


@contextlib.contextmanager
def _routed(module: Any, name: str, replacement: Any) -> Iterator[None]:
    """While Lightning's loading code runs (main thread), its DCP read ``module.name`` is ours."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def _refuse_storage_options(strategy: Any, storage_options: Any) -> None:
    if storage_options is not None:
        raise TypeError(f"`{type(strategy).__name__}.save_checkpoint(..., storage_options=...)` is not supported "
                        "for sharded checkpoints (they are written by every rank, not by the CheckpointIO plugin)")
