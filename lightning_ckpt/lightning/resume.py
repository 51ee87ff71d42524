"""Resuming: the newest complete checkpoint of a directory (``lightning_ckpt.latest``), and Lightning's
``ckpt_path="last"`` on a remote ModelCheckpoint dirpath."""

from __future__ import annotations

import sys
from typing import Any

from lightning_ckpt import paths
from lightning_ckpt.latest import CKPT_SUFFIX, find_latest_checkpoint, is_complete, matching_checkpoints, pattern_regex

__all__ = ["CKPT_SUFFIX", "find_latest_checkpoint", "is_complete", "matching_checkpoints", "pattern_regex",
           "remote_last_checkpoints"]

_INIT_FRAMES = 8  # the factory <- _load_external_callbacks <- _CallbackConnector.on_trainer_init <- Trainer.__init__


class RemoteLastCheckpoints:
    """``ModelCheckpoint._find_last_checkpoints`` of one instance with a remote dirpath, naming the files it finds
    with their protocol: Lightning lists the dirpath with fsspec, whose ``ls`` drops ``s3://``/``gs://``, and then
    resolves each name as a local path (none exists, so ``ckpt_path="last"`` silently started from scratch)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def __call__(self, trainer: Any) -> set[str]:
        found = type(self.owner)._find_last_checkpoints(self.owner, trainer)
        return {p if "://" in p else self.owner._fs.unstrip_protocol(p) for p in map(str, found)}


def remote_last_checkpoints() -> list:
    """Lightning's ``lightning.pytorch.callbacks_factory`` entry point (registered in ``pyproject.toml``): called in
    every ``Trainer.__init__``; for a Trainer whose CheckpointIO is ours, it makes each ModelCheckpoint with a remote
    dirpath find its ``last.ckpt`` (``RemoteLastCheckpoints``), so ``trainer.fit(model, ckpt_path="last")`` resumes
    from the store. It adds no callback and changes nothing for other Trainers, or for Lightning's classes."""
    trainer = _trainer_being_built()
    if trainer is not None:
        guard_last_checkpoints(trainer)
    return []


def guard_last_checkpoints(trainer: Any) -> None:
    """Install ``RemoteLastCheckpoints`` on ``trainer``'s ModelCheckpoints with a remote dirpath (idempotent), if
    the trainer's CheckpointIO is ours."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_ckpt.lightning.binding import find_plugin

    if find_plugin(trainer.strategy) is None:
        return
    for callback in trainer.callbacks:
        if (isinstance(callback, ModelCheckpoint) and callback.dirpath is not None
                and type(callback)._find_last_checkpoints is ModelCheckpoint._find_last_checkpoints
                and not isinstance(callback.__dict__.get("_find_last_checkpoints"), RemoteLastCheckpoints)
                and paths.is_remote(callback.dirpath)):
            callback._find_last_checkpoints = RemoteLastCheckpoints(callback)


def _trainer_being_built() -> Any:
    """The Trainer whose ``__init__`` is loading the callback factories (a few frames up), or None."""
    from lightning.pytorch import Trainer

    frame = sys._getframe(1)
    for _ in range(_INIT_FRAMES):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "_CallbackConnector":
            owner = getattr(owner, "trainer", None)
        if isinstance(owner, Trainer):
            return owner
        frame = frame.f_back
    return None
