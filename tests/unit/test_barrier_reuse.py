"""A TCPStoreBarrier point met again (the same key twice, or a rebuilt barrier on the same store and prefix) is a new
round: it waits for every rank again, and errors and shared values of earlier rounds are never seen in it."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any, Callable

import pytest
from torch.distributed import TCPStore

from lightning_ckpt import BarrierPeerError, BarrierTimeoutError, CheckpointError, TCPStoreBarrier

SHORT_SECS = 1.0  # barrier timeout where a rank is meant to stay away
HOLD_SECS = 1.0  # how long a rank that must be waited for stays away; a wrong barrier returns well within it


class _Rank(threading.Thread):
    """One rank's call on its own thread; ``done`` is set once it returned or raised."""

    def __init__(self, call: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.call, self.done, self.result, self.error = call, threading.Event(), None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.call()
        except BaseException as e:  # noqa: BLE001 - handed to the test by outcome()
            self.error = e
        finally:
            self.done.set()

    def outcome(self) -> Any:
        self.join(timeout=60)
        assert not self.is_alive(), "the rank is still waiting"
        if self.error is not None:
            raise self.error
        return self.result


def _together(*calls: Callable[[], Any]) -> list[Any]:
    ranks = [_Rank(call) for call in calls]
    return [rank.outcome() for rank in ranks]


class _PollSignallingStore:
    """A store client that sets ``polled`` when its barrier first reads the store to see who arrived."""

    def __init__(self, store: TCPStore) -> None:
        self._store, self.polled = store, threading.Event()

    def check(self, keys: list[str]) -> bool:
        self.polled.set()
        return self._store.check(keys)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@pytest.fixture
def make_barrier():
    """Builds rank barriers over one real TCPStore, each with its own client connection (as separate ranks have)."""
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))

    def make(rank: int, timeout_secs: float = 60.0, wrap: Callable[[TCPStore], Any] = lambda s: s) -> TCPStoreBarrier:
        client = TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=30))
        return TCPStoreBarrier(rank, 2, barrier_prefix="ckpt", timeout_secs=timeout_secs, store=wrap(client))

    yield make  # ``make`` holds the server until the test ends


@pytest.mark.timeout(60)
def test_the_same_key_met_twice_waits_for_every_rank_again(make_barrier):
    rank0, rank1 = make_barrier(0, SHORT_SECS), make_barrier(1, SHORT_SECS)
    _together(lambda: rank0.execute_barrier(key="step-1/written"), lambda: rank1.execute_barrier(key="step-1/written"))

    with pytest.raises(BarrierTimeoutError) as timeout:
        rank0.execute_barrier(key="step-1/written")  # rank 1 stays away from round 1
    message = str(timeout.value)
    assert "ckpt/step-1/written" in message and "round 1" in message, message
    assert "ranks [1] of 2 never arrived" in message and "rank 1 last reached 'step-1/written'" in message, message
    # rank 1 coming late does not pass the round rank 0 gave up on
    with pytest.raises(BarrierPeerError, match="rank 0 gave up waiting"):
        rank1.execute_barrier(key="step-1/written")


@pytest.mark.timeout(60)
def test_a_late_rank_is_waited_for_at_a_reused_key(make_barrier):
    rank0, rank1 = make_barrier(0), make_barrier(1)
    _together(lambda: rank0.execute_barrier(key="k"), lambda: rank1.execute_barrier(key="k"))

    waiting = _Rank(lambda: rank0.execute_barrier(key="k"))
    assert not waiting.done.wait(HOLD_SECS), f"round 1 passed without rank 1 (error: {waiting.error!r})"
    rank1.execute_barrier(key="k")
    waiting.outcome()


@pytest.mark.timeout(60)
def test_a_rebuilt_barrier_on_the_same_store_and_prefix_waits_again(make_barrier):
    _together(lambda: make_barrier(0).execute_barrier(), lambda: make_barrier(1).execute_barrier())  # sequence 0
    _together(lambda: make_barrier(0).execute_barrier(), lambda: make_barrier(1).execute_barrier())  # both rebuilt

    with pytest.raises(BarrierTimeoutError) as timeout:
        make_barrier(0, SHORT_SECS).execute_barrier()  # sequence 0 a third time; rank 1 is not rebuilt
    message = str(timeout.value)
    assert "sequence 0" in message and "round 2" in message and "ranks [1] of 2 never arrived" in message, message


@pytest.mark.timeout(60)
def test_an_error_reported_in_an_earlier_round_does_not_abort_a_later_one(make_barrier):
    rank0, rank1 = make_barrier(0, SHORT_SECS), make_barrier(1, SHORT_SECS)
    rank1.report_error("disk full", key="k")  # round 0: rank 1 failed before rank 0 arrived
    with pytest.raises(BarrierPeerError, match="rank 1 failed: disk full"):
        rank0.execute_barrier(key="k")

    _together(lambda: rank0.execute_barrier(key="k"), lambda: rank1.execute_barrier(key="k"))  # round 1: both
    with pytest.raises(BarrierTimeoutError) as timeout:  # round 2: rank 1 stays away; waited for, not refused
        rank0.execute_barrier(key="k")
    assert "disk full" not in str(timeout.value) and "ranks [1] of 2 never arrived" in str(timeout.value)


@pytest.mark.timeout(60)
def test_share_returns_the_value_of_its_own_round(make_barrier):
    rank0, rank1 = make_barrier(0), make_barrier(1)
    assert _together(lambda: rank0.share("first", key="t"), lambda: rank1.share(None, key="t")) == ["first"] * 2

    reader = _Rank(lambda: rank1.share(None, key="t"))  # round 1: rank 1 asks before rank 0 shares
    assert not reader.done.wait(HOLD_SECS), f"rank 1 returned {reader.result!r} before rank 0 shared (error: " \
                                            f"{reader.error!r})"
    assert rank0.share("second", key="t") == "second"
    assert reader.outcome() == "second"


@pytest.mark.timeout(60)
def test_a_rank_arriving_twice_is_refused_not_taken_for_two_ranks(make_barrier):
    watched = _PollSignallingStore
    rank0, rank1 = make_barrier(0), make_barrier(1, wrap=lambda s: watched(s))
    first = _Rank(lambda: rank1.execute_barrier(key="k"))
    assert rank1._store.polled.wait(30), "rank 1 never started waiting"

    with pytest.raises(CheckpointError, match="rank 1 reached barrier point 'ckpt/k' again"):
        make_barrier(1, SHORT_SECS).execute_barrier(key="k")  # a second barrier claiming rank 1's place
    assert not first.done.is_set(), f"rank 1 passed without rank 0 (error: {first.error!r})"

    rank0.execute_barrier(key="k")
    first.outcome()
    _together(lambda: rank0.execute_barrier(key="k"), lambda: rank1.execute_barrier(key="k"))  # still in step


@pytest.mark.timeout(60)
def test_a_late_rank_fails_the_round_it_missed_and_meets_the_next_one(make_barrier):
    """Rank 1 comes to round 0 after rank 0 gave up on it, while rank 0 already waits in round 1: rank 1 fails
    round 0 only, and its next arrival meets rank 0's round 1 (never a round apart, never breaking round 1)."""
    rank0 = make_barrier(0, SHORT_SECS)
    with pytest.raises(BarrierTimeoutError):
        rank0.execute_barrier(key="k")  # round 0: rank 1 is late
    rank0 = make_barrier(0, 30.0, wrap=lambda s: _PollSignallingStore(s))
    waiting = _Rank(lambda: rank0.execute_barrier(key="k"))  # round 1
    assert rank0._store.polled.wait(30), "rank 0 never started waiting"
    rank1 = make_barrier(1, 30.0)
    with pytest.raises(BarrierPeerError, match="rank 0 gave up waiting"):
        rank1.execute_barrier(key="k")  # its round 0
    assert not waiting.done.is_set(), f"round 1 broke (error: {waiting.error!r})"
    rank1.execute_barrier(key="k")  # its round 1: rank 0's
    waiting.outcome()
    _together(lambda: rank0.execute_barrier(key="k"), lambda: rank1.execute_barrier(key="k"))  # still in step


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key", ["k", None])
def test_a_failure_reported_after_a_failed_meeting_reaches_the_next_one(make_barrier, key):
    """Rank 1's meeting fails (rank 0 reported); its work for the next meeting then fails too and it reports
    that instead of arriving: rank 0's next meeting raises that report at once (keyed and sequenced points)."""
    rank0, rank1 = make_barrier(0, 30.0), make_barrier(1, 30.0)
    rank0.report_error("disk full", key=key)  # meeting 0
    with pytest.raises(BarrierPeerError, match="rank 0 failed: disk full"):
        rank1.execute_barrier(key=key)
    rank1.report_error("oom at step 1", key=key)  # meeting 1
    with pytest.raises(BarrierPeerError, match="rank 1 failed: oom at step 1"):
        rank0.execute_barrier(key=key)
    _together(lambda: rank0.execute_barrier(key=key), lambda: rank1.execute_barrier(key=key))  # meeting 2


class _FailsAfterArriving:
    """A store client whose rank, once it arrived, loses the store before its round completes."""

    def __init__(self, store: TCPStore) -> None:
        self._store = store

    def check(self, keys: list[str]) -> bool:
        if any("/arrived/" in k for k in keys):
            raise RuntimeError("store connection reset")
        return self._store.check(keys)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@pytest.mark.timeout(60)
def test_a_peer_failing_right_after_it_arrived_leaves_the_others_nothing_to_wait_for(make_barrier):
    """Every rank arrived, then rank 1 failed before finishing the round: the round is complete, so rank 0
    returns at once (it waited 300 s in PyTorch's store barrier that ends a round), and rank 1 raises its error."""
    import time

    rank0 = make_barrier(0, 2.0, wrap=lambda s: _PollSignallingStore(s))
    rank1 = make_barrier(1, 2.0, wrap=lambda s: _FailsAfterArriving(s))
    start = time.monotonic()
    first = _Rank(lambda: rank0.execute_barrier(key="k"))
    assert rank0._store.polled.wait(30), "rank 0 never started waiting"  # it arrived first
    second = _Rank(lambda: rank1.execute_barrier(key="k"))
    with pytest.raises(RuntimeError, match="store connection reset"):
        second.outcome()
    first.outcome()
    assert time.monotonic() - start < 30
