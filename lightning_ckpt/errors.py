"""The exception hierarchy every component raises (one root: ``CheckpointError``)."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """Root of every error this library raises besides ``ValueError``/``FileNotFoundError``/``TypeError``."""


class IncompleteCheckpointError(CheckpointError):
    """A checkpoint path exists but was never committed (no manifest, or a rank file is missing)."""


class CorruptCheckpointError(CheckpointError):
    """The bytes on disk do not match what was written (checksum mismatch, truncated or unreadable file)."""

    def __init__(self, message: str, *, path: str, key: str | None = None,
                 expected: str | None = None, actual: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.key = key
        self.expected = expected
        self.actual = actual


class CheckpointWriteError(CheckpointError):
    """A write failed in the background; the message carries the worker's traceback text."""


class WriterProcessDiedError(CheckpointWriteError):
    """The writer subprocess exited or was killed while work was pending."""


class CheckpointTimeoutError(CheckpointError, TimeoutError):
    """A wait ran past its timeout; the message names what was waited for."""


class BarrierTimeoutError(CheckpointTimeoutError):
    """Not every rank reached a barrier in time; the message names prefix, key and the missing ranks."""


class BarrierPeerError(CheckpointError):
    """Another rank reported a failure at a barrier, so this rank fails fast instead of waiting."""
