"""``DistributedCheckpointer``: DCP's ``_Checkpointer`` API over our committing, verifying storage plugins."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlanner, SavePlanner
from torch.distributed.checkpoint.storage import StorageReader as _DCPStorageReader
from torch.distributed.checkpoint.storage import StorageWriter as _DCPStorageWriter

from lightning_ckpt.dcp.async_save import AsyncShardedSaver
from lightning_ckpt.dcp.failures import name_lost_ranks, unwrapped_failures
from lightning_ckpt.dcp.storage_reader import StorageReader
from lightning_ckpt.dcp.storage_writer import StorageWriter
from lightning_ckpt.errors import CheckpointTimeoutError

log = logging.getLogger(__name__)


class DistributedCheckpointer:
    """Saves and loads distributed state dicts with DCP (SPMD: every rank calls), like DCP's ``_Checkpointer``.

    Better than the PyTorch original: a path is enough (our ``StorageWriter``/``StorageReader`` by default, so
    checkpoints commit atomically and are verified on load); errors gathered from the ranks are raised as our
    own, on every rank, naming the failed rank; ``async_save`` plans and stages on the caller's thread (into
    reused shared memory), its bytes are written by a persistent writer process, and the collectives after the
    write run on a dedicated gloo group, never on the default group from a background thread; one save is in
    flight at a time and ``close`` joins it.

    Args:
        storage_writer: a DCP ``StorageWriter``, or a checkpoint path (our ``StorageWriter`` at that path).
        storage_reader: a DCP ``StorageReader``, a path, or None (our ``StorageReader`` at the writer's path).
        process_group: the group the ranks synchronise over (default: the default group).
        coordinator_rank: the rank that plans globally and commits.
        no_dist: save and load in this process alone (no collectives).
        load_planner: DCP load planner (default: DCP's).
        save_planner: DCP save planner (default: DCP's).
        timeout_secs: how long ``save``/``async_save``/``load``/``close`` wait for the async save in flight (past it
            they raise ``CheckpointTimeoutError`` and the save stays in flight: the next call waits again).
    """

    def __init__(self, storage_writer: _DCPStorageWriter | str | os.PathLike,
                 storage_reader: _DCPStorageReader | str | os.PathLike | None = None, *,
                 process_group: dist.ProcessGroup | None = None, coordinator_rank: int = 0, no_dist: bool = False,
                 load_planner: LoadPlanner | None = None, save_planner: SavePlanner | None = None,
                 timeout_secs: float = 3600.0) -> None:
        if isinstance(storage_writer, (str, os.PathLike)):
            storage_writer = StorageWriter(storage_writer)
        if storage_reader is None:
            storage_reader = getattr(storage_writer, "checkpoint_id", None)
            if storage_reader is None:
                raise ValueError("DistributedCheckpointer: storage_reader=None needs a writer with a checkpoint_id")
        self.storage_writer = storage_writer
        self._reader_arg = storage_reader
        self.process_group = process_group
        self.coordinator_rank = coordinator_rank
        self.no_dist = no_dist
        self.load_planner = load_planner
        self.save_planner = save_planner
        self.timeout_secs = timeout_secs
        self._executor: ThreadPoolExecutor | None = None
        self._async_group: dist.ProcessGroup | None = None
        self._pending: Future | None = None
        self._saver: AsyncShardedSaver | None = None
        self._lock = threading.Lock()

    @property
    def storage_reader(self) -> _DCPStorageReader:
        """The reader (built on first use when given as a path: the checkpoint may not exist yet)."""
        if isinstance(self._reader_arg, (str, os.PathLike)):
            self._reader_arg = StorageReader(self._reader_arg)
        return self._reader_arg

    def save(self, state_dict: dict[str, Any], *, checkpoint_id: str | os.PathLike | None = None) -> Metadata:
        """Save ``state_dict`` (every rank calls); returns DCP's metadata once the checkpoint is committed.

        Args:
            state_dict: this rank's state dict (DTensors and sharded tensors hold the local shards).
            checkpoint_id: save to this path instead of the writer's.

        Raises:
            CheckpointError: a rank or the commit failed, on every rank (its subclass and fields kept).
        """
        self._wait_pending()
        return self._save(state_dict, checkpoint_id, self.process_group)

    def _save(self, state_dict: dict[str, Any], checkpoint_id: Any, group: Any) -> Metadata:
        try:
            return self._dcp_save(state_dict, checkpoint_id, group)
        except BaseException as e:
            if isinstance(self.storage_writer, StorageWriter):
                self.storage_writer.abort()  # a failed rank left the coordinator's temp open
            lost = name_lost_ranks(e, "saving", str(checkpoint_id or self.storage_writer.checkpoint_id), group)
            if lost is e:
                raise
            raise lost from e

    def _dcp_save(self, state_dict: dict[str, Any], checkpoint_id: Any, group: Any) -> Metadata:
        with unwrapped_failures(f"saving {checkpoint_id or self.storage_writer.checkpoint_id}", writing=True):
            if self.coordinator_rank == 0:
                return dcp.save(state_dict, checkpoint_id=checkpoint_id, storage_writer=self.storage_writer,
                                planner=self.save_planner, process_group=group, no_dist=self.no_dist)
            if checkpoint_id is not None:
                self.storage_writer.reset(checkpoint_id)
            return dcp.state_dict_saver.save_state_dict(  # the public API that takes a coordinator
                state_dict, self.storage_writer, process_group=group, coordinator_rank=self.coordinator_rank,
                no_dist=self.no_dist, planner=self.save_planner)

    def async_save(self, state_dict: dict[str, Any], *, checkpoint_id: str | os.PathLike | None = None) -> Future:
        """Plan and stage ``state_dict`` now, write and commit it in the background; returns a future of the
        metadata (on every rank; a failure on any rank fails every rank's future, naming the rank).

        The caller may change the state as soon as this returns. The previous save is waited for first; if it
        failed and nobody read its future, its error is raised here (once) and this save does not start. With our
        ``StorageWriter``, DCP plans on this thread, the local shards are copied into lightning_ckpt's reused
        shared-memory staging and written by this rank's persistent writer process (``AsyncShardedSaver``);
        another storage writer is staged by DCP's stager and saved by a background thread on a gloo group.
        """
        self._wait_pending()
        if isinstance(self.storage_writer, StorageWriter) and not self.no_dist:
            if checkpoint_id is not None:
                self.storage_writer.reset(checkpoint_id)
            with self._lock:
                if self._saver is None:
                    self._saver = AsyncShardedSaver(self.process_group, self.coordinator_rank,
                                                    timeout_secs=self.timeout_secs)
            self._pending = _SaveFuture.following(self._saver.save(state_dict, self.storage_writer,
                                                                    self.save_planner))
            return self._pending
        return self._async_save_foreign(state_dict, checkpoint_id)

    def _async_save_foreign(self, state_dict: dict[str, Any], checkpoint_id: Any) -> Future:
        from torch.distributed.checkpoint.staging import BlockingAsyncStager

        group = self._background_group()
        staged = BlockingAsyncStager().stage(state_dict)
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_ckpt-dcp")
            self._pending = _SaveFuture.following(self._executor.submit(self._save, staged, checkpoint_id, group))
            return self._pending

    def _background_group(self) -> dist.ProcessGroup | None:
        """A gloo group of the same ranks for saves in the background (created on the caller's thread)."""
        if self.no_dist or not dist.is_initialized():
            return None
        if self._async_group is None:
            ranks = None if self.process_group is None else dist.get_process_group_ranks(self.process_group)
            self._async_group = dist.new_group(ranks=ranks, backend="gloo")
        return self._async_group

    def _wait_pending(self) -> None:
        """Wait for the save in flight; raise, once, its failure if nobody read its future.

        Raises:
            CheckpointTimeoutError: it is still in flight after ``timeout_secs``; it stays pending, so the next
                call waits for it again (a new save must not overlap it: they share the storage writer).
        """
        pending = self._pending
        if pending is None:
            return
        if not wait([pending], timeout=self.timeout_secs).done:
            raise CheckpointTimeoutError(f"the previous async DCP save did not finish within {self.timeout_secs}s "
                                         "(it is still in flight; the next save waits for it again)")
        self._pending = None
        error = pending.unread_error()
        if error is not None:
            raise error

    def load(self, state_dict: dict[str, Any], *, checkpoint_id: str | os.PathLike | None = None) -> None:
        """Load into ``state_dict`` in place (every rank calls; DCP reshards to this world size).

        Raises:
            FileNotFoundError: nothing at the path.
            IncompleteCheckpointError: the directory was never committed.
            CorruptCheckpointError: a chunk does not match its checksum (on every rank).
        """
        self._wait_pending()
        reader = self.storage_reader
        try:
            self._dcp_load(state_dict, checkpoint_id, reader)
        finally:
            if isinstance(reader, StorageReader):
                reader.close()  # a load DCP abandoned after read_metadata (another rank failed) left it open

    def _dcp_load(self, state_dict: dict[str, Any], checkpoint_id: Any, reader: _DCPStorageReader) -> None:
        with unwrapped_failures(f"loading {checkpoint_id or getattr(reader, 'checkpoint_id', '')}", writing=False):
            if self.coordinator_rank == 0:
                dcp.load(state_dict, checkpoint_id=checkpoint_id, storage_reader=reader,
                         planner=self.load_planner, process_group=self.process_group, no_dist=self.no_dist)
                return
            if checkpoint_id is not None:
                reader.reset(checkpoint_id)
            dcp.state_dict_loader.load_state_dict(
                state_dict, reader, process_group=self.process_group, coordinator_rank=self.coordinator_rank,
                no_dist=self.no_dist, planner=self.load_planner)

    def close(self) -> None:
        """Wait for a pending save, stop the background thread and free the background group; idempotent."""
        try:
            self._wait_pending()
        finally:
            with self._lock:
                executor, self._executor = self._executor, None
            if executor is not None:
                executor.shutdown(wait=True)
            saver, self._saver = self._saver, None
            if saver is not None:
                saver.close()
            group, self._async_group = self._async_group, None
            if group is not None and dist.is_initialized():
                dist.destroy_process_group(group)


class _SaveFuture(Future):
    """The future ``async_save`` returns: it remembers whether its caller saw the outcome (``result`` or
    ``exception`` on a finished save), so that a failure nobody saw is raised by the next call instead."""

    def __init__(self) -> None:
        super().__init__()
        self._seen = False

    @classmethod
    def following(cls, inner: Future) -> _SaveFuture:
        """A future that finishes as ``inner`` does."""
        outer = cls()
        inner.add_done_callback(outer._copy)
        return outer

    def _copy(self, inner: Future) -> None:
        if inner.cancelled():
            self.cancel()
            self.set_running_or_notify_cancel()
        elif inner.exception() is not None:
            self.set_exception(inner.exception())
        else:
            self.set_result(inner.result())

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(timeout)
        finally:
            self._seen = self._seen or self.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        finally:
            self._seen = self._seen or self.done()

    def unread_error(self) -> BaseException | None:
        """The save's failure if the caller never looked at the finished future (None otherwise)."""
        if self._seen or self.cancelled():
            return None
        return super().exception(0)
