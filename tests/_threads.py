"""Running one call on several threads at once, for tests of concurrent use."""

from __future__ import annotations

import threading
from typing import Callable


def errors_of_concurrent_calls(call: Callable[[], object], threads: int = 4, repeats: int = 5,
                               timeout_secs: float = 60.0) -> list[BaseException]:
    """Run ``call`` ``repeats`` times on each of ``threads`` threads started together; returns what the calls raised.

    Raises:
        AssertionError: a thread was still running after ``timeout_secs``.
    """
    errors: list[BaseException] = []

    def repeat() -> None:
        for _ in range(repeats):
            try:
                call()
            except Exception as e:  # noqa: BLE001 - returned to the test
                errors.append(e)

    started = [threading.Thread(target=repeat) for _ in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join(timeout=timeout_secs)
    assert not any(t.is_alive() for t in started), "a thread still runs"
    return errors
