"""Resuming: the newest complete checkpoint of a directory, for ``ckpt_path`` (implemented in ``lightning_ckpt.latest``)."""

from lightning_ckpt.latest import CKPT_SUFFIX, find_latest_checkpoint, is_complete, matching_checkpoints, pattern_regex

__all__ = ["CKPT_SUFFIX", "find_latest_checkpoint", "is_complete", "matching_checkpoints", "pattern_regex"]
