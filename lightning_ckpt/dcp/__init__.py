"""Sharded checkpoints on torch.distributed.checkpoint (DCP): committing, checksumming storage plugins."""

from lightning_ckpt.dcp.async_save import AsyncShardedSaver
from lightning_ckpt.dcp.checkpointer import DistributedCheckpointer
from lightning_ckpt.dcp.failures import unwrap, unwrapped_failures
from lightning_ckpt.dcp.storage_reader import StorageReader
from lightning_ckpt.dcp.storage_writer import StorageWriter, is_committed

__all__ = [
    "AsyncShardedSaver",
    "DistributedCheckpointer",
    "StorageReader",
    "StorageWriter",
    "is_committed",
    "unwrap",
    "unwrapped_failures",
]
