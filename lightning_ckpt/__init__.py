"""lightning_ckpt: fast, safe checkpointing for PyTorch Lightning (core checkpointer and Lightning plugins)."""

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
from lightning_ckpt.staging import CheckpointStager, CheckpointStagerConfig, DefaultStager
from lightning_ckpt.types import STATE_DICT, RankInfo

__version__ = "0.1.0"

__all__ = [
    "BARRIER_REGISTRY",
    "STATE_DICT",
    "AsyncCheckpointer",
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
    "SaveStats",
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
