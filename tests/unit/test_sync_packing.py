"""A synchronous write packs the small tensors it owns into runs, and keeps everything torch.save would keep."""

from __future__ import annotations

import pytest
import torch

import lightning_ckpt as lc
from lightning_ckpt import staging_plan
from lightning_ckpt.torch_zip import record_spans
from tests.unit._crafted import write_ours


def _storage_records(path: str) -> list[str]:
    with open(path, "rb") as f:
        return [n for n in record_spans(f, path) if n.startswith("data/")]


def _load_both(path: str) -> tuple[dict, dict]:
    ours, _ = lc.CheckpointReader().read(path)
    return ours, torch.load(path, weights_only=False)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.timeout(60)
def test_many_small_tensors_share_a_few_records_and_load_back_exactly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {"state": {i: {"exp_avg": torch.randn(5 + i % 7, generator=gen), "step": torch.tensor(float(i))}
                       for i in range(2000)},
             "ints": [torch.arange(i + 1) for i in range(50)], "big": torch.randn(100_000, generator=gen)}
    path = write_ours(tmp_path / "a.ckpt", state)
    records = _storage_records(path)
    assert len(records) <= 5  # float run, int64 run, 0-dim stack, the large tensor (was one record per tensor)
    for loaded in _load_both(path):
        for i in (0, 999, 1999):
            assert torch.equal(loaded["state"][i]["exp_avg"], state["state"][i]["exp_avg"])
            assert loaded["state"][i]["step"].shape == () and loaded["state"][i]["step"].item() == float(i)
        assert all(torch.equal(a, b) for a, b in zip(loaded["ints"], state["ints"]))
        assert torch.equal(loaded["big"], state["big"])


@pytest.mark.timeout(60)
def test_tensors_that_share_memory_still_share_it_after_the_load(tmp_path):
    base = torch.arange(12.0)
    tied = torch.ones(6)
    zero = torch.zeros(1)
    big = torch.randn(50_000)
    state = {"base": base, "base_2d": base.view(3, 4), "tied_a": tied, "tied_b": tied, "zero": zero,
             "expanded": zero.expand(40_000), "head_of_big": big[:4], "big": big, "scalar_view": base[5],
             "alone": torch.full((3,), 7.0), "alone_too": torch.full((3,), 8.0)}
    path = write_ours(tmp_path / "a.ckpt", state)
    for loaded in _load_both(path):
        assert _same_storage(loaded["base"], loaded["base_2d"]) and _same_storage(loaded["base"], loaded["scalar_view"])
        assert _same_storage(loaded["tied_a"], loaded["tied_b"])
        assert _same_storage(loaded["zero"], loaded["expanded"]) and loaded["expanded"].stride() == (0,)
        assert _same_storage(loaded["big"], loaded["head_of_big"])
        assert _same_storage(loaded["alone"], loaded["alone_too"])  # owned by nobody else: packed into one run
        for key, value in state.items():
            assert torch.equal(loaded[key], value), key


@pytest.mark.timeout(60)
def test_tensors_with_python_state_or_grad_are_written_as_they_are(tmp_path):
    flagged = torch.ones(3)
    flagged.note = "kept"
    state = {"param": torch.nn.Parameter(torch.ones(4)), "grad": torch.ones(4, requires_grad=True),
             "flagged": flagged, "conj": torch.tensor([1 + 2j, 3 - 1j]).conj(), "plain": torch.ones(2)}
    path = write_ours(tmp_path / "a.ckpt", state)
    loaded = torch.load(path, weights_only=False)
    assert type(loaded["param"]) is torch.nn.Parameter and loaded["param"].requires_grad
    assert loaded["grad"].requires_grad and loaded["flagged"].note == "kept"
    assert torch.equal(loaded["conj"], state["conj"])
    assert torch.equal(loaded["plain"], state["plain"])


@pytest.mark.timeout(60)
def test_past_the_pack_limit_the_rest_is_written_live(tmp_path, monkeypatch):
    monkeypatch.setattr(staging_plan, "PACK_LIMIT_BYTES", 10 * 4 * 4)  # ten tensors of four floats
    state = {f"p{i}": torch.full((4,), float(i)) for i in range(30)}
    path = write_ours(tmp_path / "a.ckpt", state)
    assert len(_storage_records(path)) == 1 + 20  # one run of ten, then twenty records of their own
    loaded, _ = lc.CheckpointReader().read(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.timeout(60)
def test_the_callers_tensors_are_left_untouched_and_unshared(tmp_path):
    state = {f"p{i}": torch.full((4,), float(i)) for i in range(10)}
    before = {k: (v.data_ptr(), v.clone()) for k, v in state.items()}
    write_ours(tmp_path / "a.ckpt", state)
    for k, v in state.items():
        assert v.data_ptr() == before[k][0] and torch.equal(v, before[k][1])
    loaded, _ = lc.CheckpointReader().read(str(tmp_path / "a.ckpt"))
    state["p0"].add_(100)  # the loaded copy is its own memory
    assert loaded["p0"][0].item() == 0.0
