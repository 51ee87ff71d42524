"""Async DCP saves: planned on the caller's thread, staged into our shared memory, written by our writer process."""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.checkpoint.utils import _DistWrapper

from lightning_ckpt.checkpoint_process import CheckpointProcess, CheckpointProcessConfig
from lightning_ckpt.dcp.failures import name_lost_ranks, unwrapped_failures
from lightning_ckpt.dcp.manifest import CHUNK_FILE_TEMPLATE, ChunkInfo
from lightning_ckpt.dcp.storage_writer import StorageWriter, rank_target
from lightning_ckpt.errors import CheckpointTimeoutError
from lightning_ckpt.serialization import for_transfer, prepare
from lightning_ckpt.staging import CheckpointStagerConfig, DefaultStager
from lightning_ckpt.staging_buffer import StagingBufferTooLarge
from lightning_ckpt.types import RankInfo

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Planned:
    """One save after planning: what the background completion needs (no reference to the live state)."""

    writer: StorageWriter
    metadata: Metadata | None  # the coordinator's global metadata (None on the other ranks)
    indexes: list  # each write item's MetadataIndex, in file order
    names: list[str]  # each item's file name in the directory temp
    written_here: bool = False  # over the staging budget: written on the caller's thread (WriteResults ready)


class AsyncShardedSaver:
    """Saves DCP state dicts asynchronously through lightning_ckpt's staging and writer process (every rank calls).

    ``save`` runs DCP's planning on the caller's thread (its planner and collectives, on ``process_group``), then
    copies this rank's chunks into a reused shared-memory staging buffer (``DefaultStager``) and hands them to
    this rank's persistent writer process (``CheckpointProcess.write_shards``), which writes one file per chunk
    into the coordinator's directory temp (O_DIRECT for large chunks, hashing each record as it writes, fsync)
    and returns. A background thread then waits for the writer and gathers the write results on a dedicated gloo
    group (never the default group off the main thread): the coordinator runs ``StorageWriter.finish``
    (``.metadata``, ``MANIFEST.json``, the atomic commit) and every rank learns the outcome; a failure anywhere
    (a write, a dead writer process, the commit) fails every rank's future with an error naming the rank.

    Args:
        process_group: the group DCP plans over (default: the default group).
        coordinator_rank: the rank that plans globally and commits.
        timeout_secs: the longest the background completion waits for this rank's writer.
        staging_config: how chunks are staged (synchronous copy into shared memory by default).
        process_config: the writer process's timeouts.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, coordinator_rank: int = 0, *,
                 timeout_secs: float = 3600.0, staging_config: CheckpointStagerConfig | None = None,
                 process_config: CheckpointProcessConfig | None = None) -> None:
        self.process_group = process_group
        self.coordinator_rank = coordinator_rank
        self.timeout_secs = timeout_secs
        self.staging_config = staging_config or CheckpointStagerConfig(use_async_staging=False)
        self.process_config = process_config
        self.process: CheckpointProcess | None = None
        self.stager: DefaultStager | None = None
        self._group: dist.ProcessGroup | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def save(self, state_dict: dict[str, Any], writer: StorageWriter, planner: SavePlanner | None = None) -> Future:
        """Plan and stage now; returns a future of DCP's metadata (on every rank) once the checkpoint committed.

        The caller may change ``state_dict``'s tensors as soon as this returns.

        Raises:
            CheckpointError: planning failed on a rank (on every rank, naming it). Later failures come through
                the future.
        """
        self._start()
        planner = planner or DefaultSavePlanner()
        rank = dist.get_rank(self.process_group) if dist.is_initialized() else 0
        try:
            with unwrapped_failures(f"planning the save of {writer.path}", writing=True):
                plan, metadata = self._plan(state_dict, writer, planner)
        except BaseException:
            writer.abort()
            raise
        names = [CHUNK_FILE_TEMPLATE.format(rank=rank, item=i) for i in range(len(plan.items))]
        planned = _Planned(writer, metadata, [item.index for item in plan.items], names)
        try:
            written, staged = self._stage_and_send(plan, planner, writer, names)
        except StagingBufferTooLarge as e:  # the documented slower path: written here from the live tensors
            log.warning("async save of %s on rank %d: %s; writing this rank's shards synchronously", writer.path,
                        rank, e)
            planned.written_here = True
            written, staged = _resolved(self._write_here, plan, planner, writer), None
        except Exception as e:  # noqa: BLE001 - reported to every rank through the completion
            log.debug("staging the save of %s failed on rank %d: %r", writer.path, rank, e)
            written, staged = _resolved(_raise, e), None
        with self._lock:
            writer.mark_in_flight()  # from here on only the completion finishes or aborts the coordinator's temp
            try:
                return self._executor.submit(self._complete, planned, written, staged)
            except BaseException:
                writer.abort(in_flight=True)
                raise

    def _start(self) -> None:
        """Start the stager, the writer process link and the gloo group on first use (the caller's thread)."""
        if self.stager is not None:
            return
        if dist.is_initialized():
            ranks = None if self.process_group is None else dist.get_process_group_ranks(self.process_group)
            self._group = dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(seconds=self.timeout_secs))
        # The writer process writes only this rank's files; DCP's gather (on the gloo group) is what meets the
        # other ranks, so its writer is a one-rank writer that needs no barrier of its own.
        self.process = CheckpointProcess(RankInfo(0, 1), self.process_config)
        self.stager = DefaultStager(self.staging_config, max_buffers=1, on_buffer_closed=self.process.drop_buffer)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_ckpt-dcp-async")

    def _plan(self, state_dict: dict[str, Any], writer: StorageWriter,
              planner: SavePlanner) -> tuple[SavePlan, Metadata | None]:
        """DCP's local and global planning (``save_state_dict``'s first half) on ``process_group``."""
        dist_w = _DistWrapper(self.process_group, dist.is_initialized(), self.coordinator_rank)
        global_metadata: list[Metadata] = []

        def local_step() -> SavePlan:
            planner.set_up_planner(state_dict=state_dict, storage_meta=writer.storage_meta(),
                                   is_coordinator=dist_w.is_coordinator)
            writer.set_up_storage_writer(dist_w.is_coordinator, rank=dist_w.rank, use_collectives=True)
            return writer.prepare_local_plan(planner.create_local_plan())

        def global_step(all_plans: list[SavePlan]) -> list[SavePlan]:
            all_plans, metadata = planner.create_global_plan(all_plans)
            global_metadata.append(metadata)
            return writer.prepare_global_plan(all_plans)

        central = dist_w.reduce_scatter("plan", local_step, global_step)
        return planner.finish_plan(central), (global_metadata[0] if global_metadata else None)

    def _stage_and_send(self, plan: SavePlan, planner: SavePlanner, writer: StorageWriter,
                        names: list[str]) -> tuple[Future, Any]:
        """Copy this rank's chunks into a staging buffer and queue them for the writer process."""
        target = rank_target(plan, writer.path)
        tensors, raw = {}, {}
        for i, item in enumerate(plan.items):
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                raw[i] = bytes(data.getbuffer())
            else:
                tensors[i] = data.detach()
        staged = self.stager.stage(tensors, release_by_caller=True)
        try:
            buffer = staged.staging.buffer
            items: list[tuple[str, Any]] = []
            for i, name in enumerate(names):
                data = raw[i] if i in raw else for_transfer(prepare(_own_storage(staged[i]), buffer.range))
                items.append((name, data))
            written = self.process.write_shards(writer.path, target.token, items, buffer, fsync=writer.sync_files)
        except BaseException:
            self.stager.release(staged)
            raise
        return written, staged

    @staticmethod
    def _write_here(plan: SavePlan, planner: SavePlanner, writer: StorageWriter) -> list[WriteResult]:
        """``StorageWriter.write_data`` on the caller's thread, from the live tensors (no staging memory)."""
        future = writer.write_data(plan, planner)
        future.wait()
        return future.value()

    def _complete(self, planned: _Planned, written: Future, staged: Any) -> Metadata:
        """In the background: wait for this rank's writer, gather the results, the coordinator commits."""
        dist_w = _DistWrapper(self._group, self._group is not None, self.coordinator_rank)
        writer = planned.writer

        def write_step() -> list[WriteResult]:
            try:
                files = written.result(timeout=self.timeout_secs)
            except TimeoutError as e:
                raise CheckpointTimeoutError(f"the writer process did not write the shards of {writer.path} "
                                             f"within {self.timeout_secs}s") from e
            finally:
                if staged is not None:
                    self.stager.release(staged)
            if planned.written_here:
                return files
            return [WriteResult(index=index, size_in_bytes=f["nbytes"],
                                storage_data=ChunkInfo(f["name"], 0, f["nbytes"], f.get("xxh3"), f.get("records")))
                    for index, f in zip(planned.indexes, files)]

        def finish_step(all_results: list[list[WriteResult]]) -> Metadata:
            writer.finish(metadata=planned.metadata, results=all_results)
            return planned.metadata

        try:
            with unwrapped_failures(f"saving {writer.path}", writing=True):
                return dist_w.all_reduce("write", write_step, finish_step)
        except BaseException as e:
            writer.abort(in_flight=True)  # the coordinator's temp, when another rank failed
            lost = name_lost_ranks(e, "saving", writer.path, self._group)
            if lost is e:
                raise
            raise lost from e

    def close(self) -> None:
        """Stop the background thread, the writer process and the staging buffers, free the group; idempotent.

        The caller waits for the save in flight first (``DistributedCheckpointer`` does).
        """
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        stager, self.stager = self.stager, None
        process, self.process = self.process, None
        group, self._group = self._group, None
        try:
            if stager is not None:
                stager.close()
        finally:
            try:
                if process is not None:
                    process.close()
            finally:
                if group is not None and dist.is_initialized():
                    dist.destroy_process_group(group)


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor whose storage is exactly its bytes (what DCP's reader expects a chunk's ``torch.save`` to hold).

    Staged tensors already are; a 0-dim tensor (cloned by the stager, not staged) may be a view of a bigger
    storage only if its source was.
    """
    if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size() and tensor.is_contiguous():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _resolved(fn: Any, *args: Any) -> Future:
    """A future holding what ``fn(*args)`` returns or raises."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as e:  # noqa: BLE001 - reported to every rank through the completion
        future.set_exception(e)
    return future


def _raise(error: BaseException) -> None:
    raise error
