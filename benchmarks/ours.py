"""Rows for ``lightning_ckpt`` itself. They are skipped (with the import error as the reason) until the package exists.

* ``ours.sync``          ``make_sync_checkpointer(CheckpointerConfig())``: ``save`` blocks until committed.
* ``ours.async``         ``make_async_checkpointer(CheckpointerConfig())``: stall = ``save()`` call until the staging
                         future is done; done = the write future is done (fsynced and committed).
* ``ours.plugin_sync``   ``lightning_ckpt.lightning.SyncCheckpointIO()``.
* ``ours.plugin_async``  ``lightning_ckpt.lightning.AsyncCheckpointIO()``: stall = ``save_checkpoint`` returns;
                         done = ``wait_for_saves()`` returns (``teardown()`` if the plugin has no such method).
"""

from __future__ import annotations

from typing import Any

from benchmarks.micro import Adapter


def import_error(plugin: bool = False) -> str | None:
    """Why the ``lightning_ckpt`` core (or, with ``plugin``, its Lightning layer) cannot be used here, or None."""
    try:
        if plugin:
            from lightning_ckpt.lightning import AsyncCheckpointIO, SyncCheckpointIO  # noqa: F401
        else:
            import lightning_ckpt as lc

            for attr in ("make_async_checkpointer", "make_sync_checkpointer", "CheckpointerConfig"):
                getattr(lc, attr)
    except Exception as e:  # ImportError, AttributeError, or a bug at import time
        return f"lightning_ckpt not usable yet ({type(e).__name__}: {e})"
    return None


def _next_step(adapter: Any, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` at the adapter's next global step. The plugins share one staged copy between saves of the same step
    whose tensors are unchanged (``last.ckpt`` after the top-k file); the micro protocol saves an unchanged state
    over and over, so without a new step each timed save would measure that sharing, not a save."""
    adapter.step = getattr(adapter, "step", 0) + 1
    return {**state, "global_step": adapter.step}


def _first(out: Any) -> Any:
    """Loaders may return ``(state_dict, missing_keys)``; keep the state dict."""
    return out[0] if isinstance(out, tuple) else out


class _Ours(Adapter):
    kind = "ours"
    fsyncs_itself = True
    plugin = False

    @classmethod
    def skip_reason(cls, device: str) -> str | None:
        return import_error(cls.plugin)


class OursSync(_Ours):
    """The sync core checkpointer."""

    name = "ours.sync"
    label = "lightning_ckpt sync"

    def open(self) -> None:
        import lightning_ckpt as lc

        self.ck = lc.make_sync_checkpointer(lc.CheckpointerConfig())

    def start(self, path: str, state: dict[str, Any]) -> Any:
        self.ck.save(path, state)

    def load(self, path: str, state: dict[str, Any]) -> Any:
        return _first(self.ck.load(path))

    def close(self) -> None:
        self.ck.close()


class OursAsync(_Ours):
    """The async core checkpointer (writer subprocess, shared-memory staging)."""

    name = "ours.async"
    label = "lightning_ckpt async"

    def open(self) -> None:
        import lightning_ckpt as lc

        self.ck = lc.make_async_checkpointer(lc.CheckpointerConfig())

    def start(self, path: str, state: dict[str, Any]) -> Any:
        stage_f, write_f = self.ck.save(path, state)
        stage_f.result()
        return write_f

    def finish(self, handle: Any) -> None:
        handle.result()

    def load(self, path: str, state: dict[str, Any]) -> Any:
        return _first(self.ck.load(path))

    def close(self) -> None:
        try:
            self.ck.wait()
        finally:
            self.ck.close()


class OursPluginSync(_Ours):
    """``lightning_ckpt.lightning.SyncCheckpointIO``."""

    name = "ours.plugin_sync"
    label = "lightning_ckpt SyncCheckpointIO"
    plugin = True

    def open(self) -> None:
        from lightning_ckpt.lightning import SyncCheckpointIO

        self.io = SyncCheckpointIO()

    def start(self, path: str, state: dict[str, Any]) -> Any:
        self.io.save_checkpoint(_next_step(self, state), path)

    def load(self, path: str, state: dict[str, Any]) -> Any:
        return self.io.load_checkpoint(path)

    def close(self) -> None:
        self.io.teardown()


class OursPluginAsync(_Ours):
    """``lightning_ckpt.lightning.AsyncCheckpointIO`` (plugin alone, no callback)."""

    name = "ours.plugin_async"
    label = "lightning_ckpt AsyncCheckpointIO"
    plugin = True
    drains_all = True

    def open(self) -> None:
        from lightning_ckpt.lightning import AsyncCheckpointIO

        self.io = AsyncCheckpointIO()

    def start(self, path: str, state: dict[str, Any]) -> Any:
        self.io.save_checkpoint(_next_step(self, state), path)

    def finish(self, handle: Any) -> None:
        # Prefer the plugin's own drain: its teardown() also stops the writer process, which the next save would
        # restart (Lightning calls teardown once per fit; the e2e benchmark measures that as the final drain).
        wait = getattr(self.io, "wait_for_saves", None)
        wait() if callable(wait) else self.io.teardown()

    def load(self, path: str, state: dict[str, Any]) -> Any:
        return self.io.load_checkpoint(path)

    def close(self) -> None:
        self.io.teardown()


ADAPTERS = {a.name: a for a in (OursSync, OursAsync, OursPluginSync, OursPluginAsync)}
