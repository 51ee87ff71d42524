"""``SaveLedger``: orders removals, links and main-thread work after the async saves issued before them."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from lightning_ckpt import commit, paths
from lightning_ckpt.checkpointer import SaveStats
from lightning_ckpt.error_store import ErrorStore
from lightning_ckpt.errors import CheckpointTimeoutError
from lightning_ckpt.futures import peek_exception
from lightning_ckpt.picklable import PicklableBeforeUse

log = logging.getLogger(__name__)

_OUTCOMES_KEPT = 256  # outcomes of finished saves remembered for removal decisions
_COMPLETED_KEPT = 1024  # committed saves kept for metrics until popped
_LEDGERS: "weakref.WeakSet[SaveLedger]" = weakref.WeakSet()  # every ledger of the process (loads wait on all)


def path_key(path: Any) -> str:
    """What identifies a checkpoint path: a remote URL, or the local directory's real path plus the file's own
    name (a symlinked spelling of the directory is followed, a ``last.ckpt`` link itself is not)."""
    key = paths.path_key(path)
    if "://" in key:
        return key
    parent, name = os.path.split(key)
    return os.path.join(os.path.realpath(parent), name)


def wait_in_process(path: Any, timeout_secs: float) -> None:
    """Block until no ledger of this process has a save of ``path`` pending (any plugin instance).

    Raises:
        CheckpointTimeoutError: still pending after ``timeout_secs``.
    """
    for ledger in list(_LEDGERS):
        # a link or copy to ``path`` (a remote last.ckpt) waits for earlier saves: so does the load
        ledger.wait(timeout_secs, None if ledger.has_pending_action(path) else path)


@dataclass
class CompletedSave:
    """A committed save with the step it belongs to and the time the training loop was blocked by it."""

    step: int | None
    stats: SaveStats
    stall_secs: float

    def metrics(self) -> dict[str, float]:
        """What goes to the trainer's logger (with ``ckpt/step``, at the step Lightning logs at when it lands)."""
        stats = self.stats
        return {
            "ckpt/stall_ms": self.stall_secs * 1e3,
            "ckpt/write_secs": stats.write_secs,
            "ckpt/gb_per_s": stats.gb_per_sec if stats.write_secs > 0 else 0.0,
            "ckpt/bytes": float(stats.nbytes),
        }


@dataclass
class _Save:
    seq: int
    path: str  # path_key(path)
    step: int | None
    stage_future: Future
    stall_secs: float = 0.0


@dataclass
class _Action:
    kind: str  # "remove" | "link" | "call"
    after_seq: int  # the newest save issued before the request
    waits_for: set[int]  # saves pending at request time (and the newest save)
    path: str = ""
    target: str = ""
    fn: Callable[..., Any] | None = None  # a call; or how to remove/link where it is not local (remote stores)
    order: int = 0  # request order across removals, links and calls


class SaveLedger(PicklableBeforeUse):
    """Tracks pending saves and runs what must follow them, in request order, on any thread.

    - a removal waits for every save pending when it was requested and for the newest save; it is skipped when
      one of those failed (the file may be the only complete checkpoint left) and dropped when the same path was
      saved again after the request (that save replaces the file atomically anyway);
    - a link (``last.ckpt`` -> target) is made atomically once the target is committed, and skipped (the old
      link stays valid) when the target's save failed; among actions ready together, a link goes before the
      removal of its old target, so ``last.ckpt`` never dangles;
    - main-thread calls (logger hooks) wait the same way but only run from ``run_main_thread_actions``.

    Paths are matched by ``path_key`` (real directory). Errors of failed saves are kept in ``errors`` (an
    ``ErrorStore`` shared with the core checkpointer, keyed by save) until ``take_error`` (each logged once,
    raised once); with ``keep_errors=False`` they are only logged.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seq = 0
        self._pending: dict[int, _Save] = {}
        self._outcomes: dict[int, bool] = {}
        self._latest_by_path: dict[str, int] = {}
        self._actions: deque[_Action] = deque()
        self._calls: deque[_Action] = deque()
        self.errors = ErrorStore(logger=log)
        self._completed: deque[CompletedSave] = deque(maxlen=_COMPLETED_KEPT)
        self._orders = 0
        _LEDGERS.add(self)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _LEDGERS.add(self)

    _RECREATED = {"_cond": threading.Condition}

    @property
    def keep_errors(self) -> bool:
        return self.errors.keep

    @keep_errors.setter
    def keep_errors(self, keep: bool) -> None:
        self.errors.keep = keep

    def _in_use(self) -> str | None:
        return "it has pending work" if self._pending or self._actions or self._calls else None

    # ------------------------------------------------------------------ saves

    def add_save(self, path: Any, step: int | None, stage_future: Future, write_future: Future,
                 stall_secs: float) -> None:
        """Register a save; ``write_future`` (a ``TrackedFuture``) carries ``SaveStats`` in ``stats`` or fails."""
        key = path_key(path)
        with self._cond:
            self._seq += 1
            save = _Save(self._seq, key, step, stage_future, stall_secs)
            self._pending[save.seq] = save
            self._latest_by_path[key] = save.seq
        write_future.add_done_callback(lambda f: self._complete(save, f))

    def _complete(self, save: _Save, future: Future) -> None:
        exc = peek_exception(future)  # the core recorded a failure in the shared store: it is raised from there
        if exc is not None:
            self.record_error(exc, getattr(future, "save_key", None))
        with self._cond:
            self._pending.pop(save.seq, None)
            self._outcomes[save.seq] = exc is None
            for old in [s for s in self._outcomes if s <= save.seq - _OUTCOMES_KEPT]:
                del self._outcomes[old]
            if exc is None:
                self._completed.append(CompletedSave(save.step, future.stats, save.stall_secs))
            self._cond.notify_all()
        if exc is None:
            stats = future.stats
            log.info("checkpoint %s committed: %.1f MB, stall %.1f ms, write %.3f s (%.2f GB/s)", stats.path,
                     stats.nbytes / 1e6, save.stall_secs * 1e3, stats.write_secs, stats.gb_per_sec)
        self.process()

    # ------------------------------------------------------------------ errors

    def record_error(self, exc: BaseException, save_key: Any = None) -> None:
        """Keep ``exc`` (the failure of ``save_key``, if known) to be raised once by ``take_error``."""
        self.errors.record(exc, save_key)

    def peek_error(self) -> BaseException | None:
        return self.errors.peek()

    def take_error(self, all_: bool = False) -> BaseException | None:
        """The oldest failure not yet raised; with ``all_`` (teardown) the later ones are named in its notes
        and forgotten."""
        return self.errors.take_all() if all_ else self.errors.take()

    # ------------------------------------------------------------------ state

    def pending_paths(self) -> list[str]:
        with self._cond:
            return [s.path for s in sorted(self._pending.values(), key=lambda s: s.seq)]

    def is_pending(self, path: Any) -> bool:
        """True while a save of ``path`` is in flight (ModelCheckpoint's version counter asks)."""
        key = path_key(os.fspath(path))
        with self._cond:
            return any(s.path == key for s in self._pending.values())

    def has_pending_action(self, path: Any) -> bool:
        """True while a removal or link (a remote copy) of ``path`` waits for earlier saves."""
        path = path_key(path)
        with self._cond:
            return any(a.path == path for a in self._actions)

    def pop_completed(self) -> list[CompletedSave]:
        """Saves committed since the last call, with their step and stall (for metrics)."""
        with self._cond:
            done, self._completed = list(self._completed), deque(maxlen=_COMPLETED_KEPT)
        return done

    # ------------------------------------------------------------------ waiting

    def wait_for_staging(self, timeout_secs: float) -> float:
        """Block until every pending save's copy no longer reads live tensors; returns the seconds waited."""
        with self._cond:
            saves = list(self._pending.values())
        start = time.perf_counter()
        for save in saves:
            if not save.stage_future.done():
                t0 = time.perf_counter()
                _wait(save.stage_future, timeout_secs, f"staging of {save.path}")
                save.stall_secs += time.perf_counter() - t0
        return time.perf_counter() - start

    def wait(self, timeout_secs: float, path: Any = None) -> None:
        """Block until no save (of ``path``, when given) is pending; errors stay for ``take_error``.

        Raises:
            CheckpointTimeoutError: still pending after ``timeout_secs``.
        """
        key = path_key(path) if path is not None else None
        deadline = time.monotonic() + timeout_secs

        def busy() -> list[str]:
            return [s.path for s in self._pending.values() if key is None or s.path == key]

        with self._cond:
            while busy():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CheckpointTimeoutError(f"saves of {busy()} did not finish within {timeout_secs}s")
                self._cond.wait(remaining)
        self.process()

    # ------------------------------------------------------------------ ordered actions

    def request_removal(self, path: Any, remove: Callable[[], Any] | None = None) -> None:
        """Remove ``path`` once the saves issued before now are committed (``remove`` does it where it is not a
        local path)."""
        self._request(_Action("remove", 0, set(), path=path_key(path), fn=remove))

    def request_link(self, target: Any, linkpath: Any, make_link: Callable[[str, str], Any] | None = None) -> None:
        """Point ``linkpath`` at ``target`` atomically once ``target`` is committed (never a dangling link;
        ``make_link`` instead of a local link)."""
        if make_link is None:
            os.makedirs(os.path.dirname(path_key(linkpath)), exist_ok=True)
        self._request(_Action("link", 0, set(), path=path_key(linkpath), target=path_key(target), fn=make_link))

    def call_after_commit(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the training thread once the saves pending now are done (``run_main_thread_actions``)."""
        with self._cond:
            self._orders += 1
            self._calls.append(_Action("call", self._seq, set(self._pending), fn=fn, order=self._orders))
        self.run_main_thread_actions()

    def _request(self, action: _Action) -> None:
        with self._cond:
            self._orders += 1
            action.order = self._orders
            action.after_seq = self._seq
            action.waits_for = set(self._pending)
            if action.kind == "link":
                target_seq = self._latest_by_path.get(action.target)
                if target_seq is not None:
                    action.waits_for.add(target_seq)
            elif self._seq:
                action.waits_for.add(self._seq)
            self._actions.append(action)
        self.process()

    def _ready(self, action: _Action) -> bool:
        if action.waits_for & set(self._pending):
            return False
        # a file is not removed or relinked under a logger hook requested before it (it may read that file)
        return action.kind == "call" or not (self._calls and self._calls[0].order < action.order)

    def process(self) -> None:
        """Run the ordered removals and links whose saves are done (any thread)."""
        with self._cond:
            ready = []
            while self._actions and self._ready(self._actions[0]):
                ready.append(self._actions.popleft())
            for action in _links_first(ready):
                try:
                    self._run(action)
                except OSError as e:
                    log.warning("could not %s %s: %s", action.kind, action.path, e)

    def _failed(self, seqs: set[int]) -> bool:
        return any(not self._outcomes.get(s, True) for s in seqs)

    def _run(self, action: _Action) -> None:
        if action.kind == "remove":
            if self._latest_by_path.get(action.path, 0) > action.after_seq:
                log.debug("removal of %s dropped: it was saved again after the request", action.path)
            elif self._failed(action.waits_for):
                log.warning("kept %s: a save issued before its removal failed, so it may be the newest complete "
                            "checkpoint", action.path)
            else:
                action.fn() if action.fn is not None else commit.remove_path(action.path)
            return
        target_seq = self._latest_by_path.get(action.target)
        if target_seq is not None and target_seq <= action.after_seq and self._failed({target_seq}):
            log.warning("kept the link %s: its new target %s failed to save", action.path, action.target)
            return
        (action.fn or atomic_link)(action.target, action.path)

    def run_main_thread_actions(self) -> None:
        """Run deferred main-thread calls whose saves are done (call from the training thread only)."""
        while True:
            with self._cond:
                if not self._calls or not self._ready(self._calls[0]):
                    return
                action = self._calls.popleft()
            try:
                action.fn()
            finally:
                self.process()


def _links_first(actions: list[_Action]) -> list[_Action]:
    """Links before removals (a removal may be of the link's old target), except a removal of the link path
    itself, which keeps its place before the link."""
    linkpaths = {a.path for a in actions if a.kind == "link"}
    early = [a for a in actions if a.kind == "remove" and a.path in linkpaths]
    links = [a for a in actions if a.kind == "link"]
    rest = [a for a in actions if a not in early and a.kind != "link"]
    return early + links + rest


def atomic_link(target: str, linkpath: str) -> None:
    """Point ``linkpath`` at ``target`` (relative symlink, or a copy where links fail) in one rename."""
    if os.path.abspath(target) == os.path.abspath(linkpath):
        return
    with commit.Commit.create(linkpath) as c:
        try:
            c.symlink(os.path.relpath(target, os.path.dirname(os.path.abspath(linkpath))))
        except OSError:
            c.copy_from(target)
        c.publish()


def _wait(future: Future, timeout_secs: float, what: str) -> None:
    from concurrent.futures import wait

    done, _ = wait([future], timeout=timeout_secs)
    if not done:
        raise CheckpointTimeoutError(f"{what} did not finish within {timeout_secs}s")
