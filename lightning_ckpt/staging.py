"""Staging: copy a state dict's tensors into reusable CPU buffers (shared memory; pinned with an accelerator)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lightning_ckpt.checkpoint_file import PreparedCheckpoint
from lightning_ckpt.errors import CheckpointTimeoutError
from lightning_ckpt.picklable import PicklableBeforeUse
from lightning_ckpt.serialization import for_transfer, prepare
from lightning_ckpt.staging_buffer import (
    StagingBuffer,
    StagingBufferTooLarge,
    StagingPlan,
    accelerator_available,
)

log = logging.getLogger(__name__)


@dataclass
class CheckpointStagerConfig:
    """How state dicts are copied off the live tensors.

    Args:
        use_async_staging: copy in a background thread and return a future (the caller waits on it before the
            next in-place mutation); False copies before ``stage`` returns.
        use_pinned_memory: page-lock the staging buffers for fast device-to-host copies; None: when CUDA is there.
        use_shared_memory: stage into shared memory the writer subprocess maps (needed by the async checkpointer).
        use_non_blocking_copy: issue device-to-host copies on a side stream; None: when CUDA is there.
        budget_bytes: cap on all staging buffers together; None: no cap. A save whose state alone exceeds it is
            written synchronously from the live tensors instead (the documented slower path).
        buffer_wait_timeout_secs: how long a save waits for a staging buffer held by an earlier save.
    """

    use_async_staging: bool = True
    use_pinned_memory: bool | None = None
    use_shared_memory: bool = True
    use_non_blocking_copy: bool | None = None
    budget_bytes: int | None = None
    buffer_wait_timeout_secs: float = 3600.0

    def __post_init__(self) -> None:
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ValueError(f"CheckpointStagerConfig.budget_bytes must be > 0 or None, got {self.budget_bytes}")
        if not self.buffer_wait_timeout_secs > 0:  # NaN too
            raise ValueError(
                f"CheckpointStagerConfig.buffer_wait_timeout_secs must be > 0, got {self.buffer_wait_timeout_secs}"
            )

    @property
    def pinned(self) -> bool:
        return accelerator_available() if self.use_pinned_memory is None else self.use_pinned_memory

    @property
    def non_blocking(self) -> bool:
        return accelerator_available() if self.use_non_blocking_copy is None else self.use_non_blocking_copy


@dataclass
class StagedCheckpoint:
    """A staged state dict: its pickle bytes and records, and the buffer its tensor bytes live in."""

    prepared: PreparedCheckpoint
    buffer: StagingBuffer | None
    nbytes: int
    stage_secs: float = 0.0


class CheckpointStager(ABC):
    """Copies a state dict so that writing it no longer needs the live tensors."""

    @abstractmethod
    def stage(self, state_dict: dict[str, Any], **kwargs: Any) -> StagedCheckpoint | Future[StagedCheckpoint]:
        """Start copying; returns the staged checkpoint, or a future of it with async staging."""

    @abstractmethod
    def release(self, staged: StagedCheckpoint) -> None:
        """The writer is done with ``staged``; its buffer may be reused."""

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

    Better than the PyTorch original: works on CPU-only machines by default (pinned memory and non-blocking
    copies only with CUDA), bounds memory by ``budget_bytes`` and ``max_buffers`` (a save waits for a buffer
    rather than allocating past them), and pickles the structure at ``stage`` time so non-tensor values are
    captured at the moment of the save too.

    A save passing the same ``snapshot_token`` as the previous one (e.g. Lightning's ``last.ckpt`` written right
    after the top-k file of the same step), whose tensors are the same objects with unchanged version counters,
    shares the previous staged copy: no copy, no new buffer, no wait.

    Args:
        config: buffer kinds, async staging, budget.
        max_buffers: staging buffers that may exist at once (the async checkpointer's ``max_in_flight``).
    """

    def __init__(self, config: CheckpointStagerConfig | None = None, max_buffers: int = 1) -> None:
        if max_buffers < 1:
            raise ValueError(f"DefaultStager.max_buffers must be >= 1, got {max_buffers}")
        self.config = config or CheckpointStagerConfig()
        self.max_buffers = max_buffers
        self._snapshot: _Snapshot | None = None
        self._free: list[StagingBuffer] = []
        self._all: list[StagingBuffer] = []
        self._cond = threading.Condition()
        self._executor: ThreadPoolExecutor | None = None
        self._stream = None
        self.on_buffer_closed: Callable[[int], None] | None = None  # told the id of each buffer freed early
        self.allocations = 0  # buffers ever allocated: tests and metrics watch this
        self.shared_saves = 0  # saves that reused the previous staged copy
        self.allocated_bytes = 0

    _RECREATED = {"_cond": threading.Condition}

    def _in_use(self) -> str | None:
        return "it holds staging buffers" if self._all or self._executor is not None else None

    @property
    def buffer_bytes(self) -> int:
        """Bytes held in staging buffers now (in use or free)."""
        return sum(b.nbytes for b in self._all)

    def stage(self, state_dict: dict[str, Any], **kwargs: Any) -> StagedCheckpoint | Future[StagedCheckpoint]:
        """Plan, reserve a buffer, pickle the structure now, and copy the tensor bytes (now or in the background).

        Raises:
            StagingBufferTooLarge: the state needs more than ``budget_bytes``; the caller takes the slower path.
            CheckpointTimeoutError: no buffer became free within ``buffer_wait_timeout_secs``.
            TypeError: the state dict holds an object that cannot be pickled (named by key path).
        """
        start = time.perf_counter()
        plan = StagingPlan(state_dict)
        token = kwargs.get("snapshot_token")
        signature = plan.signature() if token is not None else None
        shared = self._share(token, signature)
        buffer = shared.buffer if shared is not None else self._acquire(max(plan.nbytes, 1))
        copy_future: Future | None = None
        try:
            staged_tensors = [buffer.tensor(off, n, src.dtype, src.shape) for src, off, n in plan.copies]
            structure = plan.build(state_dict, staged_tensors)
            if shared is None and self.config.use_async_staging:
                # The copy starts first and runs (the GIL released) while this thread pickles the structure.
                copy_future = self._submit_copy(plan, staged_tensors, buffer)
            prepared = for_transfer(prepare(structure, buffer.range, metadata=kwargs.get("metadata")))
            del structure
            if shared is None and copy_future is None:
                self._copy(plan, staged_tensors, buffer)
        except BaseException:
            if copy_future is not None:
                wait([copy_future])  # the buffer is written until the copy stops
            self._release_buffer(buffer)
            raise
        staged = StagedCheckpoint(prepared, buffer, plan.nbytes)
        if shared is not None:
            return self._after(shared.copy_future, staged, start)
        self._remember(token, signature, buffer, copy_future)
        return self._after(copy_future, staged, start)

    def _submit_copy(self, plan: StagingPlan, dsts: list, buffer: StagingBuffer) -> Future:
        ready = self._start_side_stream()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_ckpt-stager")
        return self._executor.submit(self._copy, plan, dsts, buffer, ready)

    def _share(self, token: Any, signature: tuple | None) -> _Snapshot | None:
        """The previous snapshot, with one more user, when this save is of the very same unchanged tensors."""
        snap = self._snapshot
        if snap is None or signature is None or snap.token != token or snap.signature != signature:
            return None
        if snap.copy_future is not None and snap.copy_future.done() and snap.copy_future.exception() is not None:
            return None
        with self._cond:
            if snap.buffer not in self._all:
                return None
            if snap.buffer in self._free:
                self._free.remove(snap.buffer)
            snap.buffer.users += 1
            self.shared_saves += 1
        return snap

    def _remember(self, token: Any, signature: tuple | None, buffer: StagingBuffer, future: Future | None) -> None:
        self._snapshot = _Snapshot(token, signature, buffer, future) if signature is not None else None

    def _after(self, copy_future: Future | None, staged: StagedCheckpoint, start: float) -> Any:
        """``staged`` once its copy is complete (at once when it already is); a failed copy frees its buffer use."""
        if copy_future is None:
            staged.stage_secs = time.perf_counter() - start
            return staged
        future: Future = Future()

        def done(f: Future) -> None:
            staged.stage_secs = time.perf_counter() - start
            if f.exception() is not None:
                self.release(staged)
                future.set_exception(f.exception())
            else:
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
            for (src, _, _), dst in zip(plan.copies, dsts):
                if src.is_cuda and stream is not None:
                    src.record_stream(stream)
                dst.copy_(src.detach(), non_blocking=non_blocking and src.is_cuda)
            if stream is not None:
                stream.synchronize()

    def _acquire(self, nbytes: int) -> StagingBuffer:
        budget = self.config.budget_bytes
        if budget is not None and nbytes > budget:
            raise StagingBufferTooLarge(f"state needs {nbytes} staging bytes, budget_bytes is {budget}")
        deadline = time.monotonic() + self.config.buffer_wait_timeout_secs
        with self._cond:
            while True:
                fits = [b for b in self._free if b.nbytes >= nbytes]
                if fits:
                    buffer = min(fits, key=lambda b: b.nbytes)
                    self._free.remove(buffer)
                    buffer.users += 1
                    if self._snapshot is not None and self._snapshot.buffer is buffer:
                        self._snapshot = None  # about to be overwritten
                    return buffer
                # Free buffers too small for this state are dropped before a bigger one is made.
                for small in list(self._free):
                    self._drop(small)
                within_budget = budget is None or self.buffer_bytes + nbytes <= budget
                if within_budget and len(self._all) < self.max_buffers:
                    return self._allocate(nbytes)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CheckpointTimeoutError(
                        f"waited {self.config.buffer_wait_timeout_secs}s for a staging buffer of {nbytes} bytes "
                        f"(budget_bytes={budget}, max_buffers={self.max_buffers}, in use {self.buffer_bytes})"
                    )
                self._cond.wait(remaining)

    def _drop(self, buffer: StagingBuffer) -> None:
        self._free.remove(buffer)
        self._all.remove(buffer)
        if self._snapshot is not None and self._snapshot.buffer is buffer:
            self._snapshot = None
        buffer.close()
        if self.on_buffer_closed is not None:
            self.on_buffer_closed(buffer.id)

    def _allocate(self, nbytes: int) -> StagingBuffer:
        buffer = StagingBuffer(nbytes, shared=self.config.use_shared_memory, pinned=self.config.pinned)
        buffer.users = 1
        self._all.append(buffer)
        self.allocations += 1
        self.allocated_bytes += nbytes
        log.debug("allocated staging buffer %d of %d bytes", buffer.id, nbytes)
        return buffer

    def release(self, staged: StagedCheckpoint) -> None:
        if staged.buffer is not None:
            self._release_buffer(staged.buffer)
            staged.buffer = None

    def _release_buffer(self, buffer: StagingBuffer) -> None:
        with self._cond:
            buffer.users -= 1
            if buffer.users == 0 and buffer in self._all:
                self._free.append(buffer)
            self._cond.notify_all()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._cond:
            for buffer in self._all:
                buffer.close()
            self._snapshot = None
            self._all.clear()
            self._free.clear()
            self._cond.notify_all()
