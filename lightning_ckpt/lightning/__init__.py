"""The Lightning layer: ``AsyncCheckpointIO``/``SyncCheckpointIO`` plugins and the ``AsyncCheckpointCallback``."""

from lightning_ckpt.lightning.async_io import AsyncCheckpointIO
from lightning_ckpt.lightning.base_io import LightningCkptIO
from lightning_ckpt.lightning.callback import AsyncCheckpointCallback
from lightning_ckpt.lightning.resume import find_latest_checkpoint
from lightning_ckpt.lightning.strategies import FSDPStrategy, ModelParallelStrategy
from lightning_ckpt.lightning.sync_io import SyncCheckpointIO

__all__ = [
    "AsyncCheckpointCallback",
    "AsyncCheckpointIO",
    "FSDPStrategy",
    "LightningCkptIO",
    "ModelParallelStrategy",
    "SyncCheckpointIO",
    "find_latest_checkpoint",
]
