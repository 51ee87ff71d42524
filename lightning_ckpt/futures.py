"""Futures helpers: ``wrap_future`` and a future that remembers whether its outcome was seen."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any


class TrackedFuture(Future):
    """A future that records whether the caller looked at its outcome, so an error is raised only once."""

    observed = False

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(timeout)
        finally:
            if self.done():
                self.observed = True

    def exception(self, timeout: float | None = None) -> BaseException | None:
        exc = super().exception(timeout)
        self.observed = True
        return exc


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
