"""``AsyncCheckpointIO``: Lightning saves return after staging; a persistent writer process writes and commits."""

from __future__ import annotations

import atexit
from concurrent.futures import Future
from typing import Any

from lightning_ckpt.builder import make_async_checkpointer
from lightning_ckpt.checkpointer import AsyncCheckpointer
from lightning_ckpt.lightning.base_io import LightningCkptIO
from lightning_ckpt.lightning.ledger import _wait
from lightning_ckpt.types import RankInfo


class AsyncCheckpointIO(LightningCkptIO):
    """``Trainer(plugins=[AsyncCheckpointIO()])``: checkpoints stop stalling training, and are never torn.

    Each checkpoint at Lightning's path is one ``torch.load``-compatible file (plus a checksum record), written by a
    writer subprocess started at the first save and committed atomically (temp name, fsync, rename). Compared with
    Lightning's own ``AsyncCheckpointIO``: tensors are copied into reusable CPU shared memory (no device clone);
    ``remove_checkpoint`` is ordered after the saves issued before it and never deletes the newest complete
    checkpoint while its replacement is in flight; ``load_checkpoint`` waits for a pending save of that path; a
    failed save is raised at the next save (or at the callback's next hook), once; ``teardown`` drains and the
    plugin restarts lazily afterwards (fit, validate, fit again).

    Staging: alone, ``save_checkpoint`` returns once the copy no longer reads live tensors. With
    ``AsyncCheckpointCallback`` the copy overlaps the next training step (see that class).

    ModelCheckpoint hazards that need the callback (it guards ModelCheckpoint at setup): without it,
    ``save_last="link"`` works (the directory is created at save time) but ``last.ckpt`` can point at a file still
    being written, and loggers reading the file in ``after_save_checkpoint`` may not find it yet.

    Saves made after ``teardown`` (e.g. ``trainer.save_checkpoint`` after ``fit``) restart the writer; call
    ``teardown()`` to wait for them, or they are drained at interpreter exit.

    Args: see ``LightningCkptIO`` (``config``, ``error_policy``, ``commit_hook``).
    """

    def _save(self, path: str, checkpoint: dict[str, Any], step: int | None,
              after_commit: Any = None) -> tuple[Future, Future]:
        checkpointer = self._ensure_checkpointer()
        state = self._staged_state(checkpoint)
        metadata = {"step": int(step)} if step is not None else None
        stage_future, write_future = checkpointer.save(path, state, metadata=metadata,
                                                       snapshot_token=self.snapshot_token(step),
                                                       after_commit=after_commit)
        if not self.defer_staging:
            _wait(stage_future, self.config.wait_timeout_secs, f"staging of {path}")
        return stage_future, write_future

    def _warm_up(self) -> None:
        self._ensure_checkpointer().start(block=False)

    def _ensure_checkpointer(self) -> AsyncCheckpointer:
        if self._checkpointer is None:
            # Lightning saves on global rank 0 only and each checkpoint is one file: the writer is a single rank.
            self._checkpointer = make_async_checkpointer(self.config, RankInfo(0, 1), self.commit_hook,
                                                         error_store=self._ledger.errors)
            atexit.register(self._close_at_exit)
        return self._checkpointer

    def _close(self, checkpointer: Any) -> None:
        atexit.unregister(self._close_at_exit)
        super()._close(checkpointer)

    def _close_at_exit(self) -> None:
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            super()._close(checkpointer)
