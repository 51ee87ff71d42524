"""Barriers under PyTorch's names and arguments, over real TCPStores, with ours on top: a failing rank releases its
peers at once, and a timeout names prefix, sequence and the missing ranks."""

from __future__ import annotations

import threading

import pytest

import lightning_ckpt as lc
from lightning_ckpt.barriers import BARRIER_REGISTRY, create_barrier_from_config, register_barrier


def _seed_args(rank: int, port: int, **extra) -> dict:
    args = dict(global_rank=rank, global_world_size=2, barrier_prefix="ckpt", timeout_barrier_init_secs=30,
                use_checkpoint_barrier_tcpstore_libuv=True, tcpstore_port=port, master_address="127.0.0.1",
                timeout_secs=60)
    return {**args, **extra}


def _on_two_ranks(rank_main, timeout_secs: float = 60.0) -> dict[int, object]:
    """Runs ``rank_main(rank)`` for ranks 0 and 1 on threads; returns each rank's result or exception."""
    outcome: dict[int, object] = {}

    def run(rank: int) -> None:
        try:
            outcome[rank] = rank_main(rank)
        except BaseException as e:  # noqa: BLE001 - returned to the test
            outcome[rank] = e

    threads = [threading.Thread(target=run, args=(r,), name=f"rank-{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_secs)
    assert not [t.name for t in threads if t.is_alive()], "a rank is still waiting"
    return outcome


@pytest.mark.timeout(120)
def test_seed_style_barriers_meet_repeatedly_with_rank_0_serving_the_store(free_port):
    def rank_main(rank: int) -> lc.TCPStoreBarrier:
        barrier = lc.TCPStoreBarrier(**_seed_args(rank, free_port))
        for _ in range(3):
            barrier.execute_barrier()
        return barrier  # rank 0's barrier serves the store: it must outlive rank 1's last wait

    outcome = _on_two_ranks(rank_main)
    assert all(isinstance(outcome[r], lc.TCPStoreBarrier) for r in range(2)), outcome


@pytest.mark.timeout(120)
def test_a_failing_rank_releases_its_waiting_peer_at_once_naming_itself(free_port):
    def rank_main(rank: int) -> lc.TCPStoreBarrier:
        barrier = lc.TCPStoreBarrier(**_seed_args(rank, free_port, timeout_secs=3600))  # never waited out
        barrier.execute_barrier()
        if rank == 1:
            barrier.report_error("disk full", key="step-7/written")
            return barrier
        keep_serving.append(barrier)
        barrier.execute_barrier(key="step-7/written")

    keep_serving: list = []
    outcome = _on_two_ranks(rank_main)
    assert isinstance(outcome[1], lc.TCPStoreBarrier)
    assert isinstance(outcome[0], lc.BarrierPeerError)
    assert "rank 1 failed: disk full" in str(outcome[0]) and "ckpt/step-7/written" in str(outcome[0])


@pytest.mark.timeout(120)
def test_a_timeout_names_prefix_sequence_missing_ranks_and_where_they_were(free_port):
    def rank_main(rank: int) -> lc.TCPStoreBarrier:
        barrier = lc.TCPStoreBarrier(**_seed_args(rank, free_port, timeout_secs=1.0))
        barrier.execute_barrier()  # sequence 0: both
        if rank == 1:
            return barrier
        keep_serving.append(barrier)
        barrier.execute_barrier()  # sequence 1: rank 1 never comes

    keep_serving: list = []

    outcome = _on_two_ranks(rank_main)
    error = outcome[0]
    assert isinstance(error, lc.BarrierTimeoutError), error
    message = str(error)
    assert "prefix 'ckpt'" in message and "sequence 1" in message and "ranks [1] of 2 never arrived" in message
    assert "rank 1 last reached '0'" in message


@pytest.mark.timeout(120)
def test_create_barrier_from_config_builds_pytorchs_tcp_store_barrier_without_rank_info(free_port):
    def rank_main(rank: int) -> lc.Barrier:
        barrier = create_barrier_from_config(lc.BarrierConfig("tcp_store", _seed_args(rank, free_port)))
        barrier.execute_barrier()
        return barrier

    outcome = _on_two_ranks(rank_main)
    assert all(type(outcome[r]) is lc.TCPStoreBarrier for r in range(2)), outcome


@pytest.mark.timeout(120)
def test_a_writers_barrier_connects_to_the_store_the_training_process_serves(free_port):
    config = lc.BarrierConfig("tcp_store", {"tcpstore_port": free_port, "master_address": "127.0.0.1"})
    store = lc.barriers.host_barrier_store(config, lc.RankInfo(0, 2))

    def rank_main(rank: int) -> None:
        create_barrier_from_config(config, lc.RankInfo(rank, 2)).execute_barrier()

    try:
        assert _on_two_ranks(rank_main) == {0: None, 1: None}
    finally:
        del store


def test_registry_holds_pytorchs_names_and_former_names_still_configure():
    assert {"dist_barrier", "tcp_store"} <= set(BARRIER_REGISTRY)
    assert BARRIER_REGISTRY["dist_barrier"] is lc.DistBarrier
    assert lc.BarrierConfig(barrier_type="dist").barrier_type == "dist_barrier"
    former = lc.BarrierConfig("tcp_store", {"master_port": 1234, "master_addr": "h", "prefix": "p"})
    assert lc.barriers.canonical_barrier_args(former.barrier_args) == {
        "tcpstore_port": 1234, "master_address": "h", "barrier_prefix": "p"}
    with pytest.raises(ValueError, match="master_port"):
        lc.BarrierConfig("tcp_store", {"master_port": 1, "tcpstore_port": 2})
    with pytest.raises(ValueError, match="timeout_barrier_init_secs"):
        lc.BarrierConfig("tcp_store", {"timeout_barrier_init_secs": 0})


def test_register_barrier_is_a_class_decorator_keyed_by_barrier_type():
    @register_barrier
    class CountingBarrier(lc.Barrier):
        barrier_type = "counting_for_test"

        def __init__(self, start: int = 0) -> None:
            self.count = start

        def execute_barrier(self) -> None:
            self.count += 1

    try:
        barrier = create_barrier_from_config(lc.BarrierConfig("counting_for_test", {"start": 5}))
        barrier.execute_barrier()
        assert isinstance(barrier, CountingBarrier) and barrier.count == 6
    finally:
        BARRIER_REGISTRY.pop("counting_for_test")


def test_any_object_with_execute_barrier_is_a_barrier():
    class Duck:
        def execute_barrier(self) -> None:
            pass

    assert isinstance(Duck(), lc.Barrier)
    assert not isinstance(object(), lc.Barrier)


def test_dist_barrier_without_a_process_group_returns_at_once():
    create_barrier_from_config(lc.BarrierConfig("dist_barrier"), lc.RankInfo(0, 1)).execute_barrier()
