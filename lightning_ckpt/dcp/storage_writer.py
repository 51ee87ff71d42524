"""A DCP ``StorageWriter``: every rank writes into one temp directory, the coordinator checksums and commits it."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import pickle
import uuid
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint import StorageWriter as _DCPStorageWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from lightning_ckpt import layout
from lightning_ckpt.commit import Commit, remove_stale_temps
from lightning_ckpt.dcp.manifest import (
    DATA_FILE_TEMPLATE,
    METADATA_NAME,
    ChunkInfo,
    build_manifest,
    is_local_checkpoint_id,
    read_manifest,
)
from lightning_ckpt.errors import CheckpointError, IncompleteCheckpointError
from lightning_ckpt.torch_zip import checksum

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _RankTarget:
    """What the coordinator tells each rank in its plan: this save's temp directory (a commit token) and file."""

    token: str
    file_name: str


class StorageWriter(_DCPStorageWriter):
    """Writes a DCP checkpoint with the commit rule: nothing appears at ``path`` until it is complete.

    The coordinator creates one temp directory beside ``path`` (``lightning_ckpt.commit.Commit``) while DCP
    plans, and sends its token to every rank in the plan; every rank writes its chunks into its own file there
    (each chunk's ``WriteResult`` carries the xxh3 of its bytes). The coordinator's ``finish`` writes DCP's
    ``.metadata``, any extra files (``add_file``) and ``MANIFEST.json`` (every file and chunk with its checksum),
    fsyncs them and publishes the directory: an existing checkpoint at ``path`` is exchanged for the new one in
    one step, so there is no instant without a complete checkpoint there. DCP broadcasts the outcome, so every
    rank raises if any rank or the commit failed (``DistributedCheckpointer`` turns DCP's ``CheckpointException``
    into our errors and removes the temp at once; otherwise the next save, or the stale-temp cleanup once this
    process is gone, removes it).

    The bytes are DCP's own format (a ``torch.save`` per tensor chunk), so plain ``dcp.load`` and DCP's
    resharding read the result. Better than ``FileSystemWriter``: no torn checkpoint after a failed overwrite,
    the directory itself is fsynced, and every chunk is checksummed.

    Args:
        path: the checkpoint directory (DCP's ``checkpoint_id``).
        sync_files: fsync files and directories before the commit (off: atomic but not durable across power loss).
        overwrite: replace an existing checkpoint at ``path`` (atomically); ``False`` raises ``FileExistsError``.
    """

    def __init__(self, path: str | os.PathLike, *, sync_files: bool = True, overwrite: bool = True) -> None:
        super().__init__()
        self.path = os.path.abspath(os.fspath(path))
        self.sync_files = sync_files
        self.overwrite = overwrite
        self.save_id = uuid.uuid4().hex
        self.rank = 0
        self.is_coordinator = True
        self._extra_files: dict[str, bytes] = {}
        self._commit: Commit | None = None
        self._in_flight = False  # ``_commit`` belongs to a save completing in the background

    def add_file(self, name: str, data: bytes) -> None:
        """Commit ``data`` as ``<path>/<name>`` together with the next checkpoint (used on the coordinator).

        Raises:
            ValueError: ``name`` is not a plain file name, or one the checkpoint uses itself.
        """
        if os.path.basename(name) != name or name in ("", ".", "..", METADATA_NAME, layout.MANIFEST_NAME):
            raise ValueError(f"StorageWriter.add_file: name must be a plain file name of its own, got {name!r}")
        self._extra_files[name] = bytes(data)

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = os.path.abspath(os.fspath(checkpoint_id))
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)
        if not kwargs.get("use_collectives", True) and _world_size() > 1:
            raise ValueError("StorageWriter needs use_collectives=True with several ranks (one commit for all)")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if not self.overwrite and os.path.lexists(self.path):
            raise FileExistsError(f"a checkpoint exists at {self.path} and overwrite=False")
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """On the coordinator, between gathering and scattering the plans: create this save's temp directory."""
        if self._in_flight:
            raise CheckpointError(f"StorageWriter for {self.path}: the previous save is still committing (temp "
                                  f"{self._commit.token}); wait for it before saving again with this writer")
        self.abort()  # a save that failed on another rank left its temp open
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        removed = remove_stale_temps(parent)
        if removed:
            log.info("removed temps of crashed or failed saves from %s: %s", parent, removed)
        self._commit = Commit.create(self.path, directory=True, fsync=self.sync_files)
        return [
            dataclasses.replace(plan, storage_data=_RankTarget(self._commit.token, DATA_FILE_TEMPLATE.format(rank=i)))
            for i, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's chunks into its file in the temp directory, hashing each chunk's bytes."""
        target = rank_target(plan, self.path)
        with self._rank_commit(target.token) as commit:
            with os.fdopen(commit.open_new(target.file_name), "wb") as f:
                results = self._write_chunks(f, target.file_name, plan, planner)
                f.flush()
                if self.sync_files:
                    os.fsync(f.fileno())
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    @contextlib.contextmanager
    def _rank_commit(self, token: str) -> Iterator[Commit]:
        """The coordinator's own commit, or (on another rank) the coordinator's temp joined for this write."""
        if self._commit is not None and self._commit.token == token:
            yield self._commit
            return
        with Commit.join(self.path, token, fsync=self.sync_files) as joined:
            yield joined

    def _write_chunks(self, f: Any, file_name: str, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        results = []
        for item in plan.items:
            data = _chunk_bytes(planner.resolve_data(item), item.type)
            offset = f.tell()
            f.write(data)
            info = ChunkInfo(file_name, offset, len(data), checksum(data))
            results.append(WriteResult(index=item.index, size_in_bytes=len(data), storage_data=info))
        return results

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """On the coordinator, once every rank wrote: metadata, extra files, manifest, fsync, commit."""
        commit, self._commit, self._in_flight = self._commit, None, False
        if commit is None:
            raise CheckpointError(f"StorageWriter.finish for {self.path}: no temp directory (prepare_global_plan "
                                  "did not run on this coordinator)")
        with commit:  # removes the temp, or what the commit replaced
            chunks = [wr.storage_data for rank_results in results for wr in rank_results]
            files = self._write_tail(commit, metadata, results)
            commit.write_bytes(layout.MANIFEST_NAME, _json(build_manifest(chunks, files, world_size=len(results))))
            commit.publish()
        self._extra_files = {}

    def mark_in_flight(self) -> None:
        """Hand this save's temp (on the coordinator) to a completion in the background: until its ``finish`` or
        ``abort(in_flight=True)``, a new save is refused and a plain ``abort`` leaves the temp alone."""
        self._in_flight = self._commit is not None

    def abort(self, *, in_flight: bool = False) -> None:
        """Give up the save in progress on this coordinator (its temp is removed); nothing changes at ``path``.

        Args:
            in_flight: the caller is the background completion that owns the save (``mark_in_flight``);
                otherwise a save in flight is left to it.
        """
        if self._in_flight and not in_flight:
            log.debug("StorageWriter for %s: not aborting the save still in flight", self.path)
            return
        commit, self._commit, self._in_flight = self._commit, None, False
        if commit is not None:
            commit.abort()

    def _write_tail(self, commit: Commit, metadata: Metadata, results: list[list[WriteResult]]) -> dict[str, dict]:
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        metadata.storage_data = {
            wr.index: _StorageInfo(wr.storage_data.relative_path, wr.storage_data.offset, wr.storage_data.length)
            for rank_results in results for wr in rank_results
        }
        metadata.storage_meta = self.storage_meta()
        metadata.version = _dcp_version(metadata.version)
        files = {}
        for name in sorted({wr.storage_data.relative_path for rank_results in results for wr in rank_results}):
            files[name] = {"nbytes": commit.size(name)}
        for name, data in [(METADATA_NAME, pickle.dumps(metadata)), *sorted(self._extra_files.items())]:
            commit.write_bytes(name, data)
            files[name] = {"nbytes": len(data), "xxh3": checksum(data)}
        return files

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    @property
    def checkpoint_id(self) -> str:
        """The final checkpoint directory."""
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return is_local_checkpoint_id(checkpoint_id)


def rank_target(plan: SavePlan, path: str) -> _RankTarget:
    """This rank's part of the coordinator's plan: the directory temp's token and this rank's file name.

    Raises:
        CheckpointError: the plan carries none (our ``prepare_global_plan`` did not run).
    """
    target = plan.storage_data
    if not isinstance(target, _RankTarget):
        raise CheckpointError(f"StorageWriter.write_data for {path}: the plan has no target directory "
                              "(prepare_global_plan did not run)")
    return target


def is_committed(path: str | os.PathLike) -> bool:
    """True iff ``path`` holds a DCP checkpoint committed by ``StorageWriter`` (its manifest is readable)."""
    try:
        read_manifest(os.fspath(path))
    except (FileNotFoundError, IncompleteCheckpointError, CheckpointError):
        return False
    return True


def _chunk_bytes(data: Any, item_type: WriteItemType) -> memoryview:
    """The bytes DCP's reader expects for one item: raw for BYTE_IO, a ``torch.save`` of the tensor otherwise."""
    if item_type == WriteItemType.BYTE_IO:
        return data.getbuffer()
    tensor = data.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone(memory_format=torch.contiguous_format)  # torch.save writes the whole storage
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return buf.getbuffer()


def _dcp_version(current: str | None) -> str | None:
    try:
        from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
    except ImportError:  # older torch: DCP wrote no version
        return current
    return CURRENT_DCP_VERSION


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _json(obj: dict) -> bytes:
    import json

    return json.dumps(obj, indent=1).encode()
