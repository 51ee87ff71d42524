"""Checkpointers: ``SyncCheckpointer`` writes in the caller; ``AsyncCheckpointer`` stages and hands off."""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from lightning_ckpt import paths
from lightning_ckpt.barriers import create_barrier_from_config, host_barrier_store
from lightning_ckpt.checkpoint_process import CheckpointProcess
from lightning_ckpt.checkpoint_reader import CheckpointReader
from lightning_ckpt.checkpoint_writer import CheckpointWriter, WriteStats
from lightning_ckpt.error_store import ErrorStore, new_save_key
from lightning_ckpt.errors import CheckpointError, CheckpointTimeoutError
from lightning_ckpt.futures import TrackedFuture, completed_future
from lightning_ckpt.picklable import PicklableBeforeUse
from lightning_ckpt.staging import CheckpointStager, StagedCheckpoint
from lightning_ckpt.staging_buffer import StagingBufferTooLarge
from lightning_ckpt.types import STATE_DICT

log = logging.getLogger(__name__)


@dataclass
class SaveStats:
    """One save, end to end: what the caller was blocked by and when the checkpoint became durable."""

    path: str
    nbytes: int
    stall_secs: float  # inside save(): planning, pickling, and the copy when staging is synchronous
    stage_secs: float  # save() called -> staged copy independent of the live tensors
    write_secs: float  # the writer writing and fsyncing this rank's file
    durable_secs: float  # save() called -> committed at the final path
    fallback: bool = False  # written synchronously because the state exceeded the staging budget

    @property
    def gb_per_sec(self) -> float:
        return self.nbytes / self.write_secs / 1e9 if self.write_secs > 0 else float("inf")


class Checkpointer(ABC):
    """Saves and loads checkpoints; ``close`` releases everything it holds. Usable as a context manager."""

    reader: CheckpointReader

    @abstractmethod
    def save(self, path: str | os.PathLike, state_dict: STATE_DICT, **kwargs: Any) -> Any:
        """Save ``state_dict`` at ``path``."""

    def load(self, path: str | os.PathLike, state_dict: STATE_DICT | None = None, *,
             default_map_location: Any = None, strict: bool = False, **kwargs: Any) -> STATE_DICT:
        """Load a checkpoint (all of it, or only the keys of ``state_dict``, filled in place).

        Args:
            path: checkpoint file or multi-rank directory.
            state_dict: keys to load (partial read), or None for everything.
            default_map_location: as ``torch.load``'s ``map_location``.
            strict: raise if a key of ``state_dict`` is missing from the checkpoint.
            **kwargs: ``weights_only`` and ``verify``, passed to ``CheckpointReader.read``.

        Raises:
            FileNotFoundError, IncompleteCheckpointError, CorruptCheckpointError: see ``CheckpointReader.read``.
            CheckpointError: ``strict`` and keys are missing.
        """
        loaded, missing = self.reader.read(path, state_dict, map_location=default_map_location, **kwargs)
        if strict and missing:
            raise CheckpointError(f"checkpoint {os.fspath(path)} lacks the requested keys {missing}")
        return loaded

    def wait(self, timeout_secs: float | None = None) -> None:
        """Block until every save started so far is durable; raise a pending background error once."""

    @abstractmethod
    def close(self) -> None:
        """Finish or abandon pending work and free every resource; idempotent."""

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SyncCheckpointer(Checkpointer):
    """Writes in the calling thread from the live tensors: ``save`` returns once the checkpoint is committed."""

    def __init__(self, writer: CheckpointWriter, reader: CheckpointReader) -> None:
        self.writer = writer
        self.reader = reader
        self._closed = False

    def save(self, path: str | os.PathLike, state_dict: STATE_DICT, **kwargs: Any) -> SaveStats:
        """Write and commit ``state_dict`` at ``path``; returns what it cost.

        Raises:
            CheckpointError: the checkpointer is closed.
            TypeError: an unpicklable value (named by key path). OSError: the disk refused; nothing is left behind.
        """
        if self._closed:
            raise CheckpointError("SyncCheckpointer is closed")
        start = time.perf_counter()
        stats = self.writer.write(path, state_dict, **kwargs)
        elapsed = time.perf_counter() - start
        return SaveStats(stats.path, stats.nbytes, elapsed, elapsed, stats.write_secs, elapsed)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.writer.close()


@dataclass
class _InFlight:
    path: str
    stage_future: Future
    write_future: TrackedFuture


class AsyncCheckpointer(PicklableBeforeUse, Checkpointer):
    """Stages into reusable shared memory, then a persistent writer subprocess writes and commits.

    ``save`` returns ``(stage_future, write_future)``: wait on ``stage_future`` before mutating the saved tensors
    in place; ``write_future`` resolves to ``SaveStats`` once the checkpoint is committed. By default one save is
    in flight: a new save first waits for the previous one (``max_in_flight``). Better than the PyTorch original:
    a failed write is raised once (by the next ``save``/``wait``/``close`` unless its future was already looked
    at) and then cleared; a dead writer is replaced; every wait has a timeout; over the staging budget a save
    falls back to a synchronous write instead of allocating more.

    Args:
        checkpoint_stager: copies state dicts into staging buffers.
        checkpoint_process: the writer subprocess.
        reader: reads checkpoints back.
        max_in_flight: saves that may be pending at once (each holds its own staging buffer).
        wait_timeout_secs: how long ``save`` waits for a free slot and ``wait``/``close`` for pending saves.
        error_store: where failed saves are kept until raised (share one with the layer above, so that each
            failure is logged and raised once); a private one when None.
    """

    def __init__(self, checkpoint_stager: CheckpointStager, checkpoint_process: CheckpointProcess,
                 reader: CheckpointReader, *, max_in_flight: int = 1, wait_timeout_secs: float = 3600.0,
                 error_store: ErrorStore | None = None) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.stager = checkpoint_stager
        if hasattr(checkpoint_stager, "on_buffer_closed"):
            checkpoint_stager.on_buffer_closed = checkpoint_process.drop_buffer
        # A stager that bounds its buffers makes saves wait for a free buffer (a save sharing an unchanged
        # snapshot needs none); others are bounded here by counting pending saves.
        self._stager_bounds_buffers = hasattr(checkpoint_stager, "max_buffers")
        if self._stager_bounds_buffers:
            checkpoint_stager.max_buffers = max_in_flight
        self.process = checkpoint_process
        self.reader = reader
        self.max_in_flight = max_in_flight
        self.wait_timeout_secs = wait_timeout_secs
        self._inflight: deque[_InFlight] = deque()
        self.errors = error_store if error_store is not None else ErrorStore()
        self._lock = threading.Lock()
        self._seq = 0
        self._store: Any = None
        self._fallback: CheckpointWriter | None = None
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self._closed = False

    _RECREATED = {"_lock": threading.Lock}

    def _in_use(self) -> str | None:
        return "it has saved" if self._seq or self._starter is not None else None

    def save(self, path: str | os.PathLike, state_dict: STATE_DICT, **kwargs: Any) -> tuple[Future, Future]:
        """Start saving ``state_dict`` at ``path``.

        Args:
            path: final path (a file; a directory with several ranks).
            state_dict: what to save.
            **kwargs: ``metadata`` (json-able facts kept with the checksums); ``snapshot_token`` (a value such as
                the training step: a save with the same token as the previous one, of the same unchanged tensors,
                shares its staged copy); ``after_commit`` (run by the writer once committed, e.g. an upload).

        Returns:
            ``(stage_future, write_future)``; ``write_future`` resolves to ``SaveStats``.

        Raises:
            CheckpointWriteError: an earlier save failed (raised once, then cleared).
            CheckpointTimeoutError: the previous save did not finish within ``wait_timeout_secs``.
            TypeError: an unpicklable value in ``state_dict`` (named by key path).
        """
        if self._closed:
            raise CheckpointError("AsyncCheckpointer is closed")
        if self._starter is not None and not self._starter.is_alive():
            self._join_starter()  # never waits here: a start still running is waited for by the write itself
        self.check_for_errors()
        if not self._stager_bounds_buffers:
            self._wait_for_slot()
        self._seq += 1
        save_key = new_save_key()
        path = paths.local_path(path)
        after_commit = kwargs.get("after_commit")
        start = time.perf_counter()
        self._host_store()
        try:
            staged = self.stager.stage(state_dict, metadata=kwargs.get("metadata"),
                                       snapshot_token=kwargs.get("snapshot_token"))
        except StagingBufferTooLarge as e:
            return self._save_fallback(path, state_dict, save_key, start, e, after_commit)
        stall = time.perf_counter() - start
        stage_future = staged if isinstance(staged, Future) else completed_future(staged)
        write_future = TrackedFuture(save_key, lambda: self.errors.mark_seen(save_key))
        with self._lock:
            while self._inflight and self._inflight[0].write_future.done():
                self._inflight.popleft()  # finished saves are forgotten (their errors are kept in self.errors)
            self._inflight.append(_InFlight(path, stage_future, write_future))
        stage_future.add_done_callback(
            lambda f: self._dispatch(f, path, write_future, save_key, start, stall, after_commit))
        return stage_future, write_future

    def _dispatch(self, stage_future: Future, path: str, write_future: TrackedFuture, save_key: str,
                  start: float, stall: float, after_commit: Any = None) -> None:
        """Runs when staging is done: hand the staged checkpoint to the writer process."""
        if stage_future.exception() is not None:
            self._fail(write_future, stage_future.exception())
            return
        staged: StagedCheckpoint = stage_future.result()
        try:
            inner = self.process.write_prepared(path, staged.prepared, staged.buffer, save_key, after_commit)
        except BaseException as e:  # noqa: BLE001 - delivered through the future and raised once later
            self.stager.release(staged)
            self._fail(write_future, e)
            return
        inner.add_done_callback(lambda f: self._finish(f, staged, write_future, start, stall))

    def _finish(self, inner: Future, staged: StagedCheckpoint, write_future: TrackedFuture, start: float,
                stall: float) -> None:
        self.stager.release(staged)
        if inner.exception() is not None:
            self._fail(write_future, inner.exception())
            return
        stats: WriteStats = inner.result()
        result = SaveStats(stats.path, stats.nbytes, stall, staged.stage_secs, stats.write_secs,
                           time.perf_counter() - start)
        log.debug("saved %s: %d bytes, stall %.3fs, durable %.3fs", stats.path, stats.nbytes, stall,
                  result.durable_secs)
        write_future.set_result(result)

    def _fail(self, write_future: TrackedFuture, exc: BaseException) -> None:
        self.errors.record(exc, write_future.save_key)
        write_future.set_exception(exc)

    def _save_fallback(self, path: str, state_dict: STATE_DICT, save_key: str, start: float,
                       reason: Exception, after_commit: Any = None) -> tuple[Future, Future]:
        """The state exceeds the staging budget: wait for pending saves, then write from the live tensors here."""
        log.warning("%s; writing %s synchronously from the live tensors (slower path)", reason, path)
        self.wait()
        if self._fallback is None:
            proc = self.process
            barrier = create_barrier_from_config(proc.barrier_config, proc.rank_info)
            self._fallback = CheckpointWriter(proc.writer_config, proc.rank_info, barrier, proc.commit_hook)
        stats = self._fallback.write(path, state_dict, save_key=save_key, after_commit=after_commit)
        elapsed = time.perf_counter() - start
        result = SaveStats(stats.path, stats.nbytes, elapsed, elapsed, stats.write_secs, elapsed, fallback=True)
        return completed_future(None), completed_future(result)

    def _host_store(self) -> None:
        if self._store is None and self.process.barrier_config is not None:
            self._store = host_barrier_store(self.process.barrier_config, self.process.rank_info)

    def _wait_for_slot(self) -> None:
        while True:
            with self._lock:
                while self._inflight and self._inflight[0].write_future.done():
                    self._inflight.popleft()
                if len(self._inflight) < self.max_in_flight:
                    return
                oldest = self._inflight[0]
            self._wait_future(oldest, self.wait_timeout_secs)

    def _wait_future(self, entry: _InFlight, timeout_secs: float) -> None:
        done = _wait_done(entry.write_future, timeout_secs)
        if not done:
            raise CheckpointTimeoutError(f"save of {entry.path} did not finish within {timeout_secs}s")

    def start(self, block: bool = True) -> None:
        """Start the writer process ahead of the first save (which would otherwise pay for it).

        Args:
            block: wait until it runs; False starts it from a short-lived background thread (a failure to start
                is then raised by the next ``save``, ``wait`` or ``close``).
        """
        if self._closed:
            raise CheckpointError("AsyncCheckpointer is closed")
        if block:
            self.process.start()
        elif self._starter is None:
            self._starter = threading.Thread(target=self._start_quietly, name="lightning_ckpt-writer-start",
                                             daemon=True)
            self._starter.start()

    def _start_quietly(self) -> None:
        try:
            self.process.start()
        except BaseException as e:  # noqa: BLE001 - raised on the caller's thread later
            self._start_error = e

    def _join_starter(self) -> None:
        if self._starter is not None:
            self._starter.join(timeout=self.process.config.startup_timeout_secs)
            self._starter = None
        error, self._start_error = self._start_error, None
        if error is not None:
            raise error

    def pending_paths(self) -> list[str]:
        """Final paths of saves not yet committed (or failed), oldest first."""
        with self._lock:
            return [e.path for e in self._inflight if not e.write_future.done()]

    def wait_for_path(self, path: str | os.PathLike, timeout_secs: float | None = None) -> None:
        """Block until no save of ``path`` is pending (its error, if any, stays pending for ``check_for_errors``)."""
        path = os.path.abspath(os.fspath(path))
        with self._lock:
            entries = [e for e in self._inflight if e.path == path]
        for entry in entries:
            self._wait_future(entry, self.wait_timeout_secs if timeout_secs is None else timeout_secs)

    def wait(self, timeout_secs: float | None = None) -> None:
        self._wait_pending(timeout_secs)
        self.check_for_errors()

    def _wait_pending(self, timeout_secs: float | None) -> None:
        timeout_secs = self.wait_timeout_secs if timeout_secs is None else timeout_secs
        deadline = time.monotonic() + timeout_secs
        with self._lock:
            entries = list(self._inflight)
        for entry in entries:
            self._wait_future(entry, max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._inflight.clear()

    def check_for_errors(self) -> None:
        """Raise the oldest failed save nobody has seen yet (through its future or a raise), once."""
        self.errors.raise_pending()

    def load(self, path: str | os.PathLike, state_dict: STATE_DICT | None = None, *,
             default_map_location: Any = None, strict: bool = False, **kwargs: Any) -> STATE_DICT:
        """Like ``Checkpointer.load``, after any pending save of the same path has finished."""
        self.wait_for_path(path)
        return super().load(path, state_dict, default_map_location=default_map_location, strict=strict, **kwargs)

    def close(self) -> None:
        """Drain pending saves (up to ``wait_timeout_secs``), stop the writer, free buffers; idempotent.

        Raises:
            CheckpointWriteError: a pending save failed and nobody saw it yet (after everything is released).
        """
        if self._closed:
            return
        self._closed = True
        error: BaseException | None = None
        try:
            self._join_starter()
            self._wait_pending(None)
            self.errors.raise_pending(all_=True)  # nobody can take the later ones: named in its notes
        except BaseException as e:  # noqa: BLE001 - released first, raised after
            error = e
        finally:
            self.process.close()
            self.stager.close()
            if self._fallback is not None:
                self._fallback.close()
            self._store = None
        if error is not None:
            raise error


def _wait_done(future: Future, timeout_secs: float) -> bool:
    from concurrent.futures import wait

    done, _ = wait([future], timeout=timeout_secs)
    return bool(done)
