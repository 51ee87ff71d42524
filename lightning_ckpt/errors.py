"""The exception hierarchy every component raises (one root: ``CheckpointError``)."""

from __future__ import annotations

import contextlib
import re
from typing import Any


def _rebuild(cls: type, args: tuple, state: dict) -> BaseException:
    """Recreate an error without calling ``__init__`` (whose signature may differ from ``args``)."""
    exc = _new(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


def _new(cls: type) -> BaseException:
    # With two builtin bases (e.g. RuntimeError and TimeoutError) only the base owning the memory layout may allocate.
    for base in cls.__mro__:
        if "__new__" in vars(base):
            try:
                return base.__new__(cls)
            except TypeError:
                continue
    raise TypeError(f"cannot allocate {cls.__name__}")


class CheckpointError(RuntimeError):
    """Root of every error this library raises besides ``ValueError``/``FileNotFoundError``/``TypeError``.

    Every subclass survives pickling with its message and fields (``torch.distributed`` gathers exceptions from
    the ranks by pickling them; a keyword-only field would otherwise make the unpickling raise ``TypeError``).
    """

    def __reduce__(self) -> tuple:
        return _rebuild, (type(self), self.args, dict(self.__dict__))


def restated(exc: CheckpointError, message: str) -> CheckpointError:
    """The same error (type and fields) with another message, e.g. one naming the rank it came from."""
    return _rebuild(type(exc), (message, *exc.args[1:]), dict(exc.__dict__))


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


def rename_in_error(error: BaseException, old: re.Pattern, new: str, depth: int = 0) -> None:
    """Replace ``old`` by ``new`` in ``error``'s arguments and string attributes, and in its causes, in place (type,
    fields and traceback stay): an error about a private copy or pin then names what the user gave."""
    if error is None or depth > 8:
        return

    def renamed(value: Any) -> Any:
        return old.sub(lambda _: new, value) if isinstance(value, str) else value

    with contextlib.suppress(Exception):  # an exception type that does not let its arguments be set
        error.args = tuple(renamed(a) for a in error.args)
    for name, value in list(vars(error).items()):
        if isinstance(value, str):
            with contextlib.suppress(Exception):
                setattr(error, name, renamed(value))
    if isinstance(error, OSError):
        for name in ("filename", "filename2"):
            value = getattr(error, name, None)
            if isinstance(value, str):  # None stays None (setting it would print "-> None")
                with contextlib.suppress(Exception):  # a subclass's read-only property
                    setattr(error, name, renamed(value))
    rename_in_error(error.__cause__, old, new, depth + 1)
    if error.__context__ is not error.__cause__:
        rename_in_error(error.__context__, old, new, depth + 1)
