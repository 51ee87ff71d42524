"""Futures helpers: ``wrap_future`` and a future that remembers whether its outcome was seen."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable


class TrackedFuture(Future):
    """A future that records whether the caller looked at its outcome, so an error is raised only once.

    Args:
        save_key: the save this future belongs to (the key of its failure in an ``ErrorStore``).
        on_observed: called once, the first time the caller looks at the finished outcome.
    """

    observed = False

    def __init__(self, save_key: str | None = None, on_observed: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.save_key = save_key
        self._on_observed = on_observed

    def _observe(self) -> None:
        if not self.observed:
            self.observed = True
            if self._on_observed is not None:
                self._on_observed()

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(timeout)
        finally:
            if self.done():
                self._observe()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        exc = super().exception(timeout)
        self._observe()
        return exc


def peek_exception(future: Future) -> BaseException | None:
    """The exception of a finished ``future`` without counting as the caller having seen it."""
    return Future.exception(future, timeout=0)


def completed_future(result: Any = None, exc: BaseException | None = None) -> Future:
    future: Future = TrackedFuture()
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
    return future


def wrap_future(original_result: Any) -> Future:
    """A ``Future[None]`` that completes when ``original_result`` does (or at once if it is not a future).

    Errors of the original future propagate; its result value is dropped.
    """
    wrapped: Future = Future()
    if not isinstance(original_result, Future):
        wrapped.set_result(None)
        return wrapped

    def done(f: Future) -> None:
        if f.cancelled():
            wrapped.cancel()
        elif f.exception() is not None:
            wrapped.set_exception(f.exception())
        else:
            wrapped.set_result(None)

    original_result.add_done_callback(done)
    return wrapped
