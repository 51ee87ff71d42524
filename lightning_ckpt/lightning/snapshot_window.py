"""``SnapshotWindow``: when Lightning saves may share one staged copy and finish staging after they return."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from lightning_ckpt.lightning.binding import callback_pass
from lightning_ckpt.tree import map_leaves


class SnapshotWindow:
    """The one place that decides how a Lightning save is staged (owned by the plugin, driven by the callback).

    - Sharing: saves made by Lightning's own checkpoint callbacks within one pass of a callback hook
      (``last.ckpt`` after the top-k file, ModelCheckpoint after ``AsyncCheckpointCallback``, monitored or not)
      carry one snapshot token, so the second reuses the first one's staged copy when its tensors are the very
      same, unchanged ones (the stager checks identity and version counters; small scalars such as scores are
      captured per save). Version counters miss writes through ``.data`` or numpy views, so a token never spans
      user code: a callback of the user's that overrides the hook between the two savers starts a new token, and
      saves from anywhere else (the user's callbacks, the LightningModule, after ``fit``) are never shared.
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
        """The snapshot token of a save at ``step`` made now, from the calling stack (None: never shared)."""
        if step is None:
            return None
        site = _callback_pass_site()
        return None if site is None else ("step", int(step), *site)

    def prepare(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """``checkpoint`` as it may be staged: with deferred staging, tensors aliasing the module's buffers are
        cloned now (reused across the window's saves while unchanged); otherwise as it is."""
        if not (self.defers_staging and self.buffer_source is not None):
            return checkpoint
        pointers = {b.untyped_storage().data_ptr() for b in self.buffer_source() if b.numel()}
        return clone_aliasing(checkpoint, pointers, self._clones) if pointers else checkpoint


# Lightning's callbacks that read the training state in their hooks and never write it (no save, no weight change).
_OBSERVER_MODULES = ("lightning.pytorch.callbacks.progress", "lightning.pytorch.callbacks.lr_monitor",
                     "lightning.pytorch.callbacks.throughput_monitor", "lightning.pytorch.callbacks.device_stats_monitor",
                     "lightning.pytorch.callbacks.timer", "lightning.pytorch.callbacks.early_stopping",
                     "lightning.pytorch.callbacks.model_summary", "lightning.pytorch.callbacks.rich_model_summary",
                     "lightning_ckpt.lightning.binding")


def _callback_pass_site() -> tuple | None:
    """Where a save made now sits in Lightning's callback loop: ``(hook name, id of that pass, group)``, where
    ``group`` counts the callbacks before the saver that run code of the user's in this hook; None when the save
    does not come from Lightning's own checkpoint callbacks (ModelCheckpoint's or ours, hooks not overridden).

    Two saves with one site are of the same pass, with only Lightning's and our code between them. A trusted
    saver saves at most once per step and hook (each skips a step it saved), so the id of a loop frame reused by
    a later pass never meets the same step and hook again.
    """
    site = callback_pass()
    if site is None or _role(site.callback, site.hook) != "saver":
        return None
    group = 0
    for callback in site.callbacks:
        if callback is site.callback:
            return site.hook, site.pass_id, group
        group += _role(callback, site.hook) == "user"
    return None


def _role(callback: Any, hook: str) -> str:
    """``saver`` (Lightning's ModelCheckpoint or our callback, its own code for ``hook``), ``inert`` (the hook is
    not overridden, or is an observer's of Lightning's) or ``user`` (anything else may write the state)."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from lightning_ckpt.lightning.callback import AsyncCheckpointCallback

    fn = getattr(type(callback), hook, None)
    if fn is None or fn is getattr(Callback, hook, None):
        return "inert"
    if fn is getattr(ModelCheckpoint, hook, None) or fn is getattr(AsyncCheckpointCallback, hook, None):
        return "saver"
    return "inert" if getattr(fn, "__module__", "").startswith(_OBSERVER_MODULES) else "user"


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
