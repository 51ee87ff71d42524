"""Where our plugins meet the Trainer: finding the plugin, strategy barriers, ModelCheckpoint and logger guards."""

from __future__ import annotations

import logging
import os
from typing import Any

from lightning_ckpt.lightning.base_io import LightningCkptIO

log = logging.getLogger(__name__)


class StrategyBarrier:
    """A ``Barrier`` over ``trainer.strategy.barrier(name)`` (main thread only: it is a collective)."""

    def __init__(self, strategy: Any, name: str = "lightning_ckpt") -> None:
        self.strategy = strategy
        self.name = name

    def execute_barrier(self) -> None:
        self.strategy.barrier(self.name)


def find_plugin(strategy: Any) -> LightningCkptIO | None:
    """Our plugin behind ``strategy.checkpoint_io``, unwrapping ``_WrappingCheckpointIO`` layers."""
    io = strategy.checkpoint_io
    for _ in range(8):
        if not _is_wrapper(io):
            break
        io = io.checkpoint_io
    return io if isinstance(io, LightningCkptIO) else None


def _is_wrapper(io: Any) -> bool:
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

    return isinstance(io, _WrappingCheckpointIO)


def bypass_reason(strategy: Any) -> str | None:
    """Why ``strategy`` saves without calling the CheckpointIO plugin, or None (checked by name: no extra deps)."""
    from lightning_ckpt.lightning.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        return None  # ours: sharded saves are committed and checksummed by lightning_ckpt
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if "DeepSpeedStrategy" in names:
        return "DeepSpeedStrategy saves through the DeepSpeed engine on every rank"
    if "FSDPStrategy" in names and getattr(strategy, "_state_dict_type", "full") == "sharded":
        return "FSDPStrategy(state_dict_type='sharded') saves with torch.distributed.checkpoint on every rank"
    if "ModelParallelStrategy" in names and getattr(strategy, "_save_distributed_checkpoint", False):
        return "ModelParallelStrategy(save_distributed_checkpoint=True) saves with torch.distributed.checkpoint"
    return None


def guard_model_checkpoint(callback: Any, plugin: LightningCkptIO) -> None:
    """Make a ModelCheckpoint safe with async saves (LIGHTNING_NOTES §3 hazards 2 and 3).

    - its version counter (``-v1`` names) also sees files still being written, so two saves never share a name;
    - ``save_last="link"`` links ``last.ckpt`` only once its target is committed, atomically: the old link stays
      valid until then, and stays if the new save fails.
    """
    callback._lightning_ckpt_plugin = plugin
    if getattr(callback, "_lightning_ckpt_guarded", False):
        return
    callback._lightning_ckpt_guarded = True

    def file_exists(filepath: Any, trainer: Any) -> bool:
        io = callback._lightning_ckpt_plugin
        local = bool(trainer.is_global_zero and (callback._fs.exists(filepath) or io.is_pending(filepath)))
        return trainer.strategy.reduce_boolean_decision(local, all=False)

    def link_checkpoint(trainer: Any, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            callback._lightning_ckpt_plugin.link_after_commit(filepath, linkpath)
        trainer.strategy.barrier()

    callback.file_exists = file_exists
    callback._link_checkpoint = link_checkpoint


def guard_loggers(loggers: list, plugin: LightningCkptIO) -> None:
    """Loggers that read the checkpoint file in ``after_save_checkpoint`` (W&B, Neptune, ...) are called only once
    the saves pending at that moment are committed, on the training thread (LIGHTNING_NOTES §3 hazard 7)."""
    from lightning.pytorch.loggers.logger import Logger

    for logger in loggers:
        logger._lightning_ckpt_plugin = plugin
        if type(logger).after_save_checkpoint is Logger.after_save_checkpoint:
            continue  # the base hook does nothing with the file
        if getattr(logger, "_lightning_ckpt_guarded", False):
            continue
        logger._lightning_ckpt_guarded = True
        original = logger.after_save_checkpoint

        def after_save_checkpoint(checkpoint_callback: Any, _logger: Any = logger, _original: Any = original) -> None:
            view = CheckpointCallbackView(checkpoint_callback)  # its paths as they are now, not when it runs
            _logger._lightning_ckpt_plugin.call_after_commit(lambda: _original(view))

        logger.after_save_checkpoint = after_save_checkpoint


class CheckpointCallbackView:
    """A ModelCheckpoint as it was at one save: its paths and scores frozen, everything else read live."""

    FROZEN = ("best_model_path", "last_model_path", "best_model_score", "best_k_models", "kth_best_model_path",
              "kth_value", "current_score", "_last_checkpoint_saved", "_last_global_step_saved")

    def __init__(self, callback: Any) -> None:
        object.__setattr__(self, "_callback", callback)
        for name in self.FROZEN:
            if hasattr(callback, name):
                value = getattr(callback, name)
                object.__setattr__(self, name, dict(value) if isinstance(value, dict) else value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._callback, name)
