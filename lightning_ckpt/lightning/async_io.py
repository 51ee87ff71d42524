"""``AsyncCheckpointIO``: Lightning saves return after staging; a persistent writer process writes and commits."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from lightning_ckpt.builder import make_async_checkpointer
from lightning_ckpt.checkpointer import AsyncCheckpointer
from lightning_ckpt.lightning.base_io import LightningCkptIO
from lightning_ckpt.lightning.ledger import _wait
from lightning_ckpt.lightning.staging_size import checkpoint_staging_bytes
from lightning_ckpt.types import RankInfo


class AsyncCheckpointIO(LightningCkptIO):
    """``Trainer(plugins=[AsyncCheckpointIO()])``: checkpoints stop stalling training, and are never torn.

    Each checkpoint at Lightning's path is one ``torch.load``-compatible file (plus a checksum record), written by a
    writer subprocess started at the first save and committed atomically (temp name, fsync, rename). Compared with
    Lightning's own ``AsyncCheckpointIO`` (same class name: on the command line write
    ``lightning_ckpt.AsyncCheckpointIO``): tensors are copied into reusable CPU shared memory (no device clone);
    ``remove_checkpoint`` is ordered after the saves issued before it and never deletes the newest complete
    checkpoint while its replacement is in flight; ``load_checkpoint`` (of any plugin in the process) waits for a
    pending save of that path; ModelCheckpoint's ``-vN`` names, ``save_last="link"`` and loggers see only
    committed files; a save outside the training loop returns once committed; a failed save is raised at the
    next save (or at the callback's next hook), once; ``teardown`` drains and the plugin restarts lazily
    afterwards (fit, validate, fit again).

    Staging: alone, ``save_checkpoint`` returns once the copy no longer reads live tensors; saves of one step
    share one staged copy. With ``AsyncCheckpointCallback`` the copy overlaps the next training step.

    Args: see ``LightningCkptIO`` (``config``, ``error_policy``, ``commit_hook``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.check_async(f"{type(self).__name__}.config")

    def _save(self, path: str, checkpoint: dict[str, Any], step: int | None,
              after_commit: Any = None) -> tuple[Future, Future]:
        checkpointer = self._ensure_checkpointer()
        metadata = {"step": int(step)} if step is not None else None
        stage_future, write_future = checkpointer.save(path, self.window.prepare(checkpoint), metadata=metadata,
                                                       snapshot_token=self.window.token(step),
                                                       after_commit=after_commit)
        if not self.window.defers_staging:
            _wait(stage_future, self.config.wait_timeout_secs, f"staging of {path}")
        return stage_future, write_future

    def _warm_up(self) -> None:
        self._ensure_checkpointer().start(block=False)

    def prepare_staging(self, module: Any, optimizers: list) -> None:
        nbytes = checkpoint_staging_bytes(module, optimizers)
        if nbytes is not None:
            self.staging_prepared = self._ensure_checkpointer().prepare_staging(nbytes)

    def _ensure_checkpointer(self) -> AsyncCheckpointer:
        if self._checkpointer is None:
            # Lightning saves on global rank 0 only and each checkpoint is one file: the writer is a single rank.
            self._checkpointer = make_async_checkpointer(self.config, RankInfo(0, 1), commit_hook=self.commit_hook,
                                                         error_store=self.ledger.errors)
            # At interpreter exit the core drains and closes every open AsyncCheckpointer (logging lost saves).
        return self._checkpointer
