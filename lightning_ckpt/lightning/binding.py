"""``TrainerBinding``: where our plugin meets the Trainer that drives it (guards, save placement, metrics)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple

from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

if TYPE_CHECKING:
    from lightning_ckpt.lightning.base_io import LightningCkptIO
    from lightning_ckpt.lightning.ledger import CompletedSave

log = logging.getLogger(__name__)

_CALLER_FRAMES = 12  # Trainer.save_checkpoint -> Strategy.save_checkpoint [-> wrappers, profilers] -> ours
HPC_PREFIX = "hpc_ckpt_"  # Lightning's SLURM requeue saves: the job is requeued (killed) right after them


class StrategyBarrier:
    """A ``Barrier`` over ``trainer.strategy.barrier(name)`` (main thread only: it is a collective)."""

    def __init__(self, strategy: Any, name: str = "lightning_ckpt") -> None:
        self.strategy = strategy
        self.name = name

    def execute_barrier(self) -> None:
        self.strategy.barrier(self.name)


def find_plugin(strategy: Any) -> "LightningCkptIO | None":
    """Our plugin behind ``strategy.checkpoint_io``, unwrapping ``_WrappingCheckpointIO`` layers."""
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

    from lightning_ckpt.lightning.base_io import LightningCkptIO

    io = strategy._checkpoint_io  # the property would install a TorchCheckpointIO into an empty wrapper
    for _ in range(8):
        if not isinstance(io, _WrappingCheckpointIO):
            break
        io = io._checkpoint_io
    return io if isinstance(io, LightningCkptIO) else None


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


def calling_trainer(plugin: "LightningCkptIO") -> Any:
    """The Trainer whose call reached ``plugin`` (a few frames up the stack), or None for any other caller.

    Lightning hands a CheckpointIO no reference to its strategy or trainer; the trainer is the ``self`` of a
    calling frame (``Trainer.save_checkpoint``; ``Strategy.*_checkpoint`` under a trainer-attached module; the
    checkpoint connector for loads), and it must own ``plugin``.
    """
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import Strategy

    frame = sys._getframe(2)
    for _ in range(_CALLER_FRAMES):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, Strategy) and owner.lightning_module is not None:
            owner = getattr(owner.lightning_module, "_trainer", None)
        elif not isinstance(owner, Trainer):
            owner = getattr(owner, "trainer", None) if type(owner).__name__ == "_CheckpointConnector" else None
        if isinstance(owner, Trainer) and find_plugin(owner.strategy) is plugin:
            return owner
        frame = frame.f_back
    return None


class TrainerBinding:
    """The plugin's link to the Trainer driving it, made by ``bind`` (the callback's setup, or the first save).

    - ModelCheckpoint's version counter (``-v1`` names) also sees files still being written, and its
      ``save_last="link"`` links only committed files, atomically (LIGHTNING_NOTES §3 hazards 2 and 3);
    - loggers that read the file in ``after_save_checkpoint`` are called once it is committed (hazard 7);
    - a save requested outside the training loop returns once committed (``commits_before_return``);
    - metrics of committed saves and deferred logger calls run on the training thread (``flush``): from
      ``AsyncCheckpointCallback`` when it is there, else from a small callback added to the trainer.
    """

    def __init__(self, plugin: "LightningCkptIO") -> None:
        self.plugin = plugin
        self.saves: list[CompletedSave] = []
        self._trainer: Any = None  # weakref.ref to the bound trainer
        self._flushed_by_callback = False
        self._torn_down_at: tuple | None = None  # where the bound trainer's loop stood at the plugin's teardown

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_trainer": None, "saves": []}

    @property
    def trainer(self) -> Any:
        return self._trainer() if self._trainer is not None else None

    def bind(self, trainer: Any, by_callback: bool = False) -> None:
        """Guard ``trainer``'s ModelCheckpoints and loggers; without ``by_callback``, add the flushing callback."""
        if by_callback:
            self._flushed_by_callback = True
        if self.trainer is not trainer:
            self._trainer = weakref.ref(trainer)
            self._flushed_by_callback = by_callback or any(
                getattr(c, "flushes_plugin", False) for c in trainer.callbacks)
        for callback in trainer.checkpoint_callbacks:
            if issubclass(type(callback), ModelCheckpoint):  # a Mock(spec=ModelCheckpoint) is left alone
                guard_model_checkpoint(callback, self.plugin)
        guard_loggers(trainer.loggers, self.plugin)
        if not self._flushed_by_callback and not any(isinstance(c, _Flusher) for c in trainer.callbacks):
            trainer.callbacks.append(_Flusher(self))

    def bind_caller(self) -> Any:
        """Bind to the Trainer whose strategy is calling now (once per trainer); returns it, or None."""
        trainer = calling_trainer(self.plugin)
        if trainer is not None and trainer is not self.trainer:
            self.bind(trainer)
        return trainer

    def commits_before_return(self, trainer: Any, path: str) -> bool:
        """True when the caller may read ``path`` as soon as the save returns: a save through a Trainer outside
        its running fit (after ``fit``, in ``on_exception``, in ``on_fit_end`` or a callback's ``teardown``,
        which Lightning runs after the plugin's teardown, a SLURM requeue save made right before the job dies),
        a save inside the fit from anything but a checkpoint callback (Lightning's ``Checkpoint``, e.g.
        ModelCheckpoint) or AsyncCheckpointCallback (the user's callback or module may read the file next, as it
        can with ``TorchCheckpointIO``), or from a background thread (Lightning's own ``AsyncCheckpointIO``
        wrapping ours). Saves of those callbacks in the fit loop, and
        direct calls on the main thread (whoever holds the plugin waits with ``wait_for_saves``), stay in
        flight."""
        if trainer is None:
            return threading.current_thread() is not threading.main_thread()
        state = trainer.state
        in_loop = state.fn == TrainerFn.FITTING and state.status == TrainerStatus.RUNNING
        if in_loop and self._torn_down_at is not None and self._torn_down_at == _loop_position(trainer):
            in_loop = False  # still FITTING and RUNNING, but the plugin was torn down and nothing drains it
        if in_loop and not _from_checkpoint_callback():
            in_loop = False  # the user's code (their callback, the module) may read the file next, as with torch
        return not in_loop or bool(trainer.received_sigterm) or os.path.basename(path).startswith(HPC_PREFIX)

    def note_teardown(self, trainer: Any) -> None:
        """The plugin was torn down by ``trainer`` (None: not by a trainer): until its loop moves on (another
        fit), saves commit before returning."""
        self._torn_down_at = _loop_position(trainer) if trainer is not None else None

    def flush(self, trainer: Any) -> None:
        """Deferred logger calls and metrics of committed saves, on the training thread (rank 0 only)."""
        if trainer is None or not trainer.is_global_zero:
            return
        ledger = self.plugin.ledger
        ledger.run_main_thread_actions()
        for done in ledger.pop_completed():
            self.saves.append(done)
            if trainer.logger is not None:
                # At the step Lightning logs at now, never an older one (a commit lands steps after its save;
                # loggers such as W&B drop steps that go back): the save's own step is a metric.
                now = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
                metrics = done.metrics()
                if done.step is not None:
                    metrics["ckpt/step"] = float(done.step)
                trainer.logger.log_metrics(metrics, step=max(now, done.step or 0))


class CallbackPass(NamedTuple):
    """A save's place in Lightning's callback loop (``_call_callback_hooks``): the hook, the callbacks that
    loop runs, the one running now, and the id of the loop's frame (one per pass)."""

    hook: str
    callbacks: list
    callback: Any
    pass_id: int


_PASS_FRAMES = 48  # from the plugin's save up to Lightning's callback loop (about 8 frames for ModelCheckpoint)


def callback_pass() -> CallbackPass | None:
    """Where the save being made now sits in Lightning's callback loop, or None outside any callback hook."""
    from lightning.pytorch.trainer import call

    loop_code = call._call_callback_hooks.__code__
    frame = sys._getframe(1)
    for _ in range(_PASS_FRAMES):
        if frame is None:
            return None
        if frame.f_code is loop_code:
            local = frame.f_locals
            hook, callbacks = local.get("hook_name"), local.get("callbacks")
            if not isinstance(hook, str) or not isinstance(callbacks, list) or "callback" not in local:
                return None
            return CallbackPass(hook, callbacks, local["callback"], id(frame))
        frame = frame.f_back
    return None


def _from_checkpoint_callback() -> bool:
    """True when the save being made now comes from the hook of a checkpoint callback (Lightning's
    ``Checkpoint``: ModelCheckpoint and its kin) or of ours."""
    from lightning_ckpt.lightning.callback import AsyncCheckpointCallback

    site = callback_pass()
    return site is not None and isinstance(site.callback, (Checkpoint, AsyncCheckpointCallback))


def _loop_position(trainer: Any) -> tuple:
    """Where ``trainer``'s fit loop stands: its batches and epochs started so far (moves with every batch)."""
    loop = trainer.fit_loop
    return id(trainer), loop.epoch_loop.batch_progress.total.ready, loop.epoch_progress.total.ready


class _Flusher(Callback):
    """Runs ``TrainerBinding.flush`` at the training thread's safe points when no AsyncCheckpointCallback does."""

    def __init__(self, binding: TrainerBinding) -> None:
        self.binding = binding

    @property
    def state_key(self) -> str:
        return "lightning_ckpt._Flusher"

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self.binding.flush(trainer)

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.binding.flush(trainer)

    def on_validation_end(self, trainer: Any, *args: Any) -> None:
        self.binding.flush(trainer)

    def on_train_end(self, trainer: Any, *args: Any) -> None:
        self.binding.flush(trainer)


class _Guard:
    """A method installed on one ModelCheckpoint or logger instance that consults the bound plugin.

    Picklable (``ddp_spawn`` and ``deepcopy`` copy callbacks and loggers): the plugin is not carried along, and
    an unbound guard behaves like the method it replaces until the next ``bind``.
    """

    def __init__(self, owner: Any, plugin: "LightningCkptIO", name: str) -> None:
        self.owner = owner
        self.name = name
        self._plugin = weakref.ref(plugin)

    def original(self, *args: Any) -> Any:
        """The method this guard replaces (the class's)."""
        return getattr(type(self.owner), self.name)(self.owner, *args)

    @property
    def plugin(self) -> "LightningCkptIO | None":
        return self._plugin() if self._plugin is not None else None

    def rebind(self, plugin: "LightningCkptIO") -> None:
        self._plugin = weakref.ref(plugin)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_plugin": None}


class _FileExists(_Guard):
    """``ModelCheckpoint.file_exists`` that also sees files still being written (no two saves share a name)."""

    def __call__(self, filepath: Any, trainer: Any) -> bool:
        plugin = self.plugin
        if plugin is None:
            return self.original(filepath, trainer)
        local = bool(trainer.is_global_zero and (self.owner._fs.exists(filepath) or plugin.ledger.is_pending(filepath)))
        return trainer.strategy.reduce_boolean_decision(local, all=False)


class _LinkCheckpoint(_Guard):
    """``ModelCheckpoint._link_checkpoint`` that links only a committed target, atomically."""

    def __call__(self, trainer: Any, filepath: str, linkpath: str) -> None:
        plugin = self.plugin
        if plugin is None:
            type(self.owner)._link_checkpoint(trainer, filepath, linkpath)  # a staticmethod
            return
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            plugin.link_after_commit(filepath, linkpath)
        trainer.strategy.barrier()


class _AfterSaveCheckpoint(_Guard):
    """A logger's ``after_save_checkpoint``, called once the saves pending now are committed (training thread)."""

    def __call__(self, checkpoint_callback: Any) -> None:
        plugin = self.plugin
        if plugin is None:
            self.original(checkpoint_callback)
            return
        view = CheckpointCallbackView(checkpoint_callback)  # its paths as they are now, not when it runs
        plugin.ledger.call_after_commit(lambda: self.original(view))


def _install(owner: Any, name: str, guard_cls: type, plugin: "LightningCkptIO") -> None:
    current = owner.__dict__.get(name)
    if isinstance(current, guard_cls):
        current.rebind(plugin)
    else:
        setattr(owner, name, guard_cls(owner, plugin, name))


def guard_model_checkpoint(callback: Any, plugin: "LightningCkptIO") -> None:
    """ModelCheckpoint's version counter sees files still being written; ``save_last="link"`` links only committed
    files, atomically: the old link stays valid until the new target is committed, and stays if its save fails."""
    if type(callback).file_exists is ModelCheckpoint.file_exists:  # a subclass's own rule is left alone
        _install(callback, "file_exists", _FileExists, plugin)
    _install(callback, "_link_checkpoint", _LinkCheckpoint, plugin)


def guard_loggers(loggers: list, plugin: "LightningCkptIO") -> None:
    """Loggers that read the checkpoint file in ``after_save_checkpoint`` (W&B, Neptune, MLflow ...) are called
    once the saves pending at that moment are committed, on the training thread."""
    from lightning.pytorch.loggers.logger import Logger

    for logger in loggers:
        if type(logger).after_save_checkpoint is not Logger.after_save_checkpoint:  # the base hook ignores the file
            _install(logger, "after_save_checkpoint", _AfterSaveCheckpoint, plugin)


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
