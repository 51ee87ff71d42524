"""What every barrier is (``Barrier``, ours with named points ``KeyedBarrier``), how callers use one, and the
registry ``BarrierConfig`` names them from. The barriers themselves: ``lightning_ckpt.barriers``."""

from __future__ import annotations

import abc
import logging

log = logging.getLogger("lightning_ckpt.barriers")


class Barrier(abc.ABC):
    """Blocks until every rank of the checkpoint reached the same barrier.

    Any object with an ``execute_barrier()`` method counts as a ``Barrier`` (``isinstance`` checks the method).
    """

    @abc.abstractmethod
    def execute_barrier(self) -> None:
        """Returns once every rank reached this barrier."""

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        if cls is Barrier and any("execute_barrier" in vars(base) for base in other.__mro__):
            return True
        return NotImplemented


class KeyedBarrier(Barrier):
    """Ours: a barrier whose points may be named, and which can tell the peers that this rank failed."""

    @abc.abstractmethod
    def execute_barrier(self, key: str | None = None) -> None:
        """Returns once every rank reached barrier point ``key`` (None: the next in sequence)."""

    @abc.abstractmethod
    def report_error(self, message: str, key: str | None = None) -> None:
        """Makes the peers waiting at ``key`` fail at once with ``BarrierPeerError`` carrying ``message``."""

    def share(self, value: str | None, key: str) -> str:
        """Meets at barrier point ``key``; every rank returns the ``value`` rank 0 passed (the others pass None).

        The writer shares the unguessable name of a checkpoint's temp directory this way.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot share values between ranks")


def barrier_wait(barrier: Barrier, key: str) -> None:
    """Run ``barrier`` for the barrier point ``key`` (keyed barriers use it; plain ones ignore it)."""
    if isinstance(barrier, KeyedBarrier):
        barrier.execute_barrier(key=key)
    else:
        barrier.execute_barrier()


def barrier_report_error(barrier: Barrier, key: str, message: str) -> None:
    """Tell the peers at barrier point ``key`` that this rank failed, where the barrier can."""
    if isinstance(barrier, KeyedBarrier):
        try:
            barrier.report_error(message, key=key)
        except Exception:  # noqa: BLE001 - reporting is best effort; the original error is what matters
            log.exception("could not report a failure to the other ranks at barrier %s", key)


BARRIER_REGISTRY: dict[str, type] = {}


def register_barrier(barrier_class: type) -> type:
    """Class decorator: makes ``barrier_class`` available as ``BarrierConfig(barrier_type=barrier_class.barrier_type)``.

    Returns the class unchanged; a class without a ``barrier_type`` attribute is not registered.
    """
    name = getattr(barrier_class, "barrier_type", None)
    if name is not None:
        BARRIER_REGISTRY[name] = barrier_class
    return barrier_class
