"""Pickling off the training thread, and the writer's memory for a state of many small tensors.

``DefaultStager`` pickles the staged structure later (on the writer link's send thread) when every leaf is a copy
of its own or an immutable value; otherwise it pickles at the moment of the save. Either way the file must hold the
state as it was when ``save`` was called.
"""

from __future__ import annotations

import copy
import os
import threading

import pytest
import torch

import lightning_ckpt as lc
from lightning_ckpt import staging
from tests._helpers import assert_equal_state


class Box:
    """A mutable non-tensor leaf (pickled by value)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Box) and other.value == self.value


@pytest.fixture
def gated_prepare(monkeypatch):
    """Holds every pickling that runs off the calling thread until ``release`` is set; records the threads."""
    release = threading.Event()
    threads: list[str] = []
    real = staging._prepare
    main = threading.get_ident()

    def gated(*args, **kwargs):
        threads.append("main" if threading.get_ident() == main else threading.current_thread().name)
        if threading.get_ident() != main:
            assert release.wait(30), "the test never released the pickling"
        return real(*args, **kwargs)

    monkeypatch.setattr(staging, "_prepare", gated)
    return release, threads


def _state(leaf) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"weights": {f"w{i}": torch.randn(4, 3, generator=gen) for i in range(20)},
            "opt": {"state": {i: {"step": torch.tensor(float(i)), "exp_avg": torch.randn(5, generator=gen)}
                              for i in range(10)}, "param_groups": [{"lr": 0.1, "params": list(range(10))}]},
            "epoch": 2, "name": "run", "leaf": leaf}


def _mutate(state: dict) -> None:
    """What a training loop does after the save: new values everywhere, in place and by replacement."""
    for t in state["weights"].values():
        t.add_(1)
    for s in state["opt"]["state"].values():
        s["step"].add_(1)
        s["exp_avg"].mul_(2)
    state["opt"]["param_groups"][0]["lr"] = 0.01
    state["opt"]["param_groups"][0]["params"].append(99)
    state["epoch"] = 3
    state["name"] = "changed"
    if isinstance(state["leaf"], Box):
        state["leaf"].value += 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("leaf, deferred", [(7, True), (None, True), (Box(7), False)], ids=["int", "none", "object"])
def test_the_file_holds_the_state_at_the_save_whenever_it_is_pickled(tmp_path, gated_prepare, leaf, deferred):
    release, threads = gated_prepare
    state = _state(leaf)
    expected = copy.deepcopy(state)
    path = str(tmp_path / "ckpt")
    with lc.make_async_checkpointer(lc.CheckpointerConfig()) as ck:
        stage_f, write_f = ck.save(path, state)
        stage_f.result(timeout=60)  # the caller may change the state now
        _mutate(state)
        release.set()
        write_f.result(timeout=60)
        loaded = ck.load(path, weights_only=False)  # Box is not on torch's weights-only allowlist
    assert_equal_state(loaded, expected)
    assert len(threads) == 1, threads  # pickled once
    if deferred:
        assert threads[0].endswith("-send"), threads  # by the writer link's send thread, after the stall
    else:
        assert threads == ["main"]  # a leaf the caller could still change: pickled inside save()


@pytest.mark.timeout(120)
def test_a_deferred_pickling_failure_fails_the_write_and_names_the_path(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("pickling broke")

    monkeypatch.setattr(staging, "_prepare", broken)
    path = str(tmp_path / "ckpt")
    with lc.make_async_checkpointer(lc.CheckpointerConfig()) as ck:
        stage_f, write_f = ck.save(path, {"w": torch.ones(3), "step": 1})
        stage_f.result(timeout=60)
        with pytest.raises(lc.CheckpointError, match="pickling broke") as info:
            write_f.result(timeout=60)
        assert path in str(info.value)
        monkeypatch.undo()
        ck.save(path, {"w": torch.ones(3), "step": 2})[1].result(timeout=60)  # the checkpointer keeps working
    assert not os.path.exists(path + ".tmp")


def _writer_rss_kib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS")}


@pytest.mark.timeout(180)
def test_writer_peak_memory_stays_within_twice_the_file_for_many_small_tensors(tmp_path):
    """60k tensors (per-parameter Adam state): the writer held the request frame and its decoded copy together,
    then parsed its own checksum record back (every key path as Python objects), about 3.5x the file's bytes."""
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(64, 200, (20_000,), generator=gen).tolist()
    state = {"optimizer_states": [{"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn(n, generator=gen),
                                                 "exp_avg_sq": torch.rand(n, generator=gen)}
                                             for i, n in enumerate(sizes)}}]}
    with lc.make_async_checkpointer(lc.CheckpointerConfig()) as ck:
        ck.save(str(tmp_path / "tiny"), {"x": torch.ones(1)})[1].result(timeout=60)
        pid = ck.process.pid
        base = _writer_rss_kib(pid)["VmRSS"]
        path = str(tmp_path / "ckpt")
        ck.save(path, state)[1].result(timeout=120)
        peak = _writer_rss_kib(pid)["VmHWM"]
    file_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    grown = (peak - base) * 1024
    assert grown <= 2 * file_bytes, f"writer grew {grown >> 20} MiB for a {file_bytes >> 20} MiB checkpoint"
