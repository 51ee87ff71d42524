"""Staging: copy a state dict's tensors into reusable CPU buffers (shared memory; pinned with an accelerator)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
import weakref
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from lightning_ckpt.checkpoint_file import PreparedCheckpoint
from lightning_ckpt.config_fields import POSITIVE, TIMEOUT, Range, check_fields
from lightning_ckpt.futures import uncancellable_future
from lightning_ckpt.picklable import PicklableBeforeUse
from lightning_ckpt.serialization import StorageLayout, for_transfer, prepare
from lightning_ckpt.staging_buffer import BufferPool, StagingBuffer, accelerator_available
from lightning_ckpt.staging_plan import _PLAIN_TENSORS, StagingPlan, staged_tree
from lightning_ckpt.types import STATE_DICT

log = logging.getLogger(__name__)


class StagingConfigError(ValueError, AssertionError):
    """A staging option this machine cannot honour (an ``AssertionError`` too, as PyTorch's stager raises)."""


@dataclass
class CheckpointStagerConfig:
    """How state dicts are copied off the live tensors.

    Args:
        use_async_staging: copy in a background thread and return a future (the caller waits on it before the
            next in-place mutation); False copies before ``stage`` returns.
        use_pinned_memory: page-lock the staging buffers for fast device-to-host copies; None: when CUDA is there.
        use_shared_memory: stage into shared memory the writer subprocess maps (needed by the async checkpointer).
        use_non_blocking_copy: issue device-to-host copies on a side stream; None: when CUDA is there.
        budget_bytes: cap on all staging buffers together. Whatever it says, a new buffer must also fit in 90% of
            the memory left (``MemAvailable``, and the cgroup's ``memory.max`` minus its usage, v2 or v1); None
            leaves only that limit. A save that does not fit raises ``StagingBufferTooLarge`` (naming the size, the
            limit and ``budget_bytes``), and ``AsyncCheckpointer`` then writes it synchronously from the live
            tensors instead (the documented slower path).
        buffer_wait_timeout_secs: how long a save waits for a staging buffer held by an earlier save.
    """

    use_async_staging: bool = True
    use_pinned_memory: bool | None = None
    use_shared_memory: bool = True
    use_non_blocking_copy: bool | None = None
    budget_bytes: int | None = None
    buffer_wait_timeout_secs: float = 3600.0

    FIELD_RANGES: ClassVar[dict[str, Range]] = {"budget_bytes": POSITIVE, "buffer_wait_timeout_secs": TIMEOUT}

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def pinned(self) -> bool:
        return accelerator_available() if self.use_pinned_memory is None else self.use_pinned_memory

    @property
    def non_blocking(self) -> bool:
        return accelerator_available() if self.use_non_blocking_copy is None else self.use_non_blocking_copy


class StagedCheckpoint:
    """What a staging produced besides the staged dict: its pickle bytes and records, and the buffer its tensor
    bytes live in (one hold on that buffer, given back by ``release``).

    ``prepared`` may be given as a function that pickles the staged structure: it then runs on first access (in
    ``AsyncCheckpointer``, on the writer link's send thread after the staging future is done, so the training loop
    does not wait for it). ``stage`` defers it only when every leaf of the staged structure is a copy of its own or an
    immutable value, so the bytes are the same whenever it runs.
    """

    def __init__(self, prepared: PreparedCheckpoint | Callable[[], PreparedCheckpoint], buffer: StagingBuffer | None,
                 nbytes: int, release: Callable[[StagingBuffer], None]) -> None:
        self._prepared = prepared
        self.buffer = buffer
        self.nbytes = nbytes
        self.stage_secs = 0.0
        self._release = release
        self._lock = threading.Lock()
        self._prepare_lock = threading.Lock()

    @property
    def prepared(self) -> PreparedCheckpoint:
        """The pickle bytes and records (pickled now if that was deferred)."""
        with self._prepare_lock:
            if not isinstance(self._prepared, PreparedCheckpoint):
                self._prepared = self._prepared()
            return self._prepared

    def release(self) -> None:
        """Give the buffer back to the pool (idempotent); the staged tensors must not be read afterwards."""
        with self._lock:
            buffer, self.buffer = self.buffer, None
        if buffer is not None:
            self._release(buffer)


class StagedStateDict(dict):
    """The state dict ``DefaultStager.stage`` returns: the same keys, tensors copied into a staging buffer.

    ``staging`` holds the fast path's facts (prepared pickle, buffer). The buffer returns to the pool when this
    dict is no longer referenced, or, staged for an ``AsyncCheckpointer``, when its write completes. Tensors taken
    out of it stay valid only while the dict is referenced.
    """

    __slots__ = ("__weakref__", "staging")


class CheckpointStager(ABC):
    """Copies a state dict so that writing it no longer needs the live tensors (PyTorch's contract)."""

    @abstractmethod
    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> STATE_DICT | Future[STATE_DICT]:
        """Start copying; returns the staged state dict, or a future of it with async staging."""

    @abstractmethod
    def close(self) -> None:
        """Free every buffer and thread; idempotent."""


@dataclass
class _Snapshot:
    """The state a buffer last received: reused without copying when the same tensors are saved unchanged."""

    token: Any
    signature: tuple
    buffer: StagingBuffer
    copy_future: Future | None


class DefaultStager(PicklableBeforeUse, CheckpointStager):
    """Stages into a pool of reusable buffers; a second save of same-sized state allocates nothing.

    ``stage`` returns the staged state dict (a ``StagedStateDict``), or a future of it with async staging, as
    PyTorch's stager does. Its buffer returns to the pool when that dict is no longer referenced; staged with
    ``release_by_caller=True`` (what ``AsyncCheckpointer`` does), when the caller calls ``release``, and then a
    save waits for that buffer rather than allocating past ``max_buffers``. A caller keeping several staged dicts
    never waits: more buffers are allocated, within the budget.

    Better than the PyTorch original: works on CPU-only machines by default (pinned memory and non-blocking
    copies only with CUDA), bounds memory by ``budget_bytes`` and by the memory the machine and its cgroup have
    left, and pickles the structure at ``stage`` time so non-tensor values are captured at the moment of the save.
    In a forked child it holds nothing of the parent's (no shared staging memory, no thread): it starts afresh.

    A save passing the same ``snapshot_token`` as the previous one (e.g. Lightning's ``last.ckpt`` written right
    after the top-k file of the same step), whose tensors are the same objects with unchanged version counters,
    shares the previous staged copy: no copy, no new buffer, no wait.

    Args:
        config: buffer kinds, async staging, budget.
        max_buffers: buffers that saves released by their caller may hold at once (``max_in_flight``).

    Raises:
        AssertionError (a ``StagingConfigError``): ``use_non_blocking_copy=True`` without CUDA.
    """

    def __init__(self, config: CheckpointStagerConfig | None = None, max_buffers: int = 1,
                 on_buffer_closed: Callable[[int], None] | None = None) -> None:
        if max_buffers < 1:
            raise ValueError(f"DefaultStager.max_buffers must be >= 1, got {max_buffers}")
        self.config = config or CheckpointStagerConfig()
        if self.config.use_non_blocking_copy and not accelerator_available():
            raise StagingConfigError("CheckpointStagerConfig.use_non_blocking_copy=True needs CUDA, which is not "
                                     "available; use None (on when CUDA is there) or False")
        self.max_buffers = max_buffers
        self.on_buffer_closed = on_buffer_closed  # told the id of each buffer freed early (the writer unmaps it)
        self._pool = BufferPool(self.config, max_buffers, self._forget_snapshot, self._buffer_closed)
        self._snapshot: _Snapshot | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stream = None
        self.shared_saves = 0  # saves that reused the previous staged copy
        _LIVE.add(self)

    def _in_use(self) -> str | None:
        return "it holds staging buffers" if self._pool.buffers or self._executor is not None else None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _LIVE.add(self)

    @property
    def allocations(self) -> int:
        """Buffers ever allocated: tests and metrics watch this."""
        return self._pool.allocations

    @property
    def buffer_bytes(self) -> int:
        """Bytes held in staging buffers now (in use or free)."""
        return self._pool.buffer_bytes

    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> STATE_DICT | Future[STATE_DICT]:
        """Plan, reserve a buffer, pickle the structure now, and copy the tensor bytes (now or in the background).

        Args:
            state_dict: what to stage (a dict).
            **kwargs: ours: ``metadata`` (json-able, kept with the checksums), ``snapshot_token`` (see the class),
                ``release_by_caller`` (the buffer is held until ``release(staged)``, not until the dict dies).

        Returns:
            The staged ``StagedStateDict``, or (async staging) a future of it that cannot be cancelled.

        Raises:
            StagingBufferTooLarge: the state needs more than ``budget_bytes`` or the memory left; the caller takes
                the slower path. CheckpointTimeoutError: no buffer became free within ``buffer_wait_timeout_secs``.
            TypeError: ``state_dict`` is not a dict, or holds an object that cannot be pickled (named by key path).
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"DefaultStager.stage needs a dict state_dict, got {type(state_dict).__name__}")
        start = time.perf_counter()
        plan = StagingPlan(state_dict)
        token = kwargs.get("snapshot_token")
        signature = plan.signature() if token is not None else None
        by_caller = bool(kwargs.get("release_by_caller", False))
        shared = self._share(token, signature, by_caller)
        buffer = shared.buffer if shared is not None else self._pool.acquire(max(plan.nbytes, 1), by_caller)
        copy_future: Future | None = None
        try:
            staged_tensors, bases = plan.staged_tensors(buffer)
            if shared is None and self.config.use_async_staging:
                # The copy starts first and runs (the GIL released) while this thread pickles the structure.
                copy_future = self._submit_copy(plan, staged_tensors, buffer)
            tree, layout, all_owned = staged_tree(plan, staged_tensors, bases)
            structure = tree.rebuild()
            prepared: Any = functools.partial(_prepare, structure, buffer.range, dict(kwargs.get("metadata") or {}),
                                              layout, tree)
            if not all_owned:  # a leaf the caller may still change: pickled now, at the moment of the save
                prepared = prepared()
            if shared is None and copy_future is None:
                self._copy(plan, staged_tensors, buffer)
        except BaseException:
            if copy_future is not None:
                wait([copy_future])  # the buffer is written until the copy stops
            self._pool.release(buffer, by_caller)
            raise
        staged = StagedStateDict(structure)
        staged.staging = StagedCheckpoint(prepared, buffer, plan.nbytes,
                                          functools.partial(self._pool.release, by_caller=by_caller))
        if shared is None:
            self._remember(token, signature, buffer, copy_future)
        return self._after(shared.copy_future if shared is not None else copy_future, staged, start, by_caller)

    def prepare(self, nbytes: int) -> Future:
        """Allocate and pre-fault a staging buffer of ``nbytes`` in the background (the first save of a state that
        fits then copies at full speed); a save meanwhile waits for it. ``StagingPlan(state).nbytes`` says how large.

        Returns:
            A future of whether a buffer was prepared (False: one that large is there already, or it would not fit).
        """
        return self._stager().submit(self._pool.prepare, max(int(nbytes), 1))

    def release(self, staged: STATE_DICT) -> None:
        """Give back the buffer of a dict staged with ``release_by_caller=True`` (idempotent)."""
        if isinstance(staged, StagedStateDict):
            staged.staging.release()

    def _submit_copy(self, plan: StagingPlan, dsts: list, buffer: StagingBuffer) -> Future:
        ready = self._start_side_stream()
        return self._stager().submit(self._copy, plan, dsts, buffer, ready)

    def _stager(self) -> ThreadPoolExecutor:
        """The one stager thread (copies and buffer preparation run in order on it), started on first use."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_ckpt-stager")
        return self._executor

    def _share(self, token: Any, signature: tuple | None, by_caller: bool) -> _Snapshot | None:
        """The previous snapshot, with one more user, when this save is of the very same unchanged tensors."""
        snap = self._snapshot
        if snap is None or signature is None or snap.token != token or snap.signature != signature:
            return None
        if snap.copy_future is not None and snap.copy_future.done() and snap.copy_future.exception() is not None:
            return None
        if not self._pool.add_user(snap.buffer, by_caller):
            return None
        self.shared_saves += 1
        return snap

    def _remember(self, token: Any, signature: tuple | None, buffer: StagingBuffer, future: Future | None) -> None:
        self._snapshot = _Snapshot(token, signature, buffer, future) if signature is not None else None

    def _after(self, copy_future: Future | None, staged: StagedStateDict, start: float, by_caller: bool) -> Any:
        """``staged`` once its copy is complete (at once when it already is); a failed copy frees its buffer use."""
        record = staged.staging

        def complete() -> None:
            record.stage_secs = time.perf_counter() - start
            if not by_caller:
                weakref.finalize(staged, record.release)

        if copy_future is None:
            complete()
            return staged
        future = uncancellable_future()

        def done(f: Future) -> None:
            if f.exception() is not None:
                record.release()
                future.set_exception(f.exception())
            else:
                complete()
                future.set_result(staged)

        copy_future.add_done_callback(done)
        return future

    def _start_side_stream(self) -> Any:
        """With CUDA, a side stream that waits for work already queued on the caller's stream."""
        if not (accelerator_available() and self.config.non_blocking):
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        return self._stream

    def _copy(self, plan: StagingPlan, dsts: list, buffer: StagingBuffer, stream: Any = None) -> None:
        non_blocking = stream is not None and buffer.pinned
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            cpu_dsts, cpu_srcs = [], []
            for (src, _, _), dst in zip(plan.copies, dsts):
                if src.device.type == "cpu" and type(src) in _PLAIN_TENSORS:  # subclasses: copied one by one
                    cpu_dsts.append(dst)
                    cpu_srcs.append(src)
                    continue
                if src.is_cuda and stream is not None:
                    src.record_stream(stream)
                dst.copy_(src.detach(), non_blocking=non_blocking and src.is_cuda)
            if cpu_srcs:
                torch._foreach_copy_(cpu_dsts, cpu_srcs)  # one call (the GIL released) for every CPU tensor
            if stream is not None:
                stream.synchronize()

    def _forget_snapshot(self, buffer: StagingBuffer) -> None:
        if self._snapshot is not None and self._snapshot.buffer is buffer:
            self._snapshot = None

    def _buffer_closed(self, buffer: StagingBuffer) -> None:
        self._forget_snapshot(buffer)
        if self.on_buffer_closed is not None:
            self.on_buffer_closed(buffer.id)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._snapshot = None
        self._pool.close()
        _LIVE.discard(self)

    def _forget_after_fork(self) -> None:
        """In a forked child: unmap the parent's buffers here (never write into its shared memory), no thread."""
        self._executor = None
        self._stream = None
        self._snapshot = None
        self._pool.forget_after_fork()


def _prepare(structure: Any, buffer_range: tuple[int, int], metadata: dict, layout: StorageLayout,
             tree: Any) -> PreparedCheckpoint:
    return for_transfer(prepare(structure, buffer_range, metadata=metadata, layout=layout, tree=tree))


_LIVE: "weakref.WeakSet[DefaultStager]" = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [stager._forget_after_fork() for stager in list(_LIVE)])
