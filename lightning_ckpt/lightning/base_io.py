"""``LightningCkptIO``: what ``AsyncCheckpointIO`` and ``SyncCheckpointIO`` share (Lightning's CheckpointIO API)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
import warnings
from concurrent.futures import Future
from typing import Any, Literal, Optional

import torch
from lightning.fabric.plugins.io import CheckpointIO
from lightning.pytorch.trainer.states import TrainerStatus
from typing_extensions import override

from lightning_ckpt import commit, fsspec_read, paths, remote_files
from lightning_ckpt.barriers import Barrier
from lightning_ckpt.builder import make_sync_checkpointer
from lightning_ckpt.checkpoint_reader import CheckpointReader
from lightning_ckpt.checkpointer import SyncCheckpointer
from lightning_ckpt.checkpoint_writer import WriterHook
from lightning_ckpt.config import CheckpointerConfig
from lightning_ckpt.errors import rename_in_error
from lightning_ckpt.futures import completed_future
from lightning_ckpt.lightning.binding import StrategyBarrier, TrainerBinding, calling_trainer
from lightning_ckpt.lightning.ledger import SaveLedger, wait_in_process
from lightning_ckpt.lightning.plugin_config import coerce_config, coerce_remote_config, coerce_storage_options
from lightning_ckpt.lightning.remote_copy import SaveLastCopies
from lightning_ckpt.lightning.snapshot_window import SnapshotWindow
from lightning_ckpt.paths import RemotePath
from lightning_ckpt.remote import RemoteConfig, RemoteUpload, upload_timeout_secs
from lightning_ckpt.types import RankInfo

log = logging.getLogger(__name__)

ErrorPolicy = Literal["raise", "warn"]


def ensure_directory(path: str) -> None:
    """Create the directory of ``path`` now (a ``save_last="link"`` symlink needs it), refusing a file there.

    Raises:
        NotADirectoryError: the directory (or one above it) is a file.
    """
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise NotADirectoryError(f"checkpoint directory {parent} is not a directory (a file is in the way)") from e


class LightningCkptIO(CheckpointIO):
    """Common ground of our CheckpointIO plugins: ordering, errors, loading, metrics.

    Alone on a Trainer, the plugin binds itself to it at its first call (``TrainerBinding``): ModelCheckpoint's
    ``-vN`` names, top-k removal, ``save_last`` (True and ``"link"``) and loggers' ``after_save_checkpoint``
    behave as with ``TorchCheckpointIO``; a save requested outside the training loop (``trainer.save_checkpoint``
    after ``fit``, ``on_exception``, a SLURM requeue) returns once committed; one inside it stays async.

    Args:
        config: the core config tree (staging, queue depth ``max_in_flight``, timeouts, ``verify_on_load``), or
            the same as a dict (YAML); checked here, field by field.
        error_policy: ``"raise"``: a failed save fails training at the next save, callback hook or teardown;
            ``"warn"``: one line is logged (logger ``lightning_ckpt.lightning``, traceback at DEBUG) and
            training continues.
        commit_hook: a ``WriterHook`` called around each commit (importable by module path).
        storage_options: fsspec options for remote paths (``s3://``): ``endpoint_url``, ``key``, ``secret``,
            ``client_kwargs``, ``config_kwargs``; Lightning's per-call ``storage_options`` are merged over them.
        remote_config: part size, concurrency and retries of remote uploads and downloads, or the same as a
            dict (YAML); checked like ``config``.

    Remote paths (``s3://bucket/run/x.ckpt``): the checkpoint is committed in the local cache
    (``$LIGHTNING_CKPT_CACHE_DIR``, default ``~/.cache/lightning_ckpt``), then the writer uploads it with a multipart
    upload whose completion is the commit; the save counts as done (removals, ``last.ckpt``, ``load``) only then.
    ModelCheckpoint's ``save_last=True`` save of the very checkpoint it has just uploaded (same step, the whole
    checkpoint unchanged) becomes a server-side copy of that object once it is complete, never a second upload;
    every other remote save is uploaded.
    With ``RemoteConfig(stream_from_staging=True)`` nothing is written locally: the parts are serialized from the
    staging memory into the upload, which holds that memory until the upload completes.

    Raises:
        ValueError: a bad ``config`` or ``remote_config`` field, ``storage_options`` or ``error_policy`` (named;
            a value of the wrong type raises ``ConfigTypeError``, a ``TypeError`` too).
    """

    def __init__(self, config: Optional[CheckpointerConfig] = None, error_policy: ErrorPolicy = "raise",
                 commit_hook: Optional[WriterHook] = None, storage_options: Optional[dict[str, Any]] = None,
                 remote_config: Optional[RemoteConfig] = None) -> None:
        name = type(self).__name__
        if error_policy not in ("raise", "warn"):
            raise ValueError(f"{name}.error_policy must be 'raise' or 'warn', got {error_policy!r}")
        self.config = coerce_config(config, f"{name}.config")
        # A Lightning checkpoint is one file at Lightning's path (torch.load and load_from_checkpoint read it).
        self.config = dataclasses.replace(self.config, writer_config=dataclasses.replace(self.config.writer_config, layout="file"))
        self.error_policy = error_policy
        self.commit_hook = commit_hook
        self.storage_options = coerce_storage_options(storage_options, f"{name}.storage_options")
        self.remote_config = coerce_remote_config(remote_config, f"{name}.remote_config")
        self.save_last_copies = SaveLastCopies(self)  # remote save_last: a server-side copy, not an upload
        self.rank_info = RankInfo(0, 1)
        self.barrier: Barrier | None = None
        self.window = SnapshotWindow()
        self.staging_prepared: Any = None  # future of the staging buffer prepared at fit start (async plugin)
        self.ledger = SaveLedger()
        self.ledger.keep_errors = error_policy == "raise"
        self.binding = TrainerBinding(self)
        self._defer_errors = False  # several ranks: the callback agrees on errors, rank 0 alone never raises
        self._attached = False
        self._checkpointer: Any = None  # the async checkpointer (AsyncCheckpointIO)
        self._writer: SyncCheckpointer | None = None  # in-process writes: saves that commit before returning

    def __getstate__(self) -> dict:
        if self._checkpointer is not None or self._writer is not None:
            raise TypeError(f"a {type(self).__name__} in use cannot be pickled; pickle it before the first save")
        return {**self.__dict__, "barrier": None}

    # ------------------------------------------------------------------ Lightning's API

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        """Save ``checkpoint`` at ``path`` (the directory is created now, the file appears atomically).

        Raises:
            TypeError: ``storage_options`` for a local path (like ``TorchCheckpointIO``).
            ValueError: a path we cannot write (``memory://``, an unknown protocol).
            NotADirectoryError: a file is where the checkpoint directory should be.
            CheckpointError: this save (outside the training loop) or an earlier one failed (``"raise"``).
        """
        location = self._locate(path, storage_options)
        trainer = self.binding.bind_caller()
        self._check_world()
        self.raise_pending_error()
        step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
        local, after_commit, fingerprint = location, None, None
        remote = isinstance(location, RemotePath)
        commit_now = self.binding.commits_before_return(trainer, location.key if remote else location)
        if remote:
            if self.save_last_copies.copy_instead(trainer, location, checkpoint, step, commit_now):
                return
            fingerprint = self.save_last_copies.before_upload(trainer, checkpoint)
            local, after_commit = location.cache_path(), RemoteUpload(location, self.remote_config,
                                                                      self._remote_timeout())
        if after_commit is None or not self.remote_config.stream_from_staging:
            ensure_directory(local)  # a streamed upload writes nothing locally
        start = time.perf_counter()
        # Deferred errors are raised later on every rank together: an earlier failure must not stop this save.
        deferring = self.ledger.errors.deferred() if self._defer_errors else contextlib.nullcontext()
        try:
            with deferring:
                if commit_now:
                    stage_future, write_future = self._write_now(local, checkpoint, step, after_commit)
                else:
                    stage_future, write_future = self._save(local, checkpoint, step, after_commit)
        except Exception as e:
            self._fail(e)
            return
        if remote:
            write_future.add_done_callback(lambda _: remote_files.forget_listings(location))
            self.save_last_copies.after_upload(location, step, fingerprint, write_future)
        self.ledger.add_save(location, step, stage_future, write_future, time.perf_counter() - start)

    def _fail(self, error: Exception) -> None:
        """A save that failed before ``save_checkpoint`` returned: raised (policy ``raise``), else kept."""
        if self.error_policy == "raise" and not self._defer_errors:
            raise error
        self.ledger.record_error(error)

    @override
    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load a checkpoint once no save of that path is pending (in any plugin of this process), verifying
        checksums (``verify_on_load``).

        Args:
            path: the checkpoint file: a local path or ``file://``, ``s3://``, ``gs://`` URL, or any other fsspec URL
                (``https://``, ...: read once through fsspec into the local cache, as Lightning's default reads it).
            map_location: as ``torch.load``; None keeps every tensor on the CPU (Lightning's default).
            weights_only: as ``torch.load`` (None: torch's default).

        Raises:
            FileNotFoundError: nothing at ``path``.
            CorruptCheckpointError: the checksums do not match.
        """
        self.binding.bind_caller()
        if fsspec_read.is_read_only_url(path):  # http(s)://, memory://, ...: read as Lightning's default reads them
            url = os.fspath(path)
            local, downloaded = fsspec_read.download(url, self._remote_timeout()), url
            weights_only = fsspec_read.weights_only_default(url, weights_only)
        else:
            location = self._locate(path, None)
            wait_in_process(location, self.config.wait_timeout_secs)
            downloaded = location.url if isinstance(location, RemotePath) else None
            local = location if downloaded is None else remote_files.download(
                location, paths.download_path(location.url, location.name), self.remote_config,
                self._remote_timeout())
        try:
            if not os.path.exists(local):
                raise FileNotFoundError(f"Checkpoint file not found: {os.fspath(path)}")
            reader = CheckpointReader(RankInfo(0, 1), verify=self.config.verify_on_load)
            loaded, _ = reader.read(local, map_location="cpu" if map_location is None else map_location,
                                    weights_only=weights_only)
        except BaseException as e:
            if downloaded is not None:  # errors name the object, not its private copy (gone once raised)
                rename_in_error(e, re.compile(re.escape(local)), downloaded)
            raise
        finally:
            if downloaded is not None:
                commit.remove_path(local)  # a download is read once
        return loaded

    @override
    def remove_checkpoint(self, path: Any) -> None:
        """Remove ``path`` once the saves issued before this call are committed.

        It is never removed while its own save or a newer save is in flight, and kept when one of them failed (it
        may be the newest complete checkpoint). A missing path is not an error.
        """
        location = self._locate(path, None)
        if isinstance(location, RemotePath):
            self.ledger.request_removal(location, remove=lambda: remote_files.delete(
                location, self.remote_config, self._remote_timeout()))
        else:
            self.ledger.request_removal(location)

    @override
    def teardown(self) -> None:
        """Drain pending saves, run what waits on them, and raise a failed save once; idempotent, reusable after.

        Raises:
            CheckpointError: a save failed and was not raised yet (``error_policy="raise"``). When Lightning tears
                down on the way out of another exception (``fit`` interrupted), that exception propagates instead,
                with the failed save logged and added to its notes.
        """
        trainer = calling_trainer(self) or self.binding.trainer
        self.window.close()
        for name in ("_checkpointer", "_writer"):
            checkpointer = getattr(self, name)
            setattr(self, name, None)
            if checkpointer is not None:
                self._close(checkpointer)
        try:
            self.ledger.wait(self.config.process_config.shutdown_timeout_secs)
        except Exception as e:  # noqa: BLE001 - reported like any failed save
            self.ledger.record_error(e)
        self.binding.flush(self.binding.trainer)
        self.ledger.run_main_thread_actions()
        self.binding.note_teardown(trainer)
        error = self.ledger.take_error(all_=True)
        if error is None:
            return
        handled = _exception_being_handled(trainer)
        if handled is None:
            raise error
        # Lightning tears down on the way out of an exception (the user's, a Ctrl-C): that one propagates.
        log.error("a checkpoint save failed while %s propagated: %s", type(handled).__name__, error)
        handled.add_note(f"lightning_ckpt: a checkpoint save had also failed: {type(error).__name__}: {error}")

    def wait_for_saves(self, path: Any = None) -> None:
        """Block until every pending save (of ``path``) is committed or failed; errors stay pending.

        Raises:
            CheckpointTimeoutError: still pending after ``config.wait_timeout_secs``.
        """
        self.ledger.wait(self.config.wait_timeout_secs, None if path is None else self._locate(path, None))

    # ------------------------------------------------------------------ for AsyncCheckpointCallback

    def attach(self, trainer: Any) -> None:
        """Called by the callback at setup: the trainer's ranks (errors are then agreed on, not raised on rank 0
        alone), a barrier over the strategy, the module's buffers (cloned at save time when staging is
        deferred), and the binding (the callback flushes metrics and logger calls)."""
        self.rank_info = RankInfo(trainer.global_rank, trainer.world_size)
        self.barrier = StrategyBarrier(trainer.strategy)
        self.window.buffer_source = trainer.lightning_module.buffers
        self._defer_errors = self.rank_info.global_world_size > 1
        self._attached = True
        self.binding.bind(trainer, by_callback=True)
        if self.rank_info.global_rank == 0:
            self._warm_up()

    def link_after_commit(self, target: Any, linkpath: Any) -> None:
        """Point ``linkpath`` at ``target`` atomically once ``target`` is committed (never a dangling link; on a
        remote store: a server-side copy). ModelCheckpoint's ``save_last="link"`` goes through here."""
        link, source = self._locate(linkpath, None), self._locate(target, None)
        if isinstance(link, RemotePath) or isinstance(source, RemotePath):
            self.save_last_copies.request_copy(source, link)
            return
        self.ledger.request_link(source, link)

    # ------------------------------------------------------------------ paths (local or remote)

    def _locate(self, path: Any, storage_options: Optional[dict]) -> paths.Location:
        """The one place a Lightning path becomes what we write, read and remove (local: absolute)."""
        if storage_options is not None and not paths.is_remote(path):
            raise TypeError(
                f"`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg is not supported for "
                f"`{type(self).__name__}` with the local path {os.fspath(path)!r}; it is for remote paths (s3://)."
            )
        return paths.resolve(path, {**self.storage_options, **(storage_options or {})})

    def _remote_timeout(self) -> float:
        return upload_timeout_secs(self.config.process_config.write_timeout_secs)

    # ------------------------------------------------------------------ for subclasses

    def _save(self, path: str, checkpoint: dict[str, Any], step: int | None,
              after_commit: RemoteUpload | None = None) -> tuple[Future, Future]:
        """Start a save inside the training loop (it may stay in flight after ``save_checkpoint`` returns)."""
        return self._write_now(path, checkpoint, step, after_commit)

    def _write_now(self, path: str, checkpoint: dict[str, Any], step: int | None,
                   after_commit: RemoteUpload | None = None) -> tuple[Future, Future]:
        """Write and commit in this thread, after the saves already pending (no thread or process is left
        running: a save after ``fit`` may be the process's last act)."""
        self.ledger.wait(self.config.wait_timeout_secs)
        if self._writer is None:
            self._writer = make_sync_checkpointer(self.config, RankInfo(0, 1), self.commit_hook)
        metadata = {"step": int(step)} if step is not None else None
        self._writer.save(path, checkpoint, metadata=metadata, after_commit=after_commit)
        return completed_future(None), completed_future(None, stats=self._writer.last_save_stats)

    def _warm_up(self) -> None:
        """Start what the first save would otherwise wait for (the async writer process)."""

    def prepare_staging(self, module: Any, optimizers: list) -> None:
        """Called by the callback on rank 0 at fit start (at train start when resuming): prepare in the background
        what the first save of ``module`` and ``optimizers`` would otherwise allocate and fault in (the async
        plugin's staging buffer; ``staging_prepared`` is then a future of whether it was prepared)."""

    def _close(self, checkpointer: Any) -> None:
        try:
            checkpointer.close()
        except Exception as e:  # noqa: BLE001 - raised once from teardown through the ledger
            self.ledger.record_error(e)

    def raise_pending_error(self) -> None:
        """Raise the oldest failed save not raised yet, once (policy ``raise``; with several ranks only where the
        callback agrees on it)."""
        if not self._defer_errors:
            error = self.ledger.take_error()
            if error is not None:
                raise error

    def _check_world(self) -> None:
        """Without the callback under several ranks, raising on rank 0 alone would hang the others."""
        if self._attached or self._defer_errors:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            self._defer_errors = True
            warnings.warn(
                f"{type(self).__name__} runs with several ranks but without AsyncCheckpointCallback: failed saves "
                "are logged and raised from teardown on rank 0 only; add the callback so every rank fails together",
                stacklevel=3,
            )


def _exception_being_handled(trainer: Any) -> BaseException | None:
    """The exception an interrupted ``trainer`` is tearing down for (Lightning calls teardown inside its
    ``except`` clause), else None."""
    if trainer is None or trainer.state.status != TrainerStatus.INTERRUPTED:
        return None
    return sys.exc_info()[1]

