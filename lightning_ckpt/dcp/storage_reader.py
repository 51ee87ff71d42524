"""A DCP ``StorageReader`` that refuses uncommitted directories and verifies every chunk it reads."""

from __future__ import annotations

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


class StorageReader(_DCPStorageReader):
    """Reads checkpoints written by ``StorageWriter``; DCP's planner reshards (any world size can load).

    A directory without ``MANIFEST.json`` (a save that never committed, or one by plain DCP) is refused with
    ``IncompleteCheckpointError`` naming the path; a missing path raises ``FileNotFoundError``. Both are raised
    where they keep their type: the constructor and ``reset`` (for an existing path) and
    ``set_up_storage_reader``; torch's ``dcp.load`` turns any error of ``read_metadata`` into a bare
    ``AssertionError``, so ``read_metadata`` defers the refusal to ``set_up_storage_reader``. Every chunk read is
    checked against its xxh3 (``CorruptCheckpointError`` with path, key and both checksums).

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
        if os.path.lexists(self.path):
            read_manifest(self.path)

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = os.path.abspath(os.fspath(checkpoint_id))
            read_manifest(self.path)
        self.storage_data = {}
        self._manifest = None
        self.load_id = uuid.uuid4().hex

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """DCP's metadata of the committed checkpoint (verified against the manifest).

        Returns a placeholder when the directory is not committed, so that ``set_up_storage_reader`` raises the
        refusal with its type (see the class docstring).
        """
        try:
            self._manifest = read_manifest(self.path)
        except (FileNotFoundError, RuntimeError) as e:
            self._refusal = e
            return Metadata(state_dict_metadata={})
        self._refusal = None
        meta_path = os.path.join(self.path, METADATA_NAME)
        with open(meta_path, "rb") as f:
            data = f.read()
        if self.verify:
            verify_bytes(meta_path, METADATA_NAME, data, self._manifest["files"].get(METADATA_NAME, {}).get("xxh3"))
        metadata = pickle.loads(data)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self._refusal is not None:
            refusal, self._refusal = self._refusal, None
            raise refusal
        if self._manifest is None:
            self._manifest = read_manifest(self.path)
        if metadata.storage_data is None:
            raise ValueError(f"DCP metadata of {self.path} has no storage_data")
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read each requested chunk once, verify it, and hand it to the planner (narrowed for resharding)."""
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for relative_path, items in by_file.items():
            file_path = os.path.join(self.path, relative_path)
            with open(file_path, "rb") as f:
                for item in sorted(items, key=lambda i: self.storage_data[i.storage_index].offset):
                    self._load_item(f, file_path, item, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _load_item(self, f: Any, file_path: str, item: Any, planner: LoadPlanner) -> None:
        info = self.storage_data[item.storage_index]
        f.seek(info.offset)
        data = f.read(info.length)
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
