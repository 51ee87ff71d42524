"""Staging: copy a state dict's tensors into reusable CPU buffers (shared memory; pinned with an accelerator)."""

from __future__ import annotations

import copy
import logging
import mmap
import os
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lightning_ckpt.errors import CheckpointTimeoutError
from lightning_ckpt.serialization import STORAGE_ALIGNMENT, PreparedCheckpoint, prepare

log = logging.getLogger(__name__)


def accelerator_available() -> bool:
    return torch.cuda.is_available()


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
        if self.buffer_wait_timeout_secs <= 0:
            raise ValueError(
                f"CheckpointStagerConfig.buffer_wait_timeout_secs must be > 0, got {self.buffer_wait_timeout_secs}"
            )

    @property
    def pinned(self) -> bool:
        return accelerator_available() if self.use_pinned_memory is None else self.use_pinned_memory

    @property
    def non_blocking(self) -> bool:
        return accelerator_available() if self.use_non_blocking_copy is None else self.use_non_blocking_copy


class StagingBufferTooLarge(Exception):
    """A state needs more staging memory than the whole budget allows."""


class StagingBuffer:
    """One contiguous region, anonymous shared memory (memfd) or private, that staged tensors are carved from.

    A memfd vanishes with the last descriptor or mapping, so a crash never leaves a ``/dev/shm`` entry behind.
    """

    _ids = iter(range(1, 1 << 62))

    def __init__(self, nbytes: int, *, shared: bool, pinned: bool) -> None:
        self.id = next(StagingBuffer._ids)
        self.nbytes = nbytes
        self.fd: int | None = None
        if shared:
            self.fd = os.memfd_create(f"lightning_ckpt-staging-{self.id}", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, nbytes)
            self._mmap = mmap.mmap(self.fd, nbytes)
        else:
            self._mmap = mmap.mmap(-1, nbytes)
        self.base = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self.address = self.base.data_ptr()
        self.pinned = False
        if pinned and accelerator_available():
            err = torch.cuda.cudart().cudaHostRegister(self.address, nbytes, 0)
            self.pinned = int(err) == 0
            if not self.pinned:
                log.warning("cudaHostRegister failed (%s); staging buffer %d stays pageable", err, self.id)
        self.users = 0

    @property
    def range(self) -> tuple[int, int]:
        return self.address, self.address + self.nbytes

    def tensor(self, offset: int, nbytes: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        """A tensor whose own storage is exactly ``[offset, offset+nbytes)`` of this buffer."""
        flat = torch.frombuffer(self._mmap, dtype=torch.uint8, count=nbytes, offset=offset)
        return flat.view(dtype).view(shape)

    def close(self) -> None:
        if self.base is None:
            return
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.address)
        self.base = None
        try:
            self._mmap.close()
        except BufferError:
            # A staged tensor still references the mapping; it is unmapped when that tensor dies.
            log.debug("staging buffer %d still referenced at close; leaving the mapping to the GC", self.id)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


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


def _align(n: int) -> int:
    return (n + STORAGE_ALIGNMENT - 1) // STORAGE_ALIGNMENT * STORAGE_ALIGNMENT


def _stageable(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and t.device.type != "meta" and not t.is_quantized and t.numel() > 0


class _Plan:
    """Where each tensor of one state dict goes in a staging buffer, and the staged structure."""

    def __init__(self, state_dict: Any) -> None:
        self.copies: list[tuple[torch.Tensor, int, int]] = []  # (source, offset, nbytes)
        self._by_identity: dict[tuple, int] = {}
        self.nbytes = 0
        self._collect(state_dict)

    def _collect(self, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if _stageable(obj):
                ident = (obj.data_ptr(), obj.dtype, tuple(obj.shape), obj.stride(), obj.device)
                if ident not in self._by_identity:
                    nbytes = obj.numel() * obj.element_size()
                    self._by_identity[ident] = len(self.copies)
                    self.copies.append((obj, self.nbytes, nbytes))
                    self.nbytes += _align(nbytes)
        elif isinstance(obj, dict):
            for v in obj.values():
                self._collect(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                self._collect(v)

    def build(self, obj: Any, staged: list[torch.Tensor]) -> Any:
        """The state dict's structure with each stageable tensor replaced by its staged tensor."""
        if isinstance(obj, torch.Tensor):
            if _stageable(obj):
                ident = (obj.data_ptr(), obj.dtype, tuple(obj.shape), obj.stride(), obj.device)
                return staged[self._by_identity[ident]]
            return obj.detach().clone() if obj.device.type != "meta" else obj
        if isinstance(obj, dict):
            # copy.copy keeps the dict's type and attributes (e.g. an OrderedDict state_dict's _metadata).
            out = copy.copy(obj) if type(obj) is not dict else {}
            for k, v in obj.items():
                out[k] = self.build(v, staged)
            return out
        if isinstance(obj, list):
            return [self.build(v, staged) for v in obj]
        if isinstance(obj, tuple):
            items = [self.build(v, staged) for v in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        return obj


class DefaultStager(CheckpointStager):
    """Stages into a pool of reusable buffers; a second save of same-sized state allocates nothing.

    Better than the PyTorch original: works on CPU-only machines by default (pinned memory and non-blocking
    copies only with CUDA), bounds memory by ``budget_bytes``, and pickles the structure at ``stage`` time so
    non-tensor values are captured at the moment of the save too.
    """

    def __init__(self, config: CheckpointStagerConfig | None = None) -> None:
        self.config = config or CheckpointStagerConfig()
        self._free: list[StagingBuffer] = []
        self._all: list[StagingBuffer] = []
        self._cond = threading.Condition()
        self._executor: ThreadPoolExecutor | None = None
        self._stream = None
        self.on_buffer_closed: Callable[[int], None] | None = None  # told the id of each buffer freed early
        self.allocations = 0  # buffers ever allocated: tests and metrics watch this
        self.allocated_bytes = 0

    def __getstate__(self) -> dict:
        if self._all or self._executor is not None:
            raise TypeError("a DefaultStager in use cannot be pickled; pickle it before the first save")
        state = self.__dict__.copy()
        state["_cond"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cond = threading.Condition()

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
        plan = _Plan(state_dict)
        buffer = self._acquire(max(plan.nbytes, 1))
        try:
            staged_tensors = [buffer.tensor(off, n, src.dtype, src.shape) for src, off, n in plan.copies]
            structure = plan.build(state_dict, staged_tensors)
            prepared = prepare(structure, buffer.range, metadata=kwargs.get("metadata")).for_transfer()
            del structure, staged_tensors
        except BaseException:
            self._release_buffer(buffer)
            raise
        staged = StagedCheckpoint(prepared, buffer, plan.nbytes)
        if not self.config.use_async_staging:
            self._copy(plan, buffer)
            staged.stage_secs = time.perf_counter() - start
            return staged
        ready = self._start_side_stream()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_ckpt-stager")
        return self._executor.submit(self._copy_async, plan, buffer, staged, start, ready)

    def _copy_async(self, plan: _Plan, buffer: StagingBuffer, staged: StagedCheckpoint, start: float,
                    ready: Any) -> StagedCheckpoint:
        try:
            self._copy(plan, buffer, ready)
        except BaseException:
            self._release_buffer(buffer)
            raise
        staged.stage_secs = time.perf_counter() - start
        return staged

    def _start_side_stream(self) -> Any:
        """With CUDA, a side stream that waits for work already queued on the caller's stream."""
        if not (accelerator_available() and self.config.non_blocking):
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        return self._stream

    def _copy(self, plan: _Plan, buffer: StagingBuffer, stream: Any = None) -> None:
        non_blocking = stream is not None and buffer.pinned
        ctx = torch.cuda.stream(stream) if stream is not None else _nullcontext()
        with torch.no_grad(), ctx:
            for src, offset, nbytes in plan.copies:
                dst = buffer.tensor(offset, nbytes, src.dtype, src.shape)
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
                    return buffer
                # Free buffers too small for this state are dropped before a bigger one is made.
                for small in list(self._free):
                    self._free.remove(small)
                    self._all.remove(small)
                    small.close()
                    if self.on_buffer_closed is not None:
                        self.on_buffer_closed(small.id)
                if budget is None or self.buffer_bytes + nbytes <= budget:
                    return self._allocate(nbytes)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CheckpointTimeoutError(
                        f"waited {self.config.buffer_wait_timeout_secs}s for a staging buffer of {nbytes} bytes "
                        f"(budget_bytes={budget}, in use {self.buffer_bytes})"
                    )
                self._cond.wait(remaining)

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
            self._all.clear()
            self._free.clear()
            self._cond.notify_all()


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
