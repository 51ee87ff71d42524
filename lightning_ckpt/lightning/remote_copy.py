"""``SaveLastCopies``: ModelCheckpoint's remote ``save_last`` save becomes a server-side copy, not a second upload."""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from lightning_ckpt import paths, remote_files
from lightning_ckpt.errors import CheckpointWriteError
from lightning_ckpt.futures import peek_exception
from lightning_ckpt.paths import RemotePath

if TYPE_CHECKING:
    from lightning_ckpt.lightning.base_io import LightningCkptIO


class SaveLastCopies:
    """The plugin's remote copies: ``save_last=True`` of the upload just made, and ``save_last="link"``.

    It remembers the last remote upload (where, its step, a fingerprint of what it held, its outcome); the plugin's
    save path asks ``copy_instead`` first, and reports each upload through ``before_upload`` / ``after_upload``.

    Args:
        plugin: the owning plugin (its ledger, ``remote_config``, timeouts and error policy are used).
    """

    def __init__(self, plugin: "LightningCkptIO") -> None:
        self.plugin = plugin
        self._last: _RemoteSave | None = None  # the last remote upload (for ModelCheckpoint's save_last)

    def copy_instead(self, trainer: Any, location: RemotePath, checkpoint: dict[str, Any], step: int | None,
                     commit_now: bool) -> bool:
        """ModelCheckpoint's ``save_last=True`` save of the checkpoint it has just uploaded becomes a server-side
        copy of that upload: only that case (nothing runs between the two saves, so not even a ``.data`` write
        that no version counter sees can change the weights), and only if the whole checkpoint is the same (its
        tensors the same objects at the same version, everything else equal; the callback's own
        ``last_model_path`` aside, as with ``save_last="link"``). Outside the training loop the copy is made
        before returning.

        Returns:
            True when the save is (or will be) a copy; False (upload it) otherwise, or when the upload to copy
            failed.
        """
        plugin, last = self.plugin, self._last
        if (last is None or step != last.step or last.location == location
                or (last.location.bucket, last.location.storage_options) != (location.bucket,
                                                                             location.storage_options)
                or last.failed() or not _is_save_last_of(trainer, location, last.location)
                or _checkpoint_fingerprint(checkpoint) != last.fingerprint):
            return False
        if not commit_now:
            self.request_copy(last.location, location)  # once the upload commits; skipped if it fails
            return True
        plugin.ledger.wait(plugin.config.wait_timeout_secs)  # like _write_now: after the saves already pending
        if last.failed():
            return False
        try:
            remote_files.copy(last.location, location, plugin.remote_config, plugin._remote_timeout())
        except Exception as e:
            plugin._fail(_copy_error(last.location, location, e))
        return True

    def before_upload(self, trainer: Any, checkpoint: dict[str, Any]) -> tuple | None:
        """Forget the last upload (a new one starts); returns the fingerprint of ``checkpoint`` when the next save
        may be a ModelCheckpoint's last checkpoint (a copy of this one), else None."""
        self._last = None
        if _save_last_callbacks(trainer):
            return _checkpoint_fingerprint(checkpoint)
        return None

    def after_upload(self, location: RemotePath, step: int | None, fingerprint: tuple | None,
                     write_future: Future) -> None:
        """Remember the upload just started (with ``before_upload``'s fingerprint) for a ``save_last`` copy."""
        if fingerprint is not None and step is not None:
            self._last = _RemoteSave(location, step, fingerprint, write_future)

    def request_copy(self, source: paths.Location, dest: paths.Location) -> None:
        """Copy ``source`` to ``dest`` server-side once ``source`` is committed (skipped if its save fails); a
        failed copy is raised at the next step like a failed save.

        Raises:
            ValueError: ``source`` and ``dest`` are not both remote.
        """
        if not (isinstance(source, RemotePath) and isinstance(dest, RemotePath)):
            raise ValueError(f"cannot link {dest} to {source}: both must be in one remote store, or both local")
        plugin = self.plugin

        def copy(*_: Any) -> None:
            try:
                remote_files.copy(source, dest, plugin.remote_config, plugin._remote_timeout())
            except Exception as e:  # noqa: BLE001 - raised at the next step like a failed save
                plugin.ledger.record_error(_copy_error(source, dest, e))

        plugin.ledger.request_link(source, dest, make_link=copy)


@dataclasses.dataclass(frozen=True)
class _RemoteSave:
    """The last remote upload a ``save_last`` save may copy: where, its step, what it held, and its outcome."""

    location: RemotePath
    step: int
    fingerprint: tuple
    write_future: Future

    def failed(self) -> bool:
        return self.write_future.done() and peek_exception(self.write_future) is not None


def _copy_error(source: RemotePath, dest: RemotePath, e: Exception) -> CheckpointWriteError:
    error = CheckpointWriteError(f"server-side copy of {source} to {dest} failed: {e}")
    error.__cause__ = e
    return error


def _save_last_callbacks(trainer: Any) -> list:
    """``trainer``'s ModelCheckpoints that save a last checkpoint (none without a trainer)."""
    if trainer is None:
        return []
    return [c for c in getattr(trainer, "checkpoint_callbacks", []) if getattr(c, "save_last", None)]


def _is_save_last_of(trainer: Any, dest: RemotePath, source: RemotePath) -> bool:
    """``dest`` is the last checkpoint a ModelCheckpoint is saving right after its save of ``source`` (Lightning
    sets ``last_model_path`` before that save, ``_last_checkpoint_saved`` after the one before)."""
    for callback in _save_last_callbacks(trainer):
        try:
            if (paths.path_key(callback.last_model_path) == dest.url
                    and paths.path_key(getattr(callback, "_last_checkpoint_saved", None) or "") == source.url):
                return True
        except (TypeError, ValueError, ImportError):  # an unusual path: never a copy
            continue
    return False


class _Identity:
    """A value in a fingerprint that equals only the same object (held: its id is never reused meanwhile)."""

    __slots__ = ("value",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.value is self.value


def _checkpoint_fingerprint(checkpoint: Any) -> tuple:
    """What makes two checkpoints the same: the whole tree, tensors by storage, layout and version (the same
    objects, unchanged), plain values by value, anything else by identity (held, so its id is never reused).
    ModelCheckpoint states' ``last_model_path`` is left out: the one field a ``save_last`` save changes."""
    def walk(value: Any, in_callbacks: bool = False) -> Any:
        if isinstance(value, torch.Tensor):
            try:
                return ("tensor", value.device.type, value.dtype, tuple(value.shape), value.stride(),
                        value.data_ptr(), value._version, value.untyped_storage().nbytes())
            except Exception:  # noqa: BLE001 - no storage (meta, DTensor and other subclasses): never the same
                return _Identity(object())
        if value is None or isinstance(value, (bool, int, float, str, bytes)):
            return (type(value).__name__, value)
        if isinstance(value, dict):
            items = sorted(((repr(k), k) for k in value), key=lambda kv: kv[0])
            return (type(value).__name__, tuple(
                (r, walk(value[k], in_callbacks=in_callbacks or k == "callbacks" and value is checkpoint))
                for r, k in items if not (in_callbacks and k == "last_model_path")))
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, tuple(walk(v) for v in value))
        return _Identity(value)

    return walk(checkpoint)
