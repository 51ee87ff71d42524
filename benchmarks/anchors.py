"""Anchor rows: what users have today, measured the way they are used.

* ``anchor.torch_io``: Lightning ``TorchCheckpointIO`` (``torch.save`` into memory on the caller thread, then an fsspec
  transaction). Blocking; it does **not** fsync, so its *done* is earlier than its *durable*.
* ``anchor.lightning_async``: Lightning ``AsyncCheckpointIO(TorchCheckpointIO())``. ``save_checkpoint`` returns after
  cloning every tensor on the caller thread; *done* is after ``teardown()`` (its only drain: the executor shuts down).
* ``anchor.dcp_async_process``: ``torch.distributed.checkpoint.async_save(..., async_checkpointer_type=PROCESS)`` with
  its defaults (FileSystemWriter, which fsyncs; a fresh default stager per save) in a single-rank gloo process group
  built on a FileStore. The previous save's future is awaited before the next one (as DCP requires); load is
  ``dcp.load`` into freshly allocated tensors (allocation inside the timed region).
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.common import empty_like_state
from benchmarks.micro import Adapter


class TorchIOAdapter(Adapter):
    """Lightning ``TorchCheckpointIO``."""

    name = "anchor.torch_io"
    kind = "anchor"
    label = "Lightning TorchCheckpointIO"
    fsyncs_itself = False

    def open(self) -> None:
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        self.io = TorchCheckpointIO()

    def start(self, path: str, state: dict[str, Any]) -> Any:
        self.io.save_checkpoint(state, path)

    def load(self, path: str, state: dict[str, Any]) -> Any:
        return self.io.load_checkpoint(path)


class LightningAsyncAdapter(Adapter):
    """Lightning ``AsyncCheckpointIO`` wrapping ``TorchCheckpointIO``."""

    name = "anchor.lightning_async"
    kind = "anchor"
    label = "Lightning AsyncCheckpointIO"
    fsyncs_itself = False
    drains_all = True

    def open(self) -> None:
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
        from lightning.pytorch.plugins.io import AsyncCheckpointIO

        self.io = AsyncCheckpointIO(TorchCheckpointIO())

    def start(self, path: str, state: dict[str, Any]) -> Any:
        self.io.save_checkpoint(state, path)

    def finish(self, handle: Any) -> None:
        self.io.teardown()

    def load(self, path: str, state: dict[str, Any]) -> Any:
        return self.io.load_checkpoint(path)

    def close(self) -> None:
        self.io.teardown()


class DCPAsyncProcessAdapter(Adapter):
    """``torch.distributed.checkpoint.async_save`` with ``AsyncCheckpointerType.PROCESS``."""

    name = "anchor.dcp_async_process"
    kind = "anchor"
    label = "DCP async_save (PROCESS)"
    fsyncs_itself = True
    suffix = ".dcp"

    @classmethod
    def skip_reason(cls, device: str) -> str | None:
        import torch.distributed as dist

        if not dist.is_available():
            return "torch.distributed is not available"
        try:
            from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType  # noqa: F401
        except ImportError:
            return "this torch has no AsyncCheckpointerType"
        return None

    def open(self) -> None:
        import torch.distributed as dist

        self._own_pg = not dist.is_initialized()
        if self._own_pg:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            store = dist.FileStore(os.path.join(self.scratch, "dcp-filestore"), 1)
            backend = "cpu:gloo,cuda:nccl" if self.device.startswith("cuda") else "gloo"
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
        self._pending = None

    def _wait_pending(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def start(self, path: str, state: dict[str, Any]) -> Any:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        self._wait_pending()
        resp = dcp.async_save(state, checkpoint_id=path, async_checkpointer_type=AsyncCheckpointerType.PROCESS)
        upload = getattr(resp, "upload_completion", resp)
        staging = getattr(resp, "staging_completion", None)
        if staging is not None:
            staging.result()
        self._pending = upload
        return upload

    def finish(self, handle: Any) -> None:
        handle.result()
        if self._pending is handle:
            self._pending = None

    def load(self, path: str, state: dict[str, Any]) -> Any:
        import torch.distributed.checkpoint as dcp

        target = empty_like_state(state)
        dcp.load(target, checkpoint_id=path)
        return target

    def close(self) -> None:
        import torch.distributed as dist
        from torch.distributed.checkpoint import _async_process_executor as ape

        try:
            self._wait_pending()
        finally:
            ape._CHECKPOINT_PROCESS = None  # its __del__ terminates the daemon writer process
            if getattr(self, "_own_pg", False) and dist.is_initialized():
                dist.destroy_process_group()


ADAPTERS = {a.name: a for a in (TorchIOAdapter, LightningAsyncAdapter, DCPAsyncProcessAdapter)}
