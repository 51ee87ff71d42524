"""Turning DCP's ``CheckpointException`` (failures gathered from the ranks) into our errors, naming the ranks."""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator

from lightning_ckpt.errors import CheckpointError, CheckpointWriteError, restated

# Builtin errors whose type callers rely on (bad config, missing paths); they keep their type, with the rank named.
_KEPT_BUILTINS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def unwrap(exc: BaseException, action: str, *, writing: bool) -> BaseException:
    """The error to raise for ``exc`` on every rank: DCP's ``CheckpointException`` becomes the failure of the
    lowest failed rank, with a message naming all failed ranks.

    Our ``CheckpointError`` subclasses keep their type and fields (``except CorruptCheckpointError`` works);
    ``ValueError``/``TypeError``/``FileNotFoundError`` and kin keep their type; anything else becomes
    ``CheckpointWriteError`` (``writing``) or ``CheckpointError`` carrying the failed rank's traceback text.
    Any other exception is returned unchanged.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    if not isinstance(exc, CheckpointException) or not exc.failures:
        return exc
    ranks = sorted(exc.failures)
    rank = ranks[0]
    failure, frames = exc.failures[rank]
    where = f"rank {rank}" if len(ranks) == 1 else f"rank {rank} (failed ranks: {ranks})"
    prefix = f"{action} failed on {where}"
    if isinstance(failure, CheckpointError):
        error: BaseException = restated(failure, f"{prefix}: {failure}")
    elif isinstance(failure, _KEPT_BUILTINS):
        error = _same_builtin(failure, f"{prefix}: {failure}")
    else:
        trace = "".join(traceback.format_list(frames)) if frames else ""
        text = f"{prefix}: {type(failure).__name__}: {failure}\n{trace}".rstrip()
        error = CheckpointWriteError(text) if writing else CheckpointError(text)
    error.failed_ranks = ranks
    error.__cause__ = failure
    return error


def _same_builtin(failure: BaseException, message: str) -> BaseException:
    if isinstance(failure, OSError) and failure.errno is not None:
        return type(failure)(failure.errno, message, failure.filename)
    return type(failure)(message)


@contextlib.contextmanager
def unwrapped_failures(action: str, *, writing: bool) -> Iterator[None]:
    """Re-raise DCP's ``CheckpointException`` from the block as our error (see ``unwrap``)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        error = unwrap(e, action, writing=writing)
        if error is e:
            raise
        raise error from error.__cause__
