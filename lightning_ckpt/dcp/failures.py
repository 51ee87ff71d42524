"""Turning DCP's ``CheckpointException`` (failures gathered from the ranks) into our errors, naming the ranks."""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from collections.abc import Iterator
from typing import Any

from lightning_ckpt.errors import CheckpointError, CheckpointWriteError, restated

# How long the ranks that survived a failed collective wait for each other to find out which ranks are gone.
ROLL_CALL_SECS = 5.0
_ROLL_CALL_POLL_SECS = 0.02

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


def name_lost_ranks(exc: BaseException, action: str, path: str, group: Any = None) -> BaseException:
    """The error to raise for a collective that failed because a peer vanished (a killed rank breaks gloo's
    connections: a bare ``RuntimeError`` naming an address, not a rank): a ``CheckpointWriteError`` naming the
    ranks that did not answer a roll call in the process group's store within ``ROLL_CALL_SECS``.

    The survivors of one failed save of ``path`` meet at the same store counters (the n-th failure of each), so
    the ranks behind are the dead ones (or ones still stuck elsewhere). When the store itself is gone, its host
    died: rank 0's process (unless torchrun's agent serves it). When every rank answers, or for any other
    exception, ``exc`` is returned unchanged.
    """
    import torch.distributed as dist

    from lightning_ckpt.barriers import _default_store

    if isinstance(exc, CheckpointError) or not isinstance(exc, RuntimeError) or not dist.is_initialized():
        return exc
    ranks = list(range(dist.get_world_size())) if group is None else dist.get_process_group_ranks(group)
    rank, store = dist.get_rank(), _default_store()
    if len(ranks) < 2 or store is None:
        return exc
    missing = _roll_call(store, f"lightning_ckpt/dcp/lost/{path}", ranks, rank)
    if missing == []:  # every rank answered: a failure of its own, not a lost peer
        return exc
    if missing is None:
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        missing, whom = ([], "the store's host (torchrun's agent)") if agent else ([0], "rank 0 (its host)")
        detail = f"the process group's store is unreachable: {whom} is gone"
    else:
        detail = f"ranks {missing} did not answer within {ROLL_CALL_SECS}s (dead, or stuck elsewhere)"
    names = ", ".join(f"rank {r}" for r in missing) or "an unknown rank"
    error = CheckpointWriteError(f"{action} failed on rank {rank}: lost {names}: {detail} "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})")
    error.failed_ranks = missing
    return error


def _roll_call(store: Any, name: str, ranks: list[int], rank: int) -> list[int] | None:
    """The ranks that did not reach this rank's count at ``name`` in time; None when the store is unreachable."""
    try:
        count = store.add(f"{name}/{rank}", 1)
        deadline = time.monotonic() + ROLL_CALL_SECS
        while True:
            missing = [r for r in ranks if r != rank and store.add(f"{name}/{r}", 0) < count]
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(_ROLL_CALL_POLL_SECS)
    except Exception:  # noqa: BLE001 - any store failure means its host is gone
        return None
