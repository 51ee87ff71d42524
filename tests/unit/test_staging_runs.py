"""Small tensors staged as runs: one storage (record, checksum) per run; exact values through ours and torch.load."""

from __future__ import annotations

import os
from collections import OrderedDict, namedtuple

import pytest
import torch

import lightning_ckpt as lc
from lightning_ckpt import staging_plan
from lightning_ckpt.staging import CheckpointStagerConfig, DefaultStager
from lightning_ckpt.torch_zip import record_spans

Moments = namedtuple("Moments", ["exp_avg", "exp_avg_sq"])
DEFAULT_RUN_BYTES = staging_plan.RUN_BYTES


def _state(n: int = 300) -> dict:
    gen = torch.Generator().manual_seed(1)
    weights = OrderedDict((f"layer{i}.weight", torch.randn(3, 5, generator=gen)) for i in range(n))
    weights._metadata = {"": {"version": 2}}
    big = torch.randn(256, 300, generator=gen)  # 300 KiB: a storage of its own
    return {
        "state_dict": weights,
        "half": [torch.randn(7, generator=gen).half() for _ in range(20)],
        "big": big,
        "big_t": big.t(),  # a non-contiguous view of the same storage
        "tied": weights["layer0.weight"],
        "opt": {i: {"step": torch.tensor(float(i)), "m": Moments(torch.randn(4, generator=gen), torch.rand(4))}
                for i in range(50)},
        "ints": torch.arange(10, dtype=torch.int64),
        "epoch": 3,
    }


def _assert_equal(a, b) -> None:
    assert type(a) is type(b) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    else:
        assert a == b


def _sync_stager() -> DefaultStager:
    return DefaultStager(CheckpointStagerConfig(use_async_staging=False, buffer_wait_timeout_secs=30))


@pytest.mark.timeout(60)
def test_small_tensors_of_one_dtype_share_one_record_and_scalars_one_per_dtype():
    stager = _sync_stager()
    try:
        staged = stager.stage(_state())
        records = staged.staging.prepared.records
        # fp32 runs of the state_dict and of the optimizer state (runs never mix top-level entries), fp16 run,
        # int64 run, the big tensor and its transposed view (staged apart, as before), one storage of 0-dim fp32
        # steps: 7, not ~700
        assert len(records) == 7
        assert staged["state_dict"]["layer1.weight"].untyped_storage().data_ptr() == \
            staged["state_dict"]["layer2.weight"].untyped_storage().data_ptr()
        key_paths = dict((tuple(p), k) for p, k in staged.staging.prepared.key_paths)
        assert ("opt", 3, "m", 1) in key_paths  # namedtuples reached
        assert key_paths[("opt", 3, "m", 1)] != key_paths[("state_dict", "layer0.weight")]  # runs apart per entry
        assert staged["state_dict"]._metadata == {"": {"version": 2}} and isinstance(staged["opt"][0]["m"], Moments)
    finally:
        stager.close()


@pytest.mark.timeout(60)
def test_the_staged_copy_of_small_tensors_and_scalars_is_independent_of_the_live_ones():
    live = _state(40)
    snapshot = {k: v for k, v in live["opt"][5].items()}
    step_before, m_before = snapshot["step"].clone(), snapshot["m"].exp_avg.clone()
    stager = _sync_stager()
    try:
        staged = stager.stage(live)
        live["opt"][5]["step"].add_(100)
        live["opt"][5]["m"].exp_avg.add_(100)
        live["state_dict"]["layer3.weight"].zero_()
        assert torch.equal(staged["opt"][5]["step"], step_before)
        assert torch.equal(staged["opt"][5]["m"].exp_avg, m_before)
        assert staged["state_dict"]["layer3.weight"].abs().sum() > 0
    finally:
        stager.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("run_bytes", [DEFAULT_RUN_BYTES, 200])
def test_runs_round_trip_through_our_reader_and_torch_load(tmp_path, monkeypatch, run_bytes):
    monkeypatch.setattr(staging_plan, "RUN_BYTES", run_bytes)  # 200: every few tensors close a run
    state = _state()
    path = str(tmp_path / "ckpt.pt")
    with lc.make_async_checkpointer(lc.CheckpointerConfig()) as ckpt:
        _, write_future = ckpt.save(path, state)
        write_future.result(timeout=60)
        with torch.serialization.safe_globals([Moments]):
            ours = ckpt.load(path)
    files = [os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else [path]
    torch_file = next(f for f in files if f.endswith(".pt"))
    with torch.serialization.safe_globals([Moments]):
        theirs = torch.load(torch_file, weights_only=True)
    _assert_equal(state, ours)
    _assert_equal(state, theirs)
    assert theirs["tied"].data_ptr() == theirs["state_dict"]["layer0.weight"].data_ptr()
    assert ours["tied"].data_ptr() == ours["state_dict"]["layer0.weight"].data_ptr()
    with open(torch_file, "rb") as f:
        tensor_records = [n for n in record_spans(f, torch_file) if n.startswith("data/")]
    assert (len(tensor_records) == 7) == (run_bytes == DEFAULT_RUN_BYTES) and len(tensor_records) < 700


@pytest.mark.timeout(120)
def test_a_flipped_byte_in_a_run_is_caught_naming_the_file(tmp_path):
    state = {f"p{i}": torch.full((8,), float(i)) for i in range(100)}
    path = str(tmp_path / "small.pt")
    with lc.make_sync_checkpointer(lc.CheckpointerConfig()) as ckpt:
        ckpt.save(path, state)
        target = path if os.path.isfile(path) else next(
            os.path.join(path, n) for n in os.listdir(path) if n.endswith(".pt"))
        with open(target, "rb") as f:
            offset, size = record_spans(f, target)["data/0"]
        with open(target, "r+b") as f:
            f.seek(offset + size // 2)
            byte = f.read(1)
            f.seek(offset + size // 2)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(lc.CorruptCheckpointError, match="checksum mismatch") as info:
            ckpt.load(path)
        assert target in str(info.value) or path in str(info.value)


@pytest.mark.timeout(60)
def test_key_paths_cross_to_the_writer_as_json_and_are_written_as_they_came(tmp_path):
    import pickle

    from lightning_ckpt.checkpoint_file import read_checksum_record, write_file
    from lightning_ckpt.serialization import for_transfer, prepare

    state = {"a": torch.ones(3), "nested": {"b": [torch.zeros(2)], 7: torch.arange(2)}}
    direct = for_transfer(prepare(state))  # records with their bytes inline
    sent = pickle.loads(pickle.dumps(direct))
    assert isinstance(sent.key_paths, bytes) and isinstance(direct.key_paths, list)  # the original is unchanged
    write_file(str(tmp_path / "direct.pt"), direct)
    write_file(str(tmp_path / "sent.pt"), sent)
    read_direct = read_checksum_record(str(tmp_path / "direct.pt"))
    read_sent = read_checksum_record(str(tmp_path / "sent.pt"))
    assert read_sent.key_paths == read_direct.key_paths
    assert sorted(tuple(map(str, p)) for p, _ in read_sent.key_paths) == [("a",), ("nested", "7"), ("nested", "b", "0")]
