"""Staged and packed tensors keep what torch.save keeps: geometry, conj/neg bits, Parameter type and requires_grad,
and storages that do not mix the top-level entries of the checkpoint."""

from __future__ import annotations

import io
import os

import pytest
import torch

import lightning_ckpt as lc
from lightning_ckpt.checkpoint_file import write_file
from lightning_ckpt.staging import CheckpointStagerConfig, DefaultStager
from lightning_ckpt.staging_plan import SMALL_TENSOR_BYTES, StagingPlan
from tests.unit._crafted import write_ours


@pytest.fixture
def stage_and_write():
    """``fn(state, path, use_async_staging=False) -> (staged dict, torch.load of it written in this process)``:
    staging as the async checkpointer does it. The stager (whose buffers the staged dicts view) closes at teardown."""
    stagers = []

    def fn(state: dict, path, use_async_staging: bool = False) -> tuple[dict, dict]:
        stager = DefaultStager(CheckpointStagerConfig(use_async_staging=use_async_staging, use_shared_memory=False,
                                                      buffer_wait_timeout_secs=30))
        stagers.append(stager)
        staged = stager.stage(state)
        if use_async_staging:
            staged = staged.result(timeout=30)
        write_file(str(path), staged.staging.prepared, memoryview(staged.staging.buffer.base.numpy()))
        return staged, torch.load(str(path), weights_only=False)

    yield fn
    for stager in stagers:
        stager.close()


def _torch_round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=False)


def _layouts() -> dict:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 4, generator=gen)
    conv = torch.randn(8, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last)
    return {
        "transposed": weight.t(),
        "channels_last": conv,
        "big_transposed": torch.arange(20000.0).view(100, 200).t(),  # 80 KB: a storage of its own
        "sliced": torch.arange(100.0)[10:20:3],
        "expanded_2d": torch.arange(6.0).view(2, 3)[:, :1].expand(2, 1000),
        "size_one_dim": torch.randn(1, 5, generator=gen).as_strided((1, 5), (99, 1)),
        "columns": torch.randn(40, 30, generator=gen)[:, 5:9],
        "plain": weight,
    }


@pytest.mark.timeout(30)
@pytest.mark.parametrize("use_async_staging", [False, True])
def test_staged_tensors_keep_their_strides_and_values(stage_and_write, tmp_path, use_async_staging):
    state = _layouts()
    staged, loaded = stage_and_write(state, tmp_path / "a.pt", use_async_staging)
    theirs = _torch_round_trip(state)
    for key, live in state.items():
        for got in (staged[key], loaded[key]):
            assert got.stride() == live.stride() == theirs[key].stride(), key
            assert torch.equal(got, live), key


@pytest.mark.timeout(30)
def test_an_expanded_tensor_stages_and_writes_only_the_storage_it_uses(stage_and_write, tmp_path):
    state = {"mask": torch.ones(1).expand(10_000_000), "w": torch.randn(3)}
    assert StagingPlan(state).nbytes < SMALL_TENSOR_BYTES  # was 40 MB: every element copied
    staged, loaded = stage_and_write(state, tmp_path / "a.pt")
    assert os.path.getsize(tmp_path / "a.pt") < 64 << 10
    for got in (staged["mask"], loaded["mask"]):
        assert got.stride() == (0,) and got.shape == (10_000_000,) and bool((got == 1).all())


@pytest.mark.timeout(30)
def test_the_staged_copy_of_strided_tensors_is_a_point_in_time_snapshot():
    base = torch.arange(20000.0).view(100, 200)
    small = torch.arange(12.0).view(3, 4)
    state = {"big_t": base.t(), "small_t": small.t(), "expanded": small[:1].expand(5, 4)}
    before = {k: v.clone() for k, v in state.items()}
    stager = DefaultStager(CheckpointStagerConfig(use_async_staging=False, use_shared_memory=False))
    try:
        staged = stager.stage(state)
        base.add_(1)
        small.mul_(-1)
        for key, value in before.items():
            assert torch.equal(staged[key], value) and staged[key].stride() == state[key].stride(), key
    finally:
        stager.close()


@pytest.mark.timeout(30)
def test_conj_and_neg_views_keep_their_bit_as_torch_save_does(stage_and_write, tmp_path):
    cplx = torch.randn(4, dtype=torch.cfloat, generator=torch.Generator().manual_seed(0))
    state = {"cplx": cplx, "conj": cplx.conj(), "neg": torch._neg_view(torch.arange(3.0)),
             "conj_neg": torch._neg_view(cplx.conj()), "scalar_conj": torch.tensor(1 + 2j).conj()}
    staged, loaded = stage_and_write(state, tmp_path / "a.pt")
    theirs = _torch_round_trip(state)
    for key, live in state.items():
        for got in (staged[key], loaded[key], theirs[key]):
            assert (got.is_conj(), got.is_neg()) == (live.is_conj(), live.is_neg()), key
            assert torch.equal(got.resolve_conj().resolve_neg(), live.resolve_conj().resolve_neg()), key


@pytest.mark.timeout(30)
def test_parameters_requires_grad_and_attributes_survive_staging(stage_and_write, tmp_path):
    param = torch.nn.Parameter(torch.randn(5))
    flagged = torch.ones(3)
    flagged.note = "kept"
    state = {"param": param, "tied": [param, param], "grad": torch.ones(2, requires_grad=True),
             "frozen": torch.nn.Parameter(torch.ones(4), requires_grad=False),
             "scalar_param": torch.nn.Parameter(torch.tensor(3.0)), "flagged": flagged,
             "detached": param.detach(), "plain": torch.zeros(3)}
    staged, loaded = stage_and_write(state, tmp_path / "a.pt")
    for got in (staged, loaded):
        assert type(got["param"]) is torch.nn.Parameter and got["param"].requires_grad
        assert got["tied"][0] is got["tied"][1] is got["param"]
        assert got["grad"].requires_grad and type(got["grad"]) is torch.Tensor
        assert type(got["frozen"]) is torch.nn.Parameter and not got["frozen"].requires_grad
        assert type(got["scalar_param"]) is torch.nn.Parameter and got["scalar_param"].item() == 3.0
        assert got["flagged"].note == "kept"
        assert type(got["detached"]) is torch.Tensor and not got["detached"].requires_grad
        assert not got["plain"].requires_grad
        assert torch.equal(got["param"], param) and torch.equal(got["detached"], param)


@pytest.mark.timeout(60)
def test_the_async_checkpointer_writes_parameters_and_expanded_tensors_as_torch_save(tmp_path):
    state = {"p": torch.nn.Parameter(torch.randn(3)), "rg": torch.ones(2, requires_grad=True),
             "mask": torch.ones(1).expand(1_000_000), "t": torch.randn(4, 6).t()}
    path = str(tmp_path / "a.ckpt")
    with lc.make_async_checkpointer() as ckpt:
        stage_future, write_future = ckpt.save(path, state)
        write_future.result(timeout=30)
    target = path if os.path.isfile(path) else os.path.join(path, "checkpoint_0.pt")
    loaded = torch.load(target, weights_only=False)
    assert type(loaded["p"]) is torch.nn.Parameter and loaded["p"].requires_grad and loaded["rg"].requires_grad
    assert loaded["mask"].stride() == (0,) and loaded["t"].stride() == state["t"].stride()
    assert os.path.getsize(target) < 1 << 20  # was 4 MB
    assert torch.equal(loaded["t"], state["t"]) and torch.equal(loaded["p"], state["p"])


def _lightning_like() -> dict:
    """Shaped like Lightning's checkpoint: a flat state_dict, one optimizer state dict per optimizer, callbacks."""
    gen = torch.Generator().manual_seed(0)
    state_dict = {f"layer{i}.{n}": torch.randn(16, generator=gen) for i in range(20) for n in ("weight", "bias")}
    state_dict["bn.num_batches_tracked"] = torch.tensor(7)
    optimizers = [{"state": {i: {"step": torch.tensor(float(i)), "exp_avg": torch.randn(16, generator=gen),
                                 "exp_avg_sq": torch.rand(16, generator=gen)} for i in range(20)},
                   "param_groups": [{"lr": 0.1, "params": list(range(20))}]} for _ in range(2)]
    return {"epoch": 1, "global_step": 5, "state_dict": state_dict, "optimizer_states": optimizers,
            "callbacks": {"EMA": {"shadow": {k: v.clone() for k, v in list(state_dict.items())[:4]}}},
            "lr_schedulers": [{"last_epoch": 5}]}


def _storages(obj) -> set[int]:
    from lightning_ckpt.tree import flatten

    return {t.untyped_storage().data_ptr() for t in flatten(obj).leaves if isinstance(t, torch.Tensor)}


def _entries(ckpt: dict) -> dict[str, object]:
    return {"state_dict": ckpt["state_dict"], "opt0": ckpt["optimizer_states"][0],
            "opt1": ckpt["optimizer_states"][1], "callbacks": ckpt["callbacks"]}


def _assert_entries_apart(ckpt: dict) -> None:
    entries = {name: _storages(entry) for name, entry in _entries(ckpt).items()}
    names = list(entries)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not entries[a] & entries[b], f"{a} and {b} share a storage"


def _saved_size(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return len(buf.getvalue())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("writer", ["staged", "sync"])
def test_runs_never_mix_the_checkpoints_top_level_entries_nor_optimizers(stage_and_write, tmp_path, writer):
    state = _lightning_like()
    path = tmp_path / "a.ckpt"
    if writer == "staged":
        staged, loaded = stage_and_write(state, path)
        _assert_entries_apart(staged)
    else:
        loaded = torch.load(write_ours(path, state), weights_only=True)
    _assert_entries_apart(loaded)
    # Exporting the weights after a load writes about what torch.save of the live state_dict writes.
    assert _saved_size(loaded["state_dict"]) <= 1.1 * _saved_size(state["state_dict"])
    for name, entry in _entries(loaded).items():  # runs are kept inside each entry
        assert len(_storages(entry)) <= 2, name  # one run, and one storage of 0-dim tensors
    for key, value in state["state_dict"].items():
        assert torch.equal(loaded["state_dict"][key], value)


@pytest.mark.timeout(30)
def test_a_flat_state_dict_still_packs_its_small_tensors_into_one_run():
    state = {f"p{i}": torch.full((8,), float(i)) for i in range(200)}
    plan = StagingPlan(state)
    assert len(plan.regions) == 1
    nested = {"model": state, "optimizer": {"state": {i: {"m": torch.zeros(4)} for i in range(200)}}}
    assert len(StagingPlan(nested).regions) == 2  # one run per top-level entry, not one per parameter
