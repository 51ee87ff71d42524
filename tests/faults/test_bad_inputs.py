"""Bad inputs at the API: a clear error at the call (or an exact round trip), never a hang or a partial file."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import os
import pickle

import numpy as np
import pytest
import torch

import lightning_ckpt as lc
from lightning_ckpt.checkpoint_process import CheckpointProcessConfig
from lightning_ckpt.staging import CheckpointStagerConfig
from tests._helpers import assert_equal_state
from tests.faults._faults import run_ranks_in_threads, tmp_leftovers

pytestmark = pytest.mark.faults


class Color(enum.Enum):
    RED = 1


@dataclasses.dataclass
class Meta:
    name: str
    sizes: tuple


class BadReduce:
    def __reduce__(self):
        raise ValueError("cannot reduce me")


@pytest.fixture(params=["sync", "async"])
def ck(request):
    with (lc.make_sync_checkpointer() if request.param == "sync" else lc.make_async_checkpointer()) as checkpointer:
        yield checkpointer


def _save(ck, path, state):
    out = ck.save(path, state)
    return out[1].result(timeout=60) if isinstance(out, tuple) else out


def test_odd_non_tensor_leaves_round_trip_and_weights_only_refuses_them_clearly(ck, tmp_path):
    state = {"set": {1, 2}, "frozen": frozenset("ab"), "bytes": b"\x00\xff", "complex": 1 + 2j,
             "decimal": decimal.Decimal("1.10"), "when": datetime.datetime(2024, 1, 2, 3, 4, 5), "enum": Color.RED,
             "meta": Meta("x", (1, 2)), "array": np.arange(3), "inf": float("inf"), "big": 1 << 100,
             "w": torch.ones(3)}
    _save(ck, tmp_path / "odd.ckpt", state)
    loaded = ck.load(tmp_path / "odd.ckpt", weights_only=False)
    assert np.array_equal(loaded.pop("array"), state["array"])
    assert_equal_state(loaded, {k: v for k, v in state.items() if k != "array"})
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        ck.load(tmp_path / "odd.ckpt")  # the default stays safe, with torch's own instructions


@pytest.mark.parametrize("bad", ["lambda", "generator", "file", "bad_reduce"])
def test_unpicklable_leaves_fail_at_the_call_and_leave_nothing(ck, tmp_path, bad):
    with open(tmp_path / "handle", "w") as handle:
        value = {"lambda": lambda: 1, "generator": (i for i in range(3)), "file": handle,
                 "bad_reduce": BadReduce()}[bad]
        with pytest.raises((TypeError, ValueError), match="inner|cannot reduce me"):
            _save(ck, tmp_path / "a.ckpt", {"w": torch.ones(2), "outer": {"inner": value}})
    assert sorted(os.listdir(tmp_path)) == ["handle"]
    _save(ck, tmp_path / "b.ckpt", {"w": torch.ones(2)})  # nothing stuck: the next save works
    assert torch.equal(ck.load(tmp_path / "b.ckpt")["w"], torch.ones(2))


def test_views_non_contiguous_and_shared_tensors_round_trip(ck, tmp_path):
    base = torch.arange(60.0).reshape(6, 10)
    tied = torch.randn(4, 4, requires_grad=True)
    state = {
        "transposed": base.t(), "strided": base[::2, 1::3], "offset_view": base[3:, 2:5], "whole": base,
        "halves": list(base.view(-1).split(30)), "channels_last": torch.randn(2, 3, 4, 5).to(
            memory_format=torch.channels_last), "overlapping": base.view(-1).as_strided((3, 3), (1, 1)),
        "tied_a": tied, "tied_b": tied, "grad": tied.detach() * 2, "zero_dim": base[0, 0],
        "empty_view": base[:, 10:], "bool_view": (base > 30)[::3],
    }
    _save(ck, tmp_path / "v.ckpt", state)
    loaded = ck.load(tmp_path / "v.ckpt")
    for key, expected in state.items():
        expected = [t.detach() for t in expected] if isinstance(expected, list) else expected.detach()
        assert_equal_state(loaded[key], expected, key)


def test_empty_nested_containers_round_trip(ck, tmp_path):
    state = {"model": {}, "optimizer": {"state": {}, "param_groups": []}, "list": [], "tuple": ()}
    _save(ck, tmp_path / "e e.ckpt", state)
    assert_equal_state(ck.load(tmp_path / "e e.ckpt"), state)


def test_single_rank_path_that_is_a_directory_is_refused(ck, tmp_path):
    (tmp_path / "dir.ckpt").mkdir()
    with pytest.raises((IsADirectoryError, lc.CheckpointWriteError), match="dir.ckpt.*is a directory|directory"):
        _save(ck, tmp_path / "dir.ckpt", {"w": torch.ones(2)})
    if isinstance(ck, lc.AsyncCheckpointer):
        ck.check_for_errors()
    assert os.listdir(tmp_path / "dir.ckpt") == [] and tmp_leftovers(str(tmp_path)) == []


def test_multi_rank_path_that_is_a_file_fails_both_ranks_naming_it(tmp_path, free_port):
    from datetime import timedelta

    from torch.distributed import TCPStore

    (tmp_path / "dist.ckpt").write_text("a file")
    master = TCPStore("127.0.0.1", free_port, 2, is_master=True, wait_for_workers=False,
                      timeout=timedelta(seconds=30))
    errors: dict[int, BaseException] = {}

    def rank_main(rank: int) -> None:
        info = lc.RankInfo(rank, 2)
        barrier = lc.TCPStoreBarrier(rank_info=info, tcpstore_port=free_port, master_address="127.0.0.1", timeout_secs=30,
                                     is_master=False)
        try:
            lc.CheckpointWriter(rank_info=info, barrier=barrier).write(tmp_path / "dist.ckpt", {"w": torch.ones(2)})
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors[rank] = e

    run_ranks_in_threads(rank_main)
    del master
    assert set(errors) == {0, 1}
    for e in errors.values():  # each rank refuses it itself or is told by its peer, never waits out the timeout
        assert isinstance(e, (NotADirectoryError, lc.BarrierPeerError)), e
        assert "dist.ckpt" in str(e) and "not a directory" in str(e)
    assert (tmp_path / "dist.ckpt").read_text() == "a file"
    assert sorted(os.listdir(tmp_path)) == ["dist.ckpt"]


@pytest.mark.parametrize("make, field", [
    (lambda v: lc.BarrierConfig("no_such_barrier"), "barrier_type"),
    (lambda v: lc.BarrierConfig("tcp_store", {"timeout_secs": v}), "timeout_secs"),
    (lambda v: CheckpointStagerConfig(budget_bytes=0), "budget_bytes"),
    (lambda v: CheckpointStagerConfig(buffer_wait_timeout_secs=v), "buffer_wait_timeout_secs"),
    (lambda v: CheckpointProcessConfig(subprocess_init_timeout_secs=v), "subprocess_init_timeout_secs"),
    (lambda v: CheckpointProcessConfig(write_timeout_secs=v), "write_timeout_secs"),
    (lambda v: CheckpointProcessConfig(subprocess_shutdown_timeout_secs=v), "subprocess_shutdown_timeout_secs"),
    (lambda v: lc.CheckpointerConfig(max_in_flight=0), "max_in_flight"),
    (lambda v: lc.CheckpointerConfig(wait_timeout_secs=v), "wait_timeout_secs"),
    (lambda v: lc.RankInfo(2, 2), "global_rank"),
    (lambda v: lc.RankInfo(-1, 2), "global_rank"),
    (lambda v: lc.RankInfo(0, 0), "global_world_size"),
])
@pytest.mark.parametrize("value", [-1.0, 0.0, float("nan")])
def test_invalid_config_values_are_refused_naming_the_field(make, field, value):
    with pytest.raises(ValueError, match=field):
        make(value)


def test_async_checkpointer_refuses_a_dist_barrier_and_hooks_from_main():
    config = lc.CheckpointerConfig(barrier_config=lc.BarrierConfig("dist"))
    with pytest.raises(ValueError, match="tcp_store"):
        lc.make_async_checkpointer(config, lc.RankInfo(0, 2))
    hook = type("MainHook", (lc.WriterHook,), {"__module__": "__main__"})()
    with pytest.raises(ValueError, match="__main__"):
        lc.make_async_checkpointer(commit_hook=hook)
