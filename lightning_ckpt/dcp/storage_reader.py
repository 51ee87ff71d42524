"""A DCP ``StorageReader`` that refuses uncommitted directories and verifies every chunk it reads."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import uuid
from typing import Any

import torch
from torch.distributed.checkpoint import StorageReader as _DCPStorageReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from lightning_ckpt.dcp.manifest import (
    METADATA_NAME,
    chunk_key,
    is_local_checkpoint_id,
    read_manifest,
    verify_bytes,
    verify_chunk,
)
from lightning_ckpt.dcp.pinned import PinnedCheckpoint
from lightning_ckpt.errors import CheckpointError, CorruptCheckpointError


# The most data files one load keeps open (more are opened one at a time as they are read), well under the common
# soft limit of 1024 descriptors: a directory of an async save holds one file per chunk.
PINNED_FILES_MAX = 256


@dataclasses.dataclass(frozen=True)
class _LoadVersion:
    """What each rank tells the coordinator in its load plan: the version it opened (its manifest's xxh3)."""

    manifest_xxh3: str


class StorageReader(_DCPStorageReader):
    """Reads checkpoints written by ``StorageWriter``; DCP's planner reshards (any world size can load).

    A directory without ``MANIFEST.json`` (a save that never committed, or one by plain DCP) is refused with
    ``IncompleteCheckpointError`` naming the path; a missing path raises ``FileNotFoundError``. Both are raised
    where they keep their type: the constructor and ``reset`` (for an existing path) and
    ``set_up_storage_reader``; torch's ``dcp.load`` turns any error of ``read_metadata`` into a bare
    ``AssertionError``, so ``read_metadata`` defers the refusal to ``set_up_storage_reader``. Every chunk read is
    checked against its xxh3 (``CorruptCheckpointError`` with path, key and both checksums).

    A load reads one committed version, whole or not at all, even while a save commits over ``path`` (it
    exchanges the directory, then removes the old one): ``read_metadata`` opens the directory once and reads the
    manifest, the metadata and the data files through that descriptor, keeping the data files open (up to
    ``PINNED_FILES_MAX``; the rest of this rank's files are opened in ``prepare_local_plan``) until
    ``read_data`` has read them. Better than ``FileSystemReader``, which reopens every file by path: new data
    against old metadata. A file of the version being read that is gone before it could be opened raises
    ``IncompleteCheckpointError`` naming it; ranks that opened different versions all fail (``CheckpointError``
    from the coordinator's ``prepare_global_plan``). The descriptors are closed when ``read_data`` ends, on a
    refusal, by ``reset``, ``close`` and the next ``read_metadata``, and once the reader is garbage (a load that
    DCP abandoned after ``read_metadata``; ``DistributedCheckpointer.load`` calls ``close``).

    Args:
        path: the checkpoint directory (DCP's ``checkpoint_id``).
        verify: check each chunk's checksum (on by default).
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        super().__init__()
        self.path = os.path.abspath(os.fspath(path))
        self.verify = verify
        self.load_id = uuid.uuid4().hex
        self.storage_data: dict[Any, Any] = {}
        self._manifest: dict | None = None
        self._refusal: BaseException | None = None
        self._pinned: PinnedCheckpoint | None = None
        self._version: str | None = None  # the manifest xxh3 of the version this load began reading
        if os.path.lexists(self.path):
            read_manifest(self.path)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pinned"] = None  # descriptors belong to this process
        return state

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.close()
        if checkpoint_id:
            self.path = os.path.abspath(os.fspath(checkpoint_id))
            read_manifest(self.path)
        self.storage_data = {}
        self._manifest = None
        self._version = None
        self.load_id = uuid.uuid4().hex

    def close(self) -> None:
        """Close the version the current load holds open (idempotent; ``read_data`` does it when it ends)."""
        pinned, self._pinned = self._pinned, None
        if pinned is not None:
            pinned.close()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """DCP's metadata of the committed checkpoint (verified against the manifest), its version held open.

        Returns a placeholder when the directory is not committed or unreadable, so that
        ``set_up_storage_reader`` raises the refusal with its type (see the class docstring).
        """
        self.close()
        self._version = None
        try:
            metadata = self._read_pinned_metadata()
        except (OSError, CheckpointError) as e:
            self.close()
            self._refusal = e
            return Metadata(state_dict_metadata={})
        self._refusal = None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _read_pinned_metadata(self) -> Metadata:
        pinned = self._pin()
        data = pinned.read_bytes(METADATA_NAME)
        meta_path = os.path.join(self.path, METADATA_NAME)
        if self.verify:
            verify_bytes(meta_path, METADATA_NAME, data, pinned.manifest["files"].get(METADATA_NAME, {}).get("xxh3"))
        try:
            metadata = pickle.loads(data)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the same: unreadable metadata
            raise CorruptCheckpointError(f"corrupt checkpoint {meta_path}: unreadable DCP metadata: {e}",
                                         path=meta_path, key=METADATA_NAME) from e
        names = {info.relative_path for info in (metadata.storage_data or {}).values()}
        if len(names) <= PINNED_FILES_MAX:  # else this rank's own files, in prepare_local_plan
            pinned.hold(sorted(names), PINNED_FILES_MAX)
        return metadata

    def _pin(self) -> PinnedCheckpoint:
        """Open the checkpoint now at ``path``; it must be the version this load began reading, if it began."""
        pinned = PinnedCheckpoint(self.path)
        if self._version is not None and pinned.version != self._version:
            pinned.close()
            raise CheckpointError(f"checkpoint {self.path} was replaced since this load read its metadata "
                                  "(load it again)")
        self._pinned, self._version, self._manifest = pinned, pinned.version, pinned.manifest
        return pinned

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self._refusal is not None:
            refusal, self._refusal = self._refusal, None
            raise refusal
        if self._pinned is None:  # metadata read elsewhere (or its version closed since): this load begins here
            self._version = None
            self._pin()
        if metadata.storage_data is None:
            self.close()
            raise ValueError(f"DCP metadata of {self.path} has no storage_data")
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Hold this rank's data files open (if ``read_metadata`` did not) and tag the plan with the version."""
        if self._pinned is None:
            return plan
        self._pinned.hold(sorted(self._files(plan)), PINNED_FILES_MAX)
        return dataclasses.replace(plan, storage_data=_LoadVersion(self._pinned.version))

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """On the coordinator: refuse a load whose ranks opened different versions (a commit came between)."""
        ranks_by_version: dict[str, list[int]] = {}
        for rank, plan in enumerate(plans):
            if isinstance(plan.storage_data, _LoadVersion):
                ranks_by_version.setdefault(plan.storage_data.manifest_xxh3, []).append(rank)
        if len(ranks_by_version) > 1:
            self.close()
            raise CheckpointError(
                f"checkpoint {self.path} was replaced while the ranks opened it: they hold different versions "
                f"(ranks by manifest xxh3: {ranks_by_version}); load it again")
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read each requested chunk once, verify it, and hand it to the planner (narrowed for resharding);
        then close the version held open."""
        try:
            pinned = self._pinned or self._pin()
            by_file: dict[str, list] = {}
            for item in plan.items:
                by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
            for relative_path, items in by_file.items():
                with pinned.opened(relative_path) as fd:
                    for item in sorted(items, key=lambda i: self.storage_data[i.storage_index].offset):
                        self._load_item(pinned, fd, item, planner)
        finally:
            self.close()
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _files(self, plan: LoadPlan) -> set[str]:
        return {self.storage_data[item.storage_index].relative_path for item in plan.items}

    def _load_item(self, pinned: PinnedCheckpoint, fd: int, item: Any, planner: LoadPlanner) -> None:
        info = self.storage_data[item.storage_index]
        file_path = os.path.join(self.path, info.relative_path)
        data = pinned.read_at(fd, info.relative_path, info.offset, info.length, item.storage_index.fqn)
        if self.verify:
            entry = self._manifest["chunks"].get(chunk_key(info.relative_path, info.offset), {})
            verify_chunk(file_path, item.storage_index.fqn, data, entry)
        if item.type == LoadItemType.BYTE_IO:
            planner.load_bytes(item, io.BytesIO(data))
            return
        tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
            tensor = tensor.narrow(dim, start, length)
        target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise ValueError(f"{file_path}: chunk {item.storage_index.fqn} has shape {tuple(tensor.size())}, "
                             f"the load plan expects {tuple(target.size())}")
        target.copy_(tensor)
        planner.commit_tensor(item, target)

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint directory."""
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return is_local_checkpoint_id(checkpoint_id)
