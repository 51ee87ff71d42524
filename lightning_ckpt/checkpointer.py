"""Checkpointers: ``SyncCheckpointer`` writes in the caller; ``AsyncCheckpointer`` stages and hands off."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from lightning_ckpt import paths, remote_dirs
from lightning_ckpt.remote import upload_timeout_secs
from lightning_ckpt.checkpoint_process import CheckpointProcess
from lightning_ckpt.checkpoint_reader import CheckpointReader
from lightning_ckpt.checkpoint_writer import CheckpointWriter
from lightning_ckpt.error_store import ErrorStore, new_save_key
from lightning_ckpt.errors import CheckpointError, CheckpointTimeoutError
from lightning_ckpt.futures import TrackedFuture, completed_future, peek_exception, uncancellable_future
from lightning_ckpt.picklable import PicklableBeforeUse
from lightning_ckpt.staging import CheckpointStager, DefaultStager, StagedCheckpoint, StagedStateDict
from lightning_ckpt.staging_buffer import StagingBufferTooLarge
from lightning_ckpt.types import STATE_DICT, SaveStats
from lightning_ckpt.worker_protocol import SendTime

__all__ = ["AsyncCheckpointer", "Checkpointer", "SaveStats", "SyncCheckpointer"]

log = logging.getLogger(__name__)

_SAVE_KWARGS = ("metadata", "snapshot_token", "after_commit")  # what AsyncCheckpointer.save takes with a DefaultStager


class Checkpointer(ABC):
    """Saves and loads checkpoints; ``close`` releases everything it holds. Usable as a context manager.

    ``last_save_stats`` is the ``SaveStats`` of the newest save that completed (None before the first).
    """

    reader: CheckpointReader
    last_save_stats: SaveStats | None = None

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
            CheckpointError (a ``RuntimeError``): ``strict`` and keys are missing ("missing keys" in the message).
        """
        loaded, missing = self.reader.read(path, state_dict, map_location=default_map_location, **kwargs)
        if strict and missing:
            raise CheckpointError(f"checkpoint {os.fspath(path)} has missing keys: {missing}")
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

    def save(self, path: str | os.PathLike, state_dict: STATE_DICT, **kwargs: Any) -> None:
        """Write and commit ``state_dict`` at ``path`` (what it cost: ``last_save_stats``).

        Args:
            path: final path: local, or remote (``s3://bucket/ckpt``, see ``remote_dirs``: one object, or with
                layout ``"dir"`` a generation of rank objects committed by its manifest).
            state_dict: what to save.
            **kwargs: passed to the writer's ``write`` (and its hooks); ours: ``metadata``, ``after_commit``.

        Raises:
            CheckpointError: the checkpointer is closed.
            TypeError: an unpicklable value (named by key path). OSError: the disk refused; nothing is left behind.
        """
        if self._closed:
            raise CheckpointError("SyncCheckpointer is closed")
        start = time.perf_counter()
        path, after_commit = remote_dirs.remote_destination(path, kwargs.get("after_commit"),
                                                            remote_dirs.SYNC_REMOTE_TIMEOUT_SECS)
        if after_commit is not None:
            kwargs = {**kwargs, "after_commit": after_commit}
        stats = _written(self.writer, self.writer.write(path, state_dict, **kwargs))
        elapsed = time.perf_counter() - start
        self.last_save_stats = SaveStats(getattr(stats, "path", None) or os.fspath(path), getattr(stats, "nbytes", 0), elapsed, elapsed,
                                         getattr(stats, "write_secs", elapsed), elapsed)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.writer.close()


@dataclass
class _InFlight:
    path: str
    stage_future: Future
    write_future: TrackedFuture


@dataclass
class _Save:
    """One save on its way from staging to the writer."""

    path: str
    kwargs: dict[str, Any]
    barrier_key: str  # names the writer's barrier points: the same on every rank (unlike the error-store key)
    start: float
    stall: float
    stage_future: Future
    write_future: TrackedFuture


class AsyncCheckpointer(PicklableBeforeUse, Checkpointer):
    """Stages into reusable shared memory, then a persistent writer subprocess writes and commits.

    ``save`` returns ``(stage_future, write_future)``, as PyTorch's does: wait on ``stage_future`` before mutating
    the saved tensors in place; ``write_future`` resolves (to None) once the checkpoint is committed; what the
    save cost is then in ``last_save_stats`` (and ``write_future.stats``). Neither future can be cancelled (the
    save is under way; its buffer is released when it ends). By default one save is in flight: a new save first
    waits for the previous one (``max_in_flight``). Better than the PyTorch original: a failed write is raised
    once (by the next ``save``/``wait``/``close`` unless its future was already looked at); a dead writer is
    replaced; every wait has a timeout; over the staging budget a save falls back to a synchronous write
    (``fallback_writer``) instead of allocating more; in a forked child it waits for none of the parent's saves.
    One still open when the interpreter exits is drained and closed then (a save that cannot finish is logged as
    lost, with its path); one dropped without ``close()`` gives back its writer process, threads and staging
    memory once collected (a save in flight is finished first).

    Args:
        checkpoint_stager: a ``DefaultStager`` (the fast path: the writer reads its shared memory directly; it
            bounds the buffers itself), or any stager whose ``stage()`` returns the staged dict or a future of it
            (written through ``checkpoint_process.write``; pending saves are bounded by ``max_in_flight``).
        checkpoint_process: the writer subprocess.
        reader: reads checkpoints back.
        max_in_flight: saves that may be pending at once (each holds its own staging buffer).
        wait_timeout_secs: how long ``save`` waits for a free slot and ``wait``/``close`` for pending saves.
        error_store: where failed saves are kept until raised (share one with the layer above, so that each
            failure is logged and raised once); a private one when None.
        fallback_writer: builds the writer of saves that do not fit in staging memory; None: such a save fails.
        resources: objects kept alive while the checkpointer lives and closed (if they can be) by ``close``,
            e.g. the TCPStore the builder hosts for the ranks' barrier.
    """

    def __init__(self, checkpoint_stager: CheckpointStager, checkpoint_process: CheckpointProcess,
                 reader: CheckpointReader, *, max_in_flight: int = 1, wait_timeout_secs: float = 3600.0,
                 error_store: ErrorStore | None = None, fallback_writer: Callable[[], CheckpointWriter] | None = None,
                 resources: tuple = ()) -> None:
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"AsyncCheckpointer.max_in_flight must be an int >= 1, got {max_in_flight!r}")
        self.stager = checkpoint_stager
        self._pooled = isinstance(checkpoint_stager, DefaultStager)
        self.process = checkpoint_process
        self.reader = reader
        self.max_in_flight = max_in_flight
        self.wait_timeout_secs = wait_timeout_secs
        self.errors = error_store if error_store is not None else ErrorStore()
        self._make_fallback = fallback_writer
        self._fallback: CheckpointWriter | None = None
        self._resources = tuple(resources)
        self._inflight: deque[_InFlight] = deque()
        self._lock = threading.Lock()
        self._seq = 0
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self._closed = False
        _LIVE.add(self)

    _RECREATED = {"_lock": threading.Lock}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _LIVE.add(self)

    def _in_use(self) -> str | None:
        return "it has saved" if self._seq or self._starter is not None else None

    def save(self, path: str | os.PathLike, state_dict: STATE_DICT, **kwargs: Any) -> tuple[Future, Future]:
        """Start saving ``state_dict`` at ``path``.

        Args:
            path: final path.
            state_dict: what to save.
            **kwargs: with a ``DefaultStager``: ``metadata`` (json-able facts kept with the checksums),
                ``snapshot_token`` (a value such as the training step: a save with the same token as the previous
                one, of the same unchanged tensors, shares its staged copy) and ``after_commit`` (run by the writer
                once committed, e.g. an upload). Other stagers: passed to ``stage`` and ``checkpoint_process.write``.

        Returns:
            ``(stage_future, write_future)``, both resolving to None (``write_future.stats``: ``SaveStats``).

        Raises:
            CheckpointWriteError: an earlier save failed (raised once).
            CheckpointTimeoutError: the previous save did not finish within ``wait_timeout_secs``.
            TypeError: an unpicklable value in ``state_dict`` (named by key path), or an unknown keyword.
        """
        if self._closed:
            raise CheckpointError("AsyncCheckpointer is closed")
        unknown = sorted(set(kwargs) - set(_SAVE_KWARGS)) if self._pooled else []
        if unknown:
            raise TypeError(f"AsyncCheckpointer.save got unexpected keyword arguments {unknown} (it takes "
                            f"{list(_SAVE_KWARGS)})")
        if self._starter is not None and not self._starter.is_alive():
            self._join_starter()  # never waits here: a start still running is waited for by the write itself
        self.check_for_errors()
        if not self._pooled:
            self._wait_for_slot()
        self._seq += 1
        save_key = new_save_key()
        # A remote path: its local cache path, and the upload (or, for a directory, the generation and manifest).
        write_timeout = self.process.config.write_timeout_secs
        path, after_commit = remote_dirs.remote_destination(
            path, kwargs.get("after_commit"), upload_timeout_secs(write_timeout) if paths.is_remote(path) else 0.0)
        if after_commit is not None:
            kwargs = {**kwargs, "after_commit": after_commit}
        start = time.perf_counter()
        try:
            staged = self._stage(state_dict, kwargs)
        except StagingBufferTooLarge as e:
            return self._save_fallback(path, state_dict, kwargs, f"save-{self._seq}", start, e)
        stall = time.perf_counter() - start
        staging = staged if isinstance(staged, Future) else completed_future(staged)
        stage_future = uncancellable_future()
        write_future = TrackedFuture(save_key, lambda: self.errors.mark_seen(save_key))
        with self._lock:
            while self._inflight and self._inflight[0].write_future.done():
                self._inflight.popleft()  # finished saves are forgotten (their errors are kept in self.errors)
            self._inflight.append(_InFlight(path, stage_future, write_future))
        save = _Save(path, kwargs, f"save-{self._seq}", start, stall, stage_future, write_future)
        staging.add_done_callback(lambda f: self._dispatch(f, save))
        return stage_future, write_future

    def _stage(self, state_dict: STATE_DICT, kwargs: dict[str, Any]) -> Any:
        if self._pooled:
            return self.stager.stage(state_dict, release_by_caller=True, metadata=kwargs.get("metadata"),
                                     snapshot_token=kwargs.get("snapshot_token"))
        return self.stager.stage(state_dict, **kwargs)

    def _dispatch(self, staging: Future, save: _Save) -> None:
        """Runs when staging is done: hand the staged state to the writer process."""
        exc = staging.exception()
        if exc is not None:
            save.stage_future.set_exception(exc)
            self._fail(save.write_future, exc)
            return
        staged = staging.result()
        save.stage_future.set_result(None)
        record = staged.staging if isinstance(staged, StagedStateDict) else None
        try:
            if record is not None:
                # Pickled (when staging deferred it) by the link's send thread, not by whoever finished staging:
                # that may be the training thread itself when the copy was done before save() returned.
                inner = self.process.write_prepared(save.path, SendTime(lambda: record.prepared), record.buffer,
                                                    save.barrier_key, save.kwargs.get("after_commit"))
            else:
                inner = self.process.write(staged, save.path, **save.kwargs)
        except BaseException as e:  # noqa: BLE001 - delivered through the future and raised once later
            if record is not None:
                record.release()
            self._fail(save.write_future, e)
            return
        del staged
        inner.add_done_callback(lambda f: self._finish(f, record, save))

    def _finish(self, inner: Future, record: StagedCheckpoint | None, save: _Save) -> None:
        if record is not None:
            record.release()
        if inner.exception() is not None:
            self._fail(save.write_future, inner.exception())
            return
        written = inner.result()
        stats = SaveStats(getattr(written, "path", None) or save.path, getattr(written, "nbytes", record.nbytes if record else 0), save.stall,
                          record.stage_secs if record else save.stall, getattr(written, "write_secs", 0.0),
                          time.perf_counter() - save.start)
        log.debug("saved %s: %d bytes, stall %.3fs, durable %.3fs", save.path, stats.nbytes, save.stall,
                  stats.durable_secs)
        self.last_save_stats = save.write_future.stats = stats
        save.write_future.set_result(None)

    def _fail(self, write_future: TrackedFuture, exc: BaseException) -> None:
        self.errors.record(exc, write_future.save_key)
        write_future.set_exception(exc)

    def _save_fallback(self, path: str, state_dict: STATE_DICT, kwargs: dict[str, Any], barrier_key: str,
                       start: float, reason: Exception) -> tuple[Future, Future]:
        """The state does not fit in staging memory: wait for pending saves, then write from the live tensors."""
        if self._make_fallback is None:
            raise CheckpointError(f"{reason}; and this AsyncCheckpointer has no fallback_writer for a synchronous "
                                  "write (make_async_checkpointer gives it one)") from reason
        log.warning("%s; writing %s synchronously from the live tensors (slower path)", reason, path)
        self.wait()
        if self._fallback is None:
            self._fallback = self._make_fallback()
        written = _written(self._fallback, self._fallback.write(
            path, state_dict, metadata=kwargs.get("metadata"), save_key=barrier_key,
            after_commit=kwargs.get("after_commit")))
        elapsed = time.perf_counter() - start
        stats = SaveStats(written.path or path, written.nbytes, elapsed, elapsed, written.write_secs, elapsed, fallback=True)
        write_future = TrackedFuture(new_save_key())
        self.last_save_stats = write_future.stats = stats
        write_future.set_result(None)
        return completed_future(None), write_future

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

    def prepare_staging(self, nbytes: int) -> Future | None:
        """Allocate and pre-fault a staging buffer of ``nbytes`` in the background, so that the first save is no
        slower than the later ones (``DefaultStager.prepare``); None with another stager.

        Returns:
            A future of whether a buffer was prepared, or None.
        """
        if self._closed:
            raise CheckpointError("AsyncCheckpointer is closed")
        return self.stager.prepare(nbytes) if self._pooled else None

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
        location = paths.resolve(path)
        path = location.cache_path() if isinstance(location, paths.RemotePath) else location
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
            try:
                self.process.close()
            finally:  # memory is released whatever the writer did
                self.stager.close()
                if self._fallback is not None:
                    self._fallback.close()
                self._resources = ()
                _LIVE.discard(self)
        if error is not None:
            raise error

    def _close_at_exit(self) -> None:
        """At interpreter exit: drain (within ``wait_timeout_secs`` and the writer's timeouts) and close; nobody is
        left to raise to, so a failure is logged, and each save that did not commit is logged as lost."""
        with self._lock:
            pending = [e for e in self._inflight if not e.write_future.done()]
        if pending:
            log.info("exiting with %d checkpoint save(s) in flight; waiting for them (wait_timeout_secs=%s): %s",
                     len(pending), self.wait_timeout_secs, [e.path for e in pending])
        try:
            self.close()
        except BaseException as e:  # noqa: BLE001 - the interpreter is exiting
            log.error("closing the AsyncCheckpointer at exit: %s", e)
        for entry in pending:
            error = peek_exception(entry.write_future) if entry.write_future.done() else "it did not finish"
            if error is not None:
                log.error("checkpoint save of %s was lost at exit: %s", entry.path, error)

    def _forget_after_fork(self) -> None:
        """In a forked child: the parent's saves are not ours to wait for (their futures never resolve here)."""
        self._lock = threading.Lock()
        self._inflight = deque()
        self._starter = None
        self._start_error = None
        self._fallback = None
        self.errors.forget_after_fork()


def _written(writer: Any, returned: Any) -> Any:
    """The ``WriteStats`` of the write just made: returned, or (PyTorch's ``write`` returns None) kept by it."""
    return returned if returned is not None else getattr(writer, "last_write_stats", None)


def _wait_done(future: Future, timeout_secs: float) -> bool:
    from concurrent.futures import wait

    done, _ = wait([future], timeout=timeout_secs)
    return bool(done)


def _close_all_at_exit() -> None:
    """Drain and close every open ``AsyncCheckpointer``, so a script that ends without ``wait()``/``close()`` does
    not lose the saves it started (the writer's threads are daemons and would die with the interpreter)."""
    for checkpointer in list(_LIVE):
        checkpointer._close_at_exit()


_LIVE: "weakref.WeakSet[AsyncCheckpointer]" = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [ck._forget_after_fork() for ck in list(_LIVE)])
# The one exit drain of the project (the Lightning plugin relies on it too); a checkpointer already closed is skipped.
atexit.register(_close_all_at_exit)
