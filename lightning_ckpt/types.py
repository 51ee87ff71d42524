"""Who am I (``RankInfo``) and what a state dict is (``STATE_DICT``)."""

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
