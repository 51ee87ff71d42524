"""``AsyncCheckpointCallback``: save cadence, keep-last-k, resume, safe points for async staging, error agreement."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_ckpt import paths
from lightning_ckpt.errors import CheckpointWriteError
from lightning_ckpt.latest import check_pattern
from lightning_ckpt.lightning.base_io import LightningCkptIO
from lightning_ckpt.lightning.ledger import CompletedSave
from lightning_ckpt.lightning.resume import CKPT_SUFFIX, find_latest_checkpoint, matching_checkpoints
from lightning_ckpt.lightning.binding import bypass_reason, find_plugin
from lightning_ckpt.lightning.sync_io import SyncCheckpointIO

log = logging.getLogger(__name__)


class AsyncCheckpointCallback(Callback):
    """Saves every N steps and/or T seconds and at train end, keeps the last k, and makes async saves safe.

    Put it beside ``Trainer(plugins=[AsyncCheckpointIO()])``. On ``setup`` it finds the plugin (also inside a
    ``_WrappingCheckpointIO``) and hands it the trainer's ranks and a barrier; without our plugin it writes its own
    checkpoints with a synchronous atomic writer and warns once. It also guards ModelCheckpoint (``-v1`` names see
    files still being written; ``save_last="link"`` links only committed files, atomically) and loggers that read
    the file in ``after_save_checkpoint`` (called once the file is committed, on the training thread).

    Staging (when the copy runs), with ``overlap_staging``: after ``on_train_batch_end`` (ours and every save after it in the same hook,
    ModelCheckpoint's included) the copy of parameters and optimizer state overlaps the next step and is waited for
    in ``on_before_optimizer_step``, before ``optimizer.step`` mutates them in place. Buffers are different: the
    next forward mutates them (BatchNorm running stats), so tensors aliasing the module's buffers are cloned at
    save time (they are small) and never read live later. With manual optimization the wait moves to
    ``on_train_batch_start``. Saves anywhere else (epoch end, validation, after fit) return only once their copy
    is done. Callbacks or hooks that change parameters in place outside ``optimizer.step`` after a save (EMA weight
    swaps, SWA) need ``CheckpointStagerConfig(use_async_staging=False)``.

    Errors: a failed save fails ``fit`` at the next training step. With several ranks, all ranks agree with
    ``reduce_boolean_decision`` at each step while a save is in flight and at train end, so every rank raises
    together instead of the others hanging in the next collective.

    Metrics: after each committed save (ours, ModelCheckpoint's, any through the plugin), ``ckpt/stall_ms``,
    ``ckpt/write_secs``, ``ckpt/gb_per_s``, ``ckpt/bytes`` and ``ckpt/step`` are logged (logger
    ``lightning_ckpt.lightning`` and, from rank 0 on the training thread, the trainer's logger at the step it logs
    at when the save lands, never an earlier one). ``saves`` keeps them.

    Args:
        dirpath: where its checkpoints go; default ``<default_root_dir>/checkpoints``.
        filename: name pattern with ``{step}`` (and optionally ``{epoch}``); ``.ckpt`` is appended unless it is
            already there.
        every_n_train_steps: save when ``global_step`` is a multiple of it.
        every_n_seconds: save when this many seconds passed since the last save (rank 0 decides).
        save_on_train_end: save at the end of fit (unless this step was just saved).
        keep_last_k: keep only the newest k of its own checkpoints (None: keep all). A file is removed only once
            the newer ones are committed; the newest committed one and one still being written are never removed.
        overlap_staging: let the copy overlap the next step (see Staging); None: when the module is on an
            accelerator. On a CPU-only machine the copy competes with training for the same cores, so there each
            save waits for its copy (still far shorter than a write).

    Raises:
        ValueError: a field out of range (named).
        NotADirectoryError: at setup, when ``dirpath`` is a file.
    """

    flushes_plugin = True  # the plugin's binding leaves metrics and logger calls to this callback

    def __init__(self, dirpath: Optional[str] = None, filename: str = "step={step}",
                 every_n_train_steps: Optional[int] = None, every_n_seconds: Optional[float] = None,
                 save_on_train_end: bool = True, keep_last_k: Optional[int] = None,
                 overlap_staging: Optional[bool] = None) -> None:
        _check_type("dirpath", dirpath, (str, os.PathLike), optional=True)
        _check_type("filename", filename, str)
        for name, value in (("every_n_train_steps", every_n_train_steps), ("keep_last_k", keep_last_k)):
            _check_type(name, value, int, optional=True)
        _check_type("every_n_seconds", every_n_seconds, (int, float), optional=True)
        _check_type("save_on_train_end", save_on_train_end, bool)
        _check_type("overlap_staging", overlap_staging, bool, optional=True)
        if keep_last_k is not None and keep_last_k < 1:
            raise ValueError(f"AsyncCheckpointCallback.keep_last_k must be >= 1 or None, got {keep_last_k}")
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(
                f"AsyncCheckpointCallback.every_n_train_steps must be >= 1 or None, got {every_n_train_steps}"
            )
        if every_n_seconds is not None and not every_n_seconds > 0:  # NaN too
            raise ValueError(f"AsyncCheckpointCallback.every_n_seconds must be > 0 or None, got {every_n_seconds}")
        if "{step}" not in filename:
            raise ValueError(f"AsyncCheckpointCallback.filename must contain '{{step}}', got {filename!r}")
        try:  # a save mid-fit must not be the first to find a bad pattern, nor resume miss what was saved
            check_pattern(filename)
        except ValueError as e:
            raise ValueError(f"AsyncCheckpointCallback.filename: {e}") from None
        self.dirpath = dirpath
        self.filename = _stem(filename)
        self.every_n_train_steps = every_n_train_steps
        self.every_n_seconds = every_n_seconds
        self.save_on_train_end = save_on_train_end
        self.keep_last_k = keep_last_k
        self.overlap_staging = overlap_staging
        self._overlap = bool(overlap_staging)
        self._plugin: LightningCkptIO | None = None
        self._fallback: SyncCheckpointIO | None = None
        self._dirpath: str | None = None
        self._saved: list[str] = []
        self._last_step_saved = -1
        self._last_save_time = time.monotonic()
        self._maybe_pending = False
        self._warned_absent = False

    @staticmethod
    def find_latest(dirpath: str, filename: str = "step={step}", verify: bool = False,
                    storage_options: Optional[dict] = None) -> str | None:
        """The newest complete checkpoint in ``dirpath`` (highest step whose checksum record reads; temp names never
        count), for ``trainer.fit(ckpt_path=...)``; None when there is none. ``verify`` also checks every tensor.
        ``dirpath`` may be a remote prefix (``s3://bucket/run``), listed and checked with ranged GETs."""
        return find_latest_checkpoint(dirpath, _stem(filename), verify=verify, storage_options=storage_options)

    @property
    def io(self) -> LightningCkptIO | None:
        """The plugin its saves go through (ours on the trainer, or its synchronous fallback)."""
        return self._plugin if self._plugin is not None else self._fallback

    @property
    def saves(self) -> list[CompletedSave]:
        """Committed saves through its plugin, with step, stall and write statistics (rank 0)."""
        return self.io.binding.saves if self.io is not None else []

    @property
    def total_stall_secs(self) -> float:
        return sum(s.stall_secs for s in self.saves)

    # ------------------------------------------------------------------ setup

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._plugin = find_plugin(trainer.strategy)
        if self._plugin is None:
            if not self._warned_absent:
                rank_zero_warn("AsyncCheckpointCallback: no AsyncCheckpointIO/SyncCheckpointIO on the trainer; its "
                               "own checkpoints are written synchronously (add plugins=[AsyncCheckpointIO()])")
                self._warned_absent = True
            self._fallback = self._fallback or SyncCheckpointIO()
        self.io.attach(trainer)
        reason = bypass_reason(trainer.strategy)
        if reason is not None:
            rank_zero_warn(f"{reason}: the CheckpointIO plugin is bypassed for saves, so they are neither async nor "
                           "checksummed by lightning_ckpt; AsyncCheckpointCallback only sets the cadence")
        self._dirpath = paths.path_key(self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints"))
        _refuse_file_dirpaths([self._dirpath] + [c.dirpath for c in trainer.checkpoint_callbacks
                                                 if isinstance(c, ModelCheckpoint) and c.dirpath])
        # Overlap pays where the copy runs beside the compute (device-to-host on a side stream); on a CPU-only
        # machine the copy competes with training for the same cores and memory bandwidth (measured: slower).
        self._overlap = self.overlap_staging if self.overlap_staging is not None else pl_module.device.type != "cpu"

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # The optimizers exist from here on; preparing now overlaps the sanity check and the dataloaders' start.
        # A fit that restores a checkpoint holds the loaded dict until train start: preparing then instead keeps
        # the staging buffer out of that peak.
        if trainer.ckpt_path is None:
            self._prepare_staging(trainer, pl_module)

    def _prepare_staging(self, trainer: Any, pl_module: Any) -> None:
        if self._plugin is not None and trainer.global_rank == 0 and bypass_reason(trainer.strategy) is None:
            self._plugin.prepare_staging(pl_module, trainer.optimizers)  # the first save then copies at full speed

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_save_time = time.monotonic()
        if trainer.ckpt_path is not None:
            self._prepare_staging(trainer, pl_module)
        options = self.io.storage_options if self.io is not None else None
        self._saved = [p for _, p in matching_checkpoints(self._dirpath, self.filename, options)] \
            if self.keep_last_k else []

    # ------------------------------------------------------------------ safe points

    def _arm(self, on: bool) -> None:
        if self.io is not None:
            self.io.window.open(self._overlap) if on else self.io.window.close()

    def _wait_staging(self) -> None:
        self._arm(False)
        if self.io is not None:
            self.io.ledger.wait_for_staging(self.io.config.wait_timeout_secs)

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._arm(False)
        if not pl_module.automatic_optimization:
            self._wait_staging()
        self._flush(trainer)

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._wait_staging()

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._agree_on_errors(trainer)
        self._flush(trainer)
        self._arm(True)  # our save and ModelCheckpoint's (it runs after us) overlap the next step
        if self._should_save(trainer):
            self._save(trainer)

    @override
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._arm(False)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._arm(True)

    @override
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._wait_staging()

    @override
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._arm(True)

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._wait_staging()
        if self.save_on_train_end and trainer.global_step > 0 and self._last_step_saved != trainer.global_step:
            self._save(trainer)
        if trainer.is_global_zero and self.io is not None:
            self.io.wait_for_saves()
        self._agree_on_errors(trainer, always=True)
        self._flush(trainer)

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        try:
            self._wait_staging()
        except Exception as e:  # noqa: BLE001 - the original exception is what propagates
            log.warning("waiting for checkpoint staging after %r failed: %s", exception, e)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._arm(False)

    @override
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._maybe_pending = True  # every rank runs this for every save: the agreement condition stays in step

    # ------------------------------------------------------------------ saving

    def _should_save(self, trainer: Any) -> bool:
        step = trainer.global_step
        if trainer.sanity_checking or trainer.fast_dev_run or step == 0 or step == self._last_step_saved:
            return False
        due = bool(self.every_n_train_steps and step % self.every_n_train_steps == 0)
        if self.every_n_seconds is not None:
            elapsed = time.monotonic() - self._last_save_time >= self.every_n_seconds
            due = trainer.strategy.broadcast(elapsed, src=0) or due  # rank 0 decides for every rank
        return due

    def _save(self, trainer: Any) -> None:
        name = self.filename.format(step=trainer.global_step, epoch=trainer.current_epoch) + CKPT_SUFFIX
        path = os.path.join(self._dirpath, name)
        if self._plugin is not None:
            trainer.save_checkpoint(path, weights_only=False)
        else:
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(False)
            if trainer.is_global_zero:
                self._fallback.save_checkpoint(checkpoint, path)
            trainer.strategy.barrier("AsyncCheckpointCallback.save")
        self._last_step_saved = trainer.global_step
        self._last_save_time = time.monotonic()
        self._prune(trainer, path)

    def _prune(self, trainer: Any, path: str) -> None:
        if self.keep_last_k is None:
            return
        if path in self._saved:
            self._saved.remove(path)
        self._saved.append(path)
        while len(self._saved) > self.keep_last_k:
            old = self._saved.pop(0)
            if trainer.is_global_zero:
                self.io.remove_checkpoint(old)  # ordered after the newer saves commit (see the ledger)

    # ------------------------------------------------------------------ errors and metrics

    def _agree_on_errors(self, trainer: Any, always: bool = False) -> None:
        """Raise a failed save on every rank at once (single process: just raise it)."""
        io = self.io
        if io is None:
            return
        ledger = io.ledger
        if trainer.world_size <= 1:
            error = ledger.take_error()
            if error is not None:
                raise error
            return
        if not (always or self._maybe_pending):
            return
        zero = trainer.is_global_zero
        pending = zero and bool(ledger.pending_paths())  # asked before the error, so a later failure is not missed
        error = ledger.peek_error() if zero else None
        all_ok = trainer.strategy.reduce_boolean_decision(error is None, all=True)
        self._maybe_pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        if all_ok:
            return
        error = ledger.take_error()
        if error is not None:
            raise error
        raise CheckpointWriteError(
            f"a checkpoint save failed on global rank 0 (see its log); global rank {trainer.global_rank} stops too"
        )

    def _flush(self, trainer: Any) -> None:
        if self.io is not None:
            self.io.binding.flush(trainer)


def _check_type(name: str, value: Any, types: Any, optional: bool = False) -> None:
    """Refuse a ``value`` of another type, naming the field (``bool`` is not an ``int`` here)."""
    if value is None and optional:
        return
    wants_number = types is int or (isinstance(types, tuple) and int in types)
    if not isinstance(value, types) or (wants_number and isinstance(value, bool)):
        expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ValueError(f"AsyncCheckpointCallback.{name} must be {expected}{' or None' if optional else ''}, "
                         f"got {value!r}")


def _stem(filename: str) -> str:
    """``filename`` without a trailing ``.ckpt`` (it is appended to every name)."""
    return filename[: -len(CKPT_SUFFIX)] if filename.endswith(CKPT_SUFFIX) else filename


def _refuse_file_dirpaths(dirpaths: list) -> None:
    for dirpath in dirpaths:
        dirpath = os.fspath(dirpath)
        if os.path.exists(dirpath) and not os.path.isdir(dirpath):
            raise NotADirectoryError(f"checkpoint dirpath {dirpath} is a file, not a directory")
