"""``SyncCheckpointIO``: Lightning saves written atomically, with checksums, before ``save_checkpoint`` returns."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from lightning_ckpt.builder import make_sync_checkpointer
from lightning_ckpt.checkpointer import SyncCheckpointer
from lightning_ckpt.futures import completed_future
from lightning_ckpt.lightning.base_io import LightningCkptIO
from lightning_ckpt.types import RankInfo


class SyncCheckpointIO(LightningCkptIO):
    """A drop-in ``TorchCheckpointIO`` that writes in the training thread but never leaves a torn file.

    Same file format as ``AsyncCheckpointIO`` (``torch.load``-compatible plus checksums, verified on load); unlike
    ``TorchCheckpointIO`` a refused write (e.g. ``PermissionError``) is raised, never swallowed. Useful where a
    writer process is unwelcome, or as the baseline the async plugin is measured against.

    Args: see ``LightningCkptIO`` (``config``, ``error_policy``, ``commit_hook``).
    """

    def _save(self, path: str, checkpoint: dict[str, Any], step: int | None,
              after_commit: Any = None) -> tuple[Future, Future]:
        checkpointer = self._ensure_checkpointer()
        metadata = {"step": int(step)} if step is not None else None
        stats = checkpointer.save(path, checkpoint, metadata=metadata, after_commit=after_commit)
        return completed_future(None), completed_future(stats)

    def _ensure_checkpointer(self) -> SyncCheckpointer:
        if self._checkpointer is None:
            self._checkpointer = make_sync_checkpointer(self.config, RankInfo(0, 1), self.commit_hook)
        return self._checkpointer
