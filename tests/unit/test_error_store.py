"""Failed saves: each is logged once and raised once, through the core and through the Lightning plugin."""

from __future__ import annotations

import logging
import pickle
import re
import threading

import pytest
import torch

import lightning_ckpt as lc
from lightning_ckpt.error_store import ErrorStore, save_key_of
from lightning_ckpt.lightning import AsyncCheckpointIO
from tests._helpers import FailingHook, wait_for

N_FAILURES = 30


class _Lines(logging.Handler):
    """Keeps the text of ERROR records only (caplog keeps the records, whose args keep exceptions alive)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "injected failure" in record.getMessage():
            self.lines.append(record.getMessage())


@pytest.fixture
def error_lines():
    handler = _Lines()
    logging.getLogger().addHandler(handler)
    yield handler.lines
    logging.getLogger().removeHandler(handler)


def _raised_by(fn) -> str | None:
    """The message ``fn`` raised (no reference to the exception is kept, so its address may be reused)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return str(e)
    return None


def _paths_named(texts: list[str]) -> list[int]:
    return sorted(int(n) for text in texts for n in set(re.findall(r"bad-(\d+)\.ckpt", text)))


@pytest.mark.timeout(180)
def test_thirty_distinct_failed_plugin_saves_are_each_raised_and_logged_once(tmp_path, error_lines):
    io = AsyncCheckpointIO(commit_hook=FailingHook("bad"))
    raised = []
    try:
        for i in range(N_FAILURES):
            while True:  # an earlier failure raised by this save_checkpoint: the save did not happen, retry it
                message = _raised_by(lambda: io.save_checkpoint({"w": torch.full((4,), float(i))},
                                                                str(tmp_path / f"bad-{i}.ckpt")))
                if message is None:
                    break
                raised.append(message)
        io.wait_for_saves()
        while (message := _raised_by(io.raise_pending_error)) is not None:
            raised.append(message)
    finally:
        io.teardown()
    assert _paths_named(raised) == list(range(N_FAILURES))
    assert _paths_named(error_lines) == list(range(N_FAILURES)) and len(error_lines) == N_FAILURES


@pytest.mark.timeout(180)
def test_thirty_failed_saves_under_warn_policy_log_thirty_lines_and_raise_nothing(tmp_path, error_lines):
    io = AsyncCheckpointIO(commit_hook=FailingHook("bad"), error_policy="warn")
    try:
        for i in range(N_FAILURES):
            io.save_checkpoint({"w": torch.full((4,), float(i))}, str(tmp_path / f"bad-{i}.ckpt"))
            io.wait_for_saves()
    finally:
        io.teardown()  # raises nothing under "warn"
    lines = error_lines
    assert len(lines) == N_FAILURES and all(len(line.splitlines()) == 1 for line in lines)


@pytest.mark.timeout(120)
def test_core_failure_seen_through_its_future_is_not_raised_again_but_others_are(tmp_path):
    with lc.make_async_checkpointer(commit_hook=FailingHook("bad")) as ck:
        _, seen = ck.save(tmp_path / "bad-seen.ckpt", {"w": torch.ones(2)})
        with pytest.raises(lc.CheckpointWriteError):
            seen.result(timeout=60)
        _, unseen = ck.save(tmp_path / "bad-unseen.ckpt", {"w": torch.ones(2)})
        wait_for(unseen.done, what="the second failing write")
        with pytest.raises(lc.CheckpointWriteError, match="bad-unseen"):
            ck.check_for_errors()
        ck.check_for_errors()


def test_a_failure_recorded_twice_under_its_save_key_is_kept_and_logged_once(caplog):
    store = ErrorStore()
    exc = OSError("disk full")
    assert store.record(exc, "save-a") and not store.record(exc, "save-a")
    assert store.take() is exc and store.take() is None
    assert sum("disk full" in r.getMessage() for r in caplog.records) == 1


def test_an_exception_raised_by_the_store_and_caught_becomes_pending_again_unlogged(caplog):
    store = ErrorStore()
    store.record(OSError("first"), "save-1")
    try:
        store.raise_pending()
    except OSError as e:
        caught = e
    assert save_key_of(caught) == "save-1"
    assert store.record(caught)  # a layer above catches it to raise later: kept again, not logged again
    assert store.take() is caught
    assert sum("first" in r.getMessage() for r in caplog.records) == 1


def test_take_returns_each_failure_once_oldest_first():
    store = ErrorStore()
    for i in range(3):
        store.record(OSError(f"e{i}"), f"save-{i}")
    assert [str(store.take()) for _ in range(4)] == ["e0", "e1", "e2", "None"]


def test_take_all_returns_the_oldest_and_names_the_later_failures():
    store = ErrorStore(max_pending=3)
    for i in range(5):
        store.record(OSError(f"e{i}"), f"save-{i}")
    first = store.take_all()
    assert str(first) == "e0" and any("save-1, save-2 and 2 more" in n for n in first.__notes__)
    assert store.take() is None


def test_mark_seen_and_warn_store_keep_nothing_to_raise():
    store = ErrorStore()
    store.record(OSError("x"), "k")
    store.mark_seen("k")
    assert store.peek() is None
    quiet = ErrorStore(keep=False)
    quiet.record(OSError("y"), "k")
    assert quiet.take() is None


def test_concurrent_records_from_many_threads_are_all_kept():
    store = ErrorStore(max_pending=1000)
    threads = [threading.Thread(target=lambda i=i: store.record(OSError(str(i)), f"k{i}")) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert store.pending_count() == 200


def test_a_pickled_store_carries_its_policy_but_no_failures():
    store = ErrorStore(keep=False)
    store.record(OSError("x"), "k")
    copy = pickle.loads(pickle.dumps(store))
    assert copy.keep is False and copy.peek() is None and copy.record(OSError("x"), "k")
