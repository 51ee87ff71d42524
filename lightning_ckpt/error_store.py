"""``ErrorStore``: failed saves kept by save key, each logged once and raised once."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
from collections import OrderedDict
from typing import Hashable, Iterator

from lightning_ckpt.picklable import PicklableBeforeUse

log = logging.getLogger(__name__)

_KEY_ATTR = "_lightning_ckpt_save_key"  # set on a recorded exception: which save it belongs to
_counter = itertools.count(1)


def new_save_key(prefix: str = "save") -> str:
    """A key no other save of this process has (or had): ``<prefix>-<pid>-<n>``."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


def save_key_of(exc: BaseException) -> Hashable | None:
    """The key under which ``exc`` was recorded, or None if no store has seen it."""
    return getattr(exc, _KEY_ATTR, None)


class ErrorStore(PicklableBeforeUse):
    """The failures of background saves, keyed by the save they belong to.

    - ``record(exc, key)`` keeps a failure to be raised later and logs it once (one concise line at ERROR, the
      traceback at DEBUG); a second record of the same key is ignored, so one failure reaching its owner by two
      routes (a future callback and a raise) is reported once.
    - ``mark_seen(key)``: the caller looked at this save's outcome itself (its future); it is not raised again.
    - ``take()`` returns the oldest failure not yet raised (each is returned once); ``take_all()`` returns it
      with a note naming the later ones and forgets them all; ``peek()`` looks without taking.
    - ``raise_pending()`` raises ``take()``'s failure, except inside ``deferred()`` on the same thread: a caller
      that reports failures later (several ranks agreeing on them) still gets its next save made.

    Thread-safe. Bounded: at most ``max_pending`` failures are kept for raising (the oldest are kept, the excess is
    logged and counted by ``take_all``) and ``max_keys`` keys are remembered for de-duplication.

    Args:
        keep: False only logs failures (nothing is ever raised), e.g. for an ``error_policy="warn"``.
        max_pending: failures kept for ``take``.
        max_keys: keys remembered to ignore repeated records of one save.
        logger: where failures are logged (default: this module's).
    """

    def __init__(self, keep: bool = True, max_pending: int = 64, max_keys: int = 4096,
                 logger: logging.Logger | None = None) -> None:
        self.keep = keep
        self.log = logger or log
        self.max_pending = max_pending
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._pending: OrderedDict[Hashable, BaseException] = OrderedDict()
        self._known: OrderedDict[Hashable, None] = OrderedDict()
        self._dropped = 0
        self._deferring = threading.local()

    _RECREATED = {"_lock": threading.Lock, "_pending": OrderedDict, "_known": OrderedDict, "_dropped": int,
                  "_deferring": threading.local}

    def record(self, exc: BaseException, key: Hashable | None = None, what: str = "checkpoint save") -> bool:
        """Keep ``exc`` (the failure of save ``key``) to be raised once, and log it once.

        Args:
            exc: the failure.
            key: the save it belongs to; None: the key it was recorded under before (an exception that a store
                raised and the caller caught: it becomes pending again, unlogged), else a fresh key.
            what: how the log line names the failed operation.

        Returns:
            False when the failure was already recorded under ``key`` (nothing is done).
        """
        earlier = save_key_of(exc)
        if key is None and earlier is not None:
            return self._requeue(earlier, exc)
        key = new_save_key() if key is None else key
        with self._lock:
            if key in self._known:
                return False
            self._remember(key)
            if self.keep:
                self._keep(key, exc)
        try:
            setattr(exc, _KEY_ATTR, key)
        except AttributeError:  # an exception type without __dict__: it can only be de-duplicated by its key
            pass
        self.log.error("%s %s failed: %s: %s", what, key, type(exc).__name__, _one_line(exc))
        self.log.debug("%s %s failed: %s", what, key, exc, exc_info=(type(exc), exc, exc.__traceback__))
        return True

    def _requeue(self, key: Hashable, exc: BaseException) -> bool:
        with self._lock:
            if not self.keep or key in self._pending:
                return False
            self._remember(key)
            self._keep(key, exc)
        return True

    def _remember(self, key: Hashable) -> None:
        self._known[key] = None
        self._known.move_to_end(key)
        while len(self._known) > self.max_keys:
            self._known.popitem(last=False)

    def _keep(self, key: Hashable, exc: BaseException) -> None:
        if len(self._pending) >= self.max_pending:
            self._dropped += 1
            self.log.warning("%d failed saves are already waiting to be raised; %s is only logged", self.max_pending,
                             key)
        else:
            self._pending[key] = exc

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's failures are the parent's to raise."""
        self._lock = threading.Lock()
        self._pending = OrderedDict()
        self._dropped = 0

    def mark_seen(self, key: Hashable) -> None:
        """The outcome of save ``key`` reached its caller another way: do not raise it again."""
        with self._lock:
            self._pending.pop(key, None)

    def peek(self) -> BaseException | None:
        """The failure ``take`` would return, left in place."""
        with self._lock:
            return next(iter(self._pending.values()), None)

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending) + self._dropped

    def take(self) -> BaseException | None:
        """The oldest failure not raised yet (removed), or None; later failures stay for later calls."""
        with self._lock:
            if not self._pending:
                return None
            return self._pending.popitem(last=False)[1]

    def take_all(self) -> BaseException | None:
        """The oldest failure, with a note naming every later one; all are forgotten (for a final ``close``)."""
        with self._lock:
            pending, self._pending = list(self._pending.items()), OrderedDict()
            dropped, self._dropped = self._dropped, 0
        if not pending:
            return None
        first = pending[0][1]
        later = [str(k) for k, _ in pending[1:]]
        if later or dropped:
            more = f" and {dropped} more" if dropped else ""
            first.add_note(f"later failed saves (each logged when it failed): {', '.join(later)}{more}")
        return first

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """On this thread, ``raise_pending()`` (not ``all_``) raises nothing: failures stay pending."""
        outer = getattr(self._deferring, "on", False)
        self._deferring.on = True
        try:
            yield
        finally:
            self._deferring.on = outer

    def raise_pending(self, all_: bool = False) -> None:
        """Raise the oldest failure not raised yet (``take``; with ``all_``, ``take_all``); inside ``deferred``
        only with ``all_``."""
        if not all_ and getattr(self._deferring, "on", False):
            return
        error = self.take_all() if all_ else self.take()
        if error is not None:
            raise error

def _one_line(exc: BaseException) -> str:
    """The first line of the message and, for a message carrying a traceback, its last line (the cause)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} ... {lines[-1]}"
