"""``LightningCkptIO``: what ``AsyncCheckpointIO`` and ``SyncCheckpointIO`` share (Lightning's CheckpointIO API)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
import warnings
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Literal, Optional

import torch
from lightning.fabric.plugins.io import CheckpointIO
from typing_extensions import override

from lightning_ckpt import commit, paths
from lightning_ckpt.barriers import Barrier
from lightning_ckpt.checkpoint_reader import CheckpointReader
from lightning_ckpt.checkpoint_writer import WriterHook
from lightning_ckpt.config import CheckpointerConfig
from lightning_ckpt.lightning.ledger import CompletedSave, SaveLedger
from lightning_ckpt.paths import RemotePath
from lightning_ckpt import remote_files
from lightning_ckpt.errors import CheckpointWriteError
from lightning_ckpt.remote import RemoteConfig, RemoteUpload
from lightning_ckpt.types import RankInfo

log = logging.getLogger(__name__)

ErrorPolicy = Literal["raise", "warn"]


class LightningCkptIO(CheckpointIO):
    """Common ground of our CheckpointIO plugins: ordering, errors, loading, metrics.

    Args:
        config: the core config tree (staging, queue depth ``max_in_flight``, timeouts, ``verify_on_load``).
        error_policy: ``"raise"``: a failed save fails training at the next save, callback hook or teardown;
            ``"warn"``: it is logged (logger ``lightning_ckpt.lightning``) and training continues.
        commit_hook: a ``WriterHook`` called around each commit (importable by module path).
        storage_options: fsspec options for remote paths (``s3://``): ``endpoint_url``, ``key``, ``secret``,
            ``client_kwargs``, ``config_kwargs``; Lightning's per-call ``storage_options`` are merged over them.
        remote_config: part size, concurrency and retries of remote uploads and downloads.

    Remote paths (``s3://bucket/run/x.ckpt``): the checkpoint is committed in the local cache
    (``$LIGHTNING_CKPT_CACHE_DIR``, default ``~/.cache/lightning_ckpt``), then the writer uploads it with a multipart
    upload whose completion is the commit; the save counts as done (removals, ``last.ckpt``, ``load``) only then.
    A remote save of the same step and unchanged weights as the previous remote save (ModelCheckpoint's
    ``save_last=True``) becomes a server-side copy of that object once it is complete, never a second upload.
    """

    def __init__(self, config: Optional[CheckpointerConfig] = None, error_policy: ErrorPolicy = "raise",
                 commit_hook: Optional[WriterHook] = None, storage_options: Optional[dict[str, Any]] = None,
                 remote_config: Optional[RemoteConfig] = None) -> None:
        if error_policy not in ("raise", "warn"):
            raise ValueError(f"{type(self).__name__}.error_policy must be 'raise' or 'warn', got {error_policy!r}")
        config = config if config is not None else CheckpointerConfig()
        # A Lightning checkpoint is one file at Lightning's path (torch.load and load_from_checkpoint read it).
        self.config = dataclasses.replace(config, writer_config=dataclasses.replace(config.writer_config, layout="file"))
        self.error_policy = error_policy
        self.commit_hook = commit_hook
        self.storage_options = dict(storage_options or {})
        self.remote_config = remote_config if remote_config is not None else RemoteConfig()
        self._last_remote: tuple | None = None  # (step, weights fingerprint, RemotePath) of the last upload
        self.rank_info = RankInfo(0, 1)
        self.barrier: Barrier | None = None
        self.defer_staging = False  # set by AsyncCheckpointCallback inside its safe window (with overlap)
        self._window_open = False
        self._window = 0  # counts the callback's safe windows: saves within one may share a staged copy
        self._buffer_clones: dict[tuple, torch.Tensor] = {}
        self._buffer_source: Callable[[], Iterable[torch.Tensor]] | None = None
        self._defer_errors = False
        self._attached = False
        self._checkpointer: Any = None
        self._ledger = SaveLedger()
        self._ledger.keep_errors = error_policy == "raise"

    def set_safe_window(self, open_: bool, overlap: bool = True) -> None:
        """Called by the callback: inside its safe window, saves of one step may share a staged copy and, with
        ``overlap``, finish staging after ``save_checkpoint`` returns (the callback waits before they matter)."""
        if open_ and not self._window_open:
            self._window += 1
            self._buffer_clones = {}
        self._window_open = open_
        self.defer_staging = open_ and overlap

    def snapshot_token(self, step: int | None) -> Any:
        """Saves of one safe window and step may share one staged copy (the stager also checks that every tensor
        is the same object with an unchanged version counter); outside a window nothing is shared."""
        return (self._window, step) if self._window_open and step is not None else None

    def __getstate__(self) -> dict:
        if self._checkpointer is not None:
            raise TypeError(f"a {type(self).__name__} in use cannot be pickled; pickle it before the first save")
        state = self.__dict__.copy()
        state["barrier"] = state["_buffer_source"] = None
        state["_buffer_clones"] = {}
        return state

    # ------------------------------------------------------------------ Lightning's API

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        """Save ``checkpoint`` at ``path`` (the directory is created now, the file appears atomically).

        Raises:
            TypeError: ``storage_options`` for a local path (like ``TorchCheckpointIO``).
            ValueError: a path we cannot write (``memory://``, an unknown protocol).
            CheckpointError: an earlier save failed (``error_policy="raise"``, single process).
        """
        location = self._locate(path, storage_options)
        self._check_world()
        self.raise_pending_error()
        step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
        local, after_commit = location, None
        if isinstance(location, RemotePath):
            if self._copy_instead(location, checkpoint, step):
                return
            local, after_commit = location.cache_path(), RemoteUpload(location, self.remote_config,
                                                                      self._remote_timeout())
        os.makedirs(os.path.dirname(local), exist_ok=True)  # a save_last="link" symlink needs the directory now
        start = time.perf_counter()
        try:
            stage_future, write_future = self._save(local, checkpoint, step, after_commit=after_commit)
        except Exception as e:
            if self.error_policy == "raise" and not self._defer_errors:
                raise
            self._ledger.record_error(e)
            return
        if isinstance(location, RemotePath):
            write_future.add_done_callback(lambda _: remote_files.forget_listings(location))
        self._ledger.add_save(location, step, stage_future, write_future, time.perf_counter() - start)

    @override
    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load a checkpoint after any pending save of the same path, verifying checksums (``verify_on_load``).

        Args:
            path: the checkpoint file.
            map_location: as ``torch.load``; None keeps every tensor on the CPU (Lightning's default).
            weights_only: as ``torch.load`` (None: torch's default).

        Raises:
            FileNotFoundError: nothing at ``path``.
            CorruptCheckpointError: the checksums do not match.
        """
        location = self._locate(path, None)
        self._ledger.wait(self.config.wait_timeout_secs, location)
        if self._ledger.has_pending_action(location):  # a last.ckpt copy waits for its source's save
            self._ledger.wait(self.config.wait_timeout_secs)
        local = location
        if isinstance(location, RemotePath):
            local = remote_files.download(location, location.cache_path("download"), self.remote_config,
                                          self._remote_timeout())
        try:
            if not os.path.exists(local):
                raise FileNotFoundError(f"Checkpoint file not found: {local}")
            reader = CheckpointReader(RankInfo(0, 1), verify=self.config.verify_on_load)
            loaded, _ = reader.read(local, map_location="cpu" if map_location is None else map_location,
                                    weights_only=weights_only)
        finally:
            if local is not location:
                commit.remove_path(local)  # a download of a remote object is read once
        return loaded

    @override
    def remove_checkpoint(self, path: Any) -> None:
        """Remove ``path`` once the saves issued before this call are committed.

        It is never removed while its own save or a newer save is in flight, and kept when one of them failed (it
        may be the newest complete checkpoint). A missing path is not an error.
        """
        location = self._locate(path, None)
        if isinstance(location, RemotePath):
            self._ledger.request_removal(location, remove=lambda: remote_files.delete(
                location, self.remote_config, self._remote_timeout()))
        else:
            self._ledger.request_removal(location)

    @override
    def teardown(self) -> None:
        """Drain pending saves, run what waits on them, and raise a failed save once; idempotent, reusable after.

        Raises:
            CheckpointError: a save failed and was not raised yet (``error_policy="raise"``).
        """
        self.set_safe_window(False)
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            self._close(checkpointer)
        try:
            self._ledger.wait(self.config.process_config.shutdown_timeout_secs)
        except Exception as e:  # noqa: BLE001 - reported like any failed save
            self._ledger.record_error(e)
        self._ledger.run_main_thread_actions()
        error = self._ledger.take_error()
        if error is not None:
            raise error

    # ------------------------------------------------------------------ for AsyncCheckpointCallback

    def attach(self, rank_info: RankInfo, barrier: Barrier | None = None,
               buffer_source: Callable[[], Iterable[torch.Tensor]] | None = None) -> None:
        """Called by the callback at setup: the trainer's ranks (errors are then agreed on, not raised on rank 0
        alone), a barrier over the strategy, and where the module's buffers are (cloned at save time)."""
        self.rank_info = rank_info
        self.barrier = barrier
        self._buffer_source = buffer_source
        self._defer_errors = rank_info.global_world_size > 1
        self._attached = True
        if rank_info.global_rank == 0:
            self._warm_up()

    def _warm_up(self) -> None:
        """Start what the first save would otherwise wait for (the async writer process)."""

    def wait_for_staging(self) -> float:
        """Block until no pending save reads live tensors; returns the seconds waited."""
        return self._ledger.wait_for_staging(self.config.wait_timeout_secs)

    def wait_for_saves(self, path: str | None = None) -> None:
        """Block until every pending save (of ``path``) is committed or failed; errors stay pending."""
        self._ledger.wait(self.config.wait_timeout_secs, path)

    def has_pending_saves(self) -> bool:
        return bool(self._ledger.pending_paths())

    def is_pending(self, path: Any) -> bool:
        """True while a save of ``path`` is in flight (ModelCheckpoint's version counter asks)."""
        return self._ledger.is_pending(path)

    def peek_error(self) -> BaseException | None:
        """The failed save that will be raised next, without clearing it."""
        return self._ledger.peek_error()

    def raise_pending_error(self) -> None:
        """Raise a failed save once (policy ``raise``; with several ranks only where the callback agrees)."""
        if not self._defer_errors:
            self.raise_error()

    def raise_error(self) -> None:
        error = self._ledger.take_error()
        if error is not None:
            raise error

    def pop_completed(self) -> list[CompletedSave]:
        """Saves committed since the last call, with their step and stall (for metrics)."""
        return self._ledger.pop_completed()

    def link_after_commit(self, target: str, linkpath: str) -> None:
        """Point ``linkpath`` at ``target`` atomically once ``target`` is committed (never a dangling link; on a
        remote store: a server-side copy)."""
        link, source = self._locate(linkpath, None), self._locate(target, None)
        if isinstance(link, RemotePath) or isinstance(source, RemotePath):
            self._request_copy(source, link)
            return
        os.makedirs(os.path.dirname(link), exist_ok=True)
        self._ledger.request_link(source, link)

    def call_after_commit(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the training thread once the saves pending now are committed (``run_main_thread_actions``)."""
        self._ledger.request_call(fn)
        self._ledger.run_main_thread_actions()

    def run_main_thread_actions(self) -> None:
        self._ledger.run_main_thread_actions()

    # ------------------------------------------------------------------ paths (local or remote)

    def _locate(self, path: Any, storage_options: Optional[dict]) -> paths.Location:
        if storage_options is not None and not paths.is_remote(path):
            raise TypeError(
                f"`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg is not supported for "
                f"`{type(self).__name__}` with the local path {os.fspath(path)!r}; it is for remote paths (s3://)."
            )
        return paths.resolve(path, {**self.storage_options, **(storage_options or {})})

    def _remote_timeout(self) -> float:
        """A remote call's deadline: before the writer is killed at ``write_timeout_secs``, so that a stuck
        upload is aborted by its own writer rather than left dangling."""
        return 0.8 * self.config.process_config.write_timeout_secs

    def _copy_instead(self, location: RemotePath, checkpoint: dict[str, Any], step: int | None) -> bool:
        """A save of the same step and weights as the last upload becomes a server-side copy of it."""
        fingerprint = _weights_fingerprint(checkpoint)
        last = self._last_remote
        if (last is not None and step is not None and fingerprint is not None and last[:2] == (step, fingerprint)
                and last[2] != location and last[2].bucket == location.bucket
                and last[2].storage_options == location.storage_options):
            self._request_copy(last[2], location)
            return True
        self._last_remote = (step, fingerprint, location)
        return False

    def _request_copy(self, source: paths.Location, dest: paths.Location) -> None:
        if not (isinstance(source, RemotePath) and isinstance(dest, RemotePath)):
            raise ValueError(f"cannot link {dest} to {source}: both must be in one remote store, or both local")

        def copy(*_: Any) -> None:
            try:
                remote_files.copy(source, dest, self.remote_config, self._remote_timeout())
            except Exception as e:  # noqa: BLE001 - raised at the next step like a failed save
                error = CheckpointWriteError(f"server-side copy of {source} to {dest} failed: {e}")
                error.__cause__ = e
                self._ledger.record_error(error)

        self._ledger.request_link(source, dest, make_link=copy)

    # ------------------------------------------------------------------ for subclasses

    def _save(self, path: str, checkpoint: dict[str, Any], step: int | None,
              after_commit: RemoteUpload | None = None) -> tuple[Future, Future]:
        raise NotImplementedError

    def _close(self, checkpointer: Any) -> None:
        try:
            checkpointer.close()
        except Exception as e:  # noqa: BLE001 - raised once from teardown through the ledger
            self._ledger.record_error(e)

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

    def _staged_state(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """With deferred staging, buffers (mutated by the next forward) are cloned now; the rest is copied later."""
        if not (self.defer_staging and self._buffer_source is not None):
            return checkpoint
        pointers = {b.untyped_storage().data_ptr() for b in self._buffer_source() if b.numel()}
        return clone_aliasing(checkpoint, pointers, self._buffer_clones) if pointers else checkpoint


def _weights_fingerprint(checkpoint: Any) -> tuple | None:
    """Identity and version of every tensor in ``checkpoint["state_dict"]``: equal means unchanged weights."""
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        return None
    try:
        return tuple((k, v.data_ptr(), v._version) for k, v in state.items() if isinstance(v, torch.Tensor))
    except RuntimeError:  # tensors without storage (meta, some subclasses): never treated as unchanged
        return None


def clone_aliasing(obj: Any, pointers: set[int], cache: dict[tuple, torch.Tensor] | None = None) -> Any:
    """``obj`` with every tensor whose storage starts at one of ``pointers`` replaced by a detached clone.

    ``cache`` reuses the clone of an unchanged tensor (same storage, view and version counter) across the saves of
    one safe window, so that their staged copies can be shared.
    """
    if isinstance(obj, torch.Tensor):
        if obj.untyped_storage().data_ptr() not in pointers:
            return obj
        if cache is None:
            return obj.detach().clone()
        key = (obj.data_ptr(), obj.dtype, tuple(obj.shape), obj.stride(), obj._version)
        clone = cache.get(key)
        if clone is None:
            clone = cache[key] = obj.detach().clone()
        return clone
    if isinstance(obj, dict):
        out = copy.copy(obj) if type(obj) is not dict else {}  # keeps an OrderedDict's _metadata
        for k, v in obj.items():
            out[k] = clone_aliasing(v, pointers, cache)
        return out
    if isinstance(obj, list):
        return [clone_aliasing(v, pointers, cache) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return type(obj)(clone_aliasing(v, pointers, cache) for v in obj)
    return obj
