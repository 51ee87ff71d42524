"""Staging memory: buffers carved into per-tensor storages, and the plan of where each tensor goes."""

from __future__ import annotations

import copy
import logging
import mmap
import os
from typing import Any

import torch

from lightning_ckpt.torch_zip import ALIGNMENT as STORAGE_ALIGNMENT
from lightning_ckpt.torch_zip import DIRECT_IO_ALIGNMENT, DIRECT_IO_MIN_BYTES

log = logging.getLogger(__name__)


def accelerator_available() -> bool:
    return torch.cuda.is_available()


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


def _align(n: int, alignment: int = STORAGE_ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def _stageable(t: torch.Tensor) -> bool:
    """Whether ``t`` is copied into the staging buffer. 0-dim tensors (scores, step counters) are cloned at stage
    time instead: they change between the saves of one step (ModelCheckpoint's best score), and keeping them out
    of the buffer and of the snapshot signature lets such saves share the staged copy of everything else."""
    return (t.layout == torch.strided and t.device.type != "meta" and not t.is_quantized and t.dim() > 0
            and t.numel() > 0)


class StagingPlan:
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
                    if nbytes >= DIRECT_IO_MIN_BYTES:  # page-aligned, so the writer can write it with O_DIRECT
                        self.nbytes = _align(self.nbytes, DIRECT_IO_ALIGNMENT)
                    self._by_identity[ident] = len(self.copies)
                    self.copies.append((obj, self.nbytes, nbytes))
                    self.nbytes += _align(nbytes)
        elif isinstance(obj, dict):
            for v in obj.values():
                self._collect(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                self._collect(v)

    def signature(self) -> tuple | None:
        """Identity and version counter of every source tensor; None when a tensor has no version counter."""
        try:
            return tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.stride(), t.device)
                         for t, _, _ in self.copies)
        except RuntimeError:  # inference-mode tensors track no version
            return None

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
