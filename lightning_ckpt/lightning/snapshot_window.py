"""``SnapshotWindow``: when Lightning saves may share one staged copy and finish staging after they return."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from lightning_ckpt.tree import map_leaves


class SnapshotWindow:
    """The one place that decides how a Lightning save is staged (owned by the plugin, driven by the callback).

    - Sharing: every save of a step carries that step as its snapshot token, so a second save of the same step
      (``last.ckpt`` after the top-k file, ModelCheckpoint after ``AsyncCheckpointCallback``, monitored or not)
      reuses the first one's staged copy when its tensors are the very same, unchanged ones (the stager checks
      identity and version counters; small scalars such as scores are captured per save).
    - Deferral: ``AsyncCheckpointCallback`` opens the window after ``on_train_batch_end`` and closes it before
      the next ``optimizer.step``. Inside, with ``overlap``, staging may finish after ``save_checkpoint``
      returns; the module's buffers (mutated by the next forward, e.g. BatchNorm running stats) are cloned at
      save time instead, and those clones are reused by every save of the window.
    """

    def __init__(self) -> None:
        self.is_open = False
        self.overlap = False
        self.buffer_source: Callable[[], Iterable[torch.Tensor]] | None = None
        self._clones: dict[tuple, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "buffer_source": None, "_clones": {}}

    def open(self, overlap: bool) -> None:
        if not self.is_open:
            self._clones = {}
        self.is_open, self.overlap = True, overlap

    def close(self) -> None:
        self.is_open = False

    @property
    def defers_staging(self) -> bool:
        """True when a save may return before its copy no longer reads live tensors."""
        return self.is_open and self.overlap

    @staticmethod
    def token(step: int | None) -> Any:
        """The snapshot token of a save at ``step`` (None: never shared)."""
        return ("step", int(step)) if step is not None else None

    def prepare(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """``checkpoint`` as it may be staged: with deferred staging, tensors aliasing the module's buffers are
        cloned now (reused across the window's saves while unchanged); otherwise as it is."""
        if not (self.defers_staging and self.buffer_source is not None):
            return checkpoint
        pointers = {b.untyped_storage().data_ptr() for b in self.buffer_source() if b.numel()}
        return clone_aliasing(checkpoint, pointers, self._clones) if pointers else checkpoint


def clone_aliasing(obj: Any, pointers: set[int], cache: dict[tuple, torch.Tensor] | None = None) -> Any:
    """``obj`` with every tensor whose storage starts at one of ``pointers`` replaced by a detached clone.

    ``cache`` reuses the clone of an unchanged tensor (same storage, view and version counter).
    """

    def clone(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor) or leaf.untyped_storage().data_ptr() not in pointers:
            return leaf
        if cache is None:
            return leaf.detach().clone()
        key = (leaf.data_ptr(), leaf.dtype, tuple(leaf.shape), leaf.stride(), leaf._version)
        copied = cache.get(key)
        if copied is None:
            copied = cache[key] = leaf.detach().clone()
        return copied

    return map_leaves(clone, obj)
