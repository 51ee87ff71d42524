"""Who am I (``RankInfo``), what a state dict is (``STATE_DICT``) and what a save cost (``SaveStats``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STATE_DICT = dict[str, Any]


@dataclass(frozen=True)
class RankInfo:
    """The rank writing a checkpoint and how many ranks write it together.

    Args:
        global_rank: this rank, ``0 <= global_rank < global_world_size``.
        global_world_size: ranks that each write a part of one checkpoint (1: a single file).
    """

    global_rank: int = 0
    global_world_size: int = 1

    def __post_init__(self) -> None:
        if self.global_world_size < 1:
            raise ValueError(f"RankInfo.global_world_size must be >= 1, got {self.global_world_size}")
        if not 0 <= self.global_rank < self.global_world_size:
            raise ValueError(
                f"RankInfo.global_rank must be in [0, {self.global_world_size}), got {self.global_rank}"
            )

    @classmethod
    def from_env(cls) -> "RankInfo":
        """From the default ``torch.distributed`` group when initialised, else ``RankInfo(0, 1)``."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls(0, 1)


@dataclass
class SaveStats:
    """One save, end to end: what the caller was blocked by and when the checkpoint became durable."""

    path: str
    nbytes: int
    stall_secs: float  # inside save(): planning, pickling, and the copy when staging is synchronous
    stage_secs: float  # save() called -> staged copy independent of the live tensors
    write_secs: float  # the writer writing and fsyncing this rank's file
    durable_secs: float  # save() called -> committed at the final path
    fallback: bool = False  # written synchronously because the state exceeded the staging budget

    @property
    def gb_per_sec(self) -> float:
        return self.nbytes / self.write_secs / 1e9 if self.write_secs > 0 else float("inf")
