"""lightning_ckpt: fast, safe checkpointing for PyTorch Lightning (core checkpointer and Lightning plugins)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Re-exports, resolved on first use: the writer subprocess imports only the torch-free modules it needs, so it
# starts in a fraction of a second and stays small.
_EXPORTS = {
    # The Lightning layer (importing these imports lightning; the core names below never do).
    "AsyncCheckpointCallback": "lightning_ckpt.lightning.callback",
    "AsyncCheckpointIO": "lightning_ckpt.lightning.async_io",
    "SyncCheckpointIO": "lightning_ckpt.lightning.sync_io",
    "AsyncCheckpointer": "lightning_ckpt.checkpointer",
    "BARRIER_REGISTRY": "lightning_ckpt.barriers",
    "Barrier": "lightning_ckpt.barriers",
    "BarrierConfig": "lightning_ckpt.barriers",
    "BarrierPeerError": "lightning_ckpt.errors",
    "BarrierTimeoutError": "lightning_ckpt.errors",
    "CheckpointError": "lightning_ckpt.errors",
    "CheckpointProcess": "lightning_ckpt.checkpoint_process",
    "CheckpointProcessConfig": "lightning_ckpt.checkpoint_process",
    "CheckpointReader": "lightning_ckpt.checkpoint_reader",
    "CheckpointStager": "lightning_ckpt.staging",
    "CheckpointStagerConfig": "lightning_ckpt.staging",
    "CheckpointTimeoutError": "lightning_ckpt.errors",
    "CheckpointWriteError": "lightning_ckpt.errors",
    "CheckpointWriter": "lightning_ckpt.checkpoint_writer",
    "CheckpointWriterConfig": "lightning_ckpt.checkpoint_writer",
    "Checkpointer": "lightning_ckpt.checkpointer",
    "CheckpointerConfig": "lightning_ckpt.config",
    "CorruptCheckpointError": "lightning_ckpt.errors",
    "DefaultStager": "lightning_ckpt.staging",
    "DistBarrier": "lightning_ckpt.barriers",
    "IncompleteCheckpointError": "lightning_ckpt.errors",
    "RankInfo": "lightning_ckpt.types",
    "STATE_DICT": "lightning_ckpt.types",
    "SaveStats": "lightning_ckpt.checkpointer",
    "SyncCheckpointer": "lightning_ckpt.checkpointer",
    "TCPStoreBarrier": "lightning_ckpt.barriers",
    "WriteStats": "lightning_ckpt.checkpoint_writer",
    "WriterHook": "lightning_ckpt.checkpoint_writer",
    "WriterProcessDiedError": "lightning_ckpt.errors",
    "create_barrier_from_config": "lightning_ckpt.barriers",
    "make_async_checkpointer": "lightning_ckpt.builder",
    "make_sync_checkpointer": "lightning_ckpt.builder",
    "register_barrier": "lightning_ckpt.barriers",
    "wrap_future": "lightning_ckpt.futures",
}

__all__ = [
    "AsyncCheckpointCallback",
    "AsyncCheckpointIO",
    "AsyncCheckpointer",
    "BARRIER_REGISTRY",
    "Barrier",
    "BarrierConfig",
    "BarrierPeerError",
    "BarrierTimeoutError",
    "CheckpointError",
    "CheckpointProcess",
    "CheckpointProcessConfig",
    "CheckpointReader",
    "CheckpointStager",
    "CheckpointStagerConfig",
    "CheckpointTimeoutError",
    "CheckpointWriteError",
    "CheckpointWriter",
    "CheckpointWriterConfig",
    "Checkpointer",
    "CheckpointerConfig",
    "CorruptCheckpointError",
    "DefaultStager",
    "DistBarrier",
    "IncompleteCheckpointError",
    "RankInfo",
    "STATE_DICT",
    "SaveStats",
    "SyncCheckpointIO",
    "SyncCheckpointer",
    "TCPStoreBarrier",
    "WriteStats",
    "WriterHook",
    "WriterProcessDiedError",
    "create_barrier_from_config",
    "make_async_checkpointer",
    "make_sync_checkpointer",
    "register_barrier",
    "wrap_future",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from lightning_ckpt.barriers import (
        BARRIER_REGISTRY,
        Barrier,
        BarrierConfig,
        DistBarrier,
        TCPStoreBarrier,
        create_barrier_from_config,
        register_barrier,
    )
    from lightning_ckpt.builder import make_async_checkpointer, make_sync_checkpointer
    from lightning_ckpt.checkpoint_process import CheckpointProcess, CheckpointProcessConfig
    from lightning_ckpt.checkpoint_reader import CheckpointReader
    from lightning_ckpt.checkpoint_writer import CheckpointWriter, CheckpointWriterConfig, WriterHook, WriteStats
    from lightning_ckpt.checkpointer import AsyncCheckpointer, Checkpointer, SaveStats, SyncCheckpointer
    from lightning_ckpt.config import CheckpointerConfig
    from lightning_ckpt.errors import (
        BarrierPeerError,
        BarrierTimeoutError,
        CheckpointError,
        CheckpointTimeoutError,
        CheckpointWriteError,
        CorruptCheckpointError,
        IncompleteCheckpointError,
        WriterProcessDiedError,
    )
    from lightning_ckpt.futures import wrap_future
    from lightning_ckpt.lightning.async_io import AsyncCheckpointIO
    from lightning_ckpt.lightning.callback import AsyncCheckpointCallback
    from lightning_ckpt.lightning.sync_io import SyncCheckpointIO
    from lightning_ckpt.staging import CheckpointStager, CheckpointStagerConfig, DefaultStager
    from lightning_ckpt.types import STATE_DICT, RankInfo
