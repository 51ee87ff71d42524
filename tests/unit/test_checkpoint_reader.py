"""The reader never lies: one descriptor per read, validated checksum records, and PyTorch's own directories."""

from __future__ import annotations

import collections
import fractions
import logging
import os
import pickle
import shutil

import pytest
import torch

import lightning_ckpt as lc
from lightning_ckpt import checkpoint_reader
from tests._helpers import assert_equal_state
from tests.unit._crafted import rewrite_checksum_record, write_ours, write_per_tensor

torch_experimental = pytest.importorskip("torch.distributed.checkpoint._experimental.checkpoint_writer")


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((64,), value), "b": torch.arange(8) + int(value)}, "step": int(value)}


def _write_torchs(path, state, rank: int = 0) -> str:
    from torch.distributed.checkpoint._experimental.checkpoint_writer import CheckpointWriter, CheckpointWriterConfig
    from torch.distributed.checkpoint._experimental.types import RankInfo

    CheckpointWriter(CheckpointWriterConfig(), RankInfo(global_rank=rank, global_world_size=1)).write(str(path), state)
    return str(path)


# ---------------------------------------------------------------- U1: one descriptor per read


def test_reader_racing_an_overwrite_never_reports_corruption(tmp_path, monkeypatch):
    """The path is replaced (as every commit does, by rename) after the reader opened it: it reads the old one."""
    path, newer = str(tmp_path / "a.ckpt"), str(tmp_path / "newer.ckpt")
    real_load = torch.load

    def load_after_overwrite(*args, **kwargs):
        os.replace(newer, path)  # the overwrite lands between opening the file and loading it
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint_reader.torch, "load", load_after_overwrite)
    for map_location in (None, "cpu", {"cpu": "cpu"}):
        write_ours(path, _state(1.0))
        write_ours(newer, _state(2.0))
        loaded, _ = lc.CheckpointReader().read(path, map_location=map_location)
        assert_equal_state(loaded, _state(1.0))
    monkeypatch.undo()
    assert_equal_state(lc.CheckpointReader().read(path)[0], _state(2.0))


def test_reader_racing_a_directory_replacement_reads_a_complete_checkpoint(tmp_path, monkeypatch):
    """The directory is swapped (old one removed) between listing it and opening the rank file: read again."""
    path = str(tmp_path / "ckpt")
    _write_torchs(path, _state(1.0))
    _write_torchs(tmp_path / "next", _state(2.0))
    real_open = checkpoint_reader.open_unmanifested
    swapped = []

    def open_after_swap(*args, **kwargs):
        if not swapped:
            swapped.append(True)
            shutil.rmtree(path)
            os.rename(tmp_path / "next", path)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(checkpoint_reader, "open_unmanifested", open_after_swap)
    loaded, _ = lc.CheckpointReader().read(path)
    assert swapped and loaded["step"] == 2
    assert_equal_state(loaded, _state(2.0))


# ---------------------------------------------------------------- U2: checksum records are validated


@pytest.mark.parametrize("bad_key_paths", [
    [[[["nested"]], "0"]],  # a key path element that is a list (unhashable)
    [[{"a": 1}, "0"]],
    [["model.w", "0"]],
    [[["model", "w"]]],
    "not a list",
])
def test_malformed_key_paths_are_a_corrupt_checkpoint_naming_path_and_key(tmp_path, bad_key_paths):
    path = write_ours(tmp_path / "a.ckpt", _state(1.0))
    rewrite_checksum_record(path, lambda r: {**r, "key_paths": bad_key_paths})
    with pytest.raises(lc.CorruptCheckpointError, match="key_paths") as info:
        lc.CheckpointReader().read(path)
    assert info.value.path == path and path in str(info.value) and info.value.key.startswith("key_paths")


def test_a_storage_absent_from_the_checksum_record_is_refused_not_loaded_unverified(tmp_path):
    path = write_ours(tmp_path / "a.ckpt", _state(1.0))

    def drop_first_storage(record):
        first = sorted(record["records"])[0]
        record["records"].pop(first)
        record["key_paths"] = [kp for kp in record["key_paths"] if kp[1] != first]
        return record

    rewrite_checksum_record(path, drop_first_storage)
    with pytest.raises(lc.CorruptCheckpointError, match="has no checksum") as info:
        lc.CheckpointReader().read(path)
    assert info.value.path == path and info.value.key.startswith("data/")


# ---------------------------------------------------------------- interop with torch's _experimental package


def test_reads_a_directory_written_by_torchs_experimental_writer(tmp_path, caplog):
    path = _write_torchs(tmp_path / "ckpt", _state(3.0))
    assert os.listdir(path) == ["checkpoint_0.pt"]
    with caplog.at_level(logging.WARNING, logger="lightning_ckpt.checkpoint_reader"):
        for _ in range(2):
            loaded, missing = lc.CheckpointReader().read(path)
            assert missing == [] and loaded["step"] == 3
            assert_equal_state(loaded, _state(3.0))
    no_checksums = [r for r in caplog.records if "no checksums" in r.getMessage()]
    assert len(no_checksums) == 1 and path in no_checksums[0].getMessage()
    partial, _ = lc.CheckpointReader().read(path, {"model": {"w": torch.zeros(64)}})
    assert torch.equal(partial["model"]["w"], torch.full((64,), 3.0))


def test_a_torch_directory_holding_a_temp_of_ours_is_refused(tmp_path):
    path = _write_torchs(tmp_path / "ckpt", _state(1.0))
    os.mkdir(os.path.join(path, ".lckpt-0123456789abcdef.tmp"))
    with pytest.raises(lc.IncompleteCheckpointError, match="temps"):
        lc.CheckpointReader().read(path)


def test_a_torn_file_in_a_torch_directory_is_corrupt(tmp_path):
    path = _write_torchs(tmp_path / "ckpt", _state(1.0))
    rank_file = os.path.join(path, "checkpoint_0.pt")
    os.truncate(rank_file, os.path.getsize(rank_file) // 2)
    with pytest.raises(lc.CorruptCheckpointError) as info:
        lc.CheckpointReader().read(path)
    assert info.value.path == rank_file


def test_a_directory_with_our_rank_file_but_no_manifest_never_committed(tmp_path):
    ours = write_ours(tmp_path / "a.ckpt", _state(1.0))
    os.mkdir(tmp_path / "ckpt")
    shutil.copy(ours, tmp_path / "ckpt" / "checkpoint_0.pt")
    with pytest.raises(lc.IncompleteCheckpointError, match="never committed"):
        lc.CheckpointReader().read(tmp_path / "ckpt")


def test_read_accepts_pytorchs_keyword_arguments(tmp_path, caplog):
    path = write_ours(tmp_path / "a.ckpt", _state(1.0))
    with caplog.at_level(logging.WARNING, logger="lightning_ckpt.checkpoint_reader"):
        loaded, _ = lc.CheckpointReader().read(path, None, map_location="cpu", extra_for_test="value")
    assert loaded["step"] == 1 and "extra_for_test" in caplog.text


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_torchs_experimental_reader_reads_what_our_checkpointers_wrote(tmp_path, kind):
    from torch.distributed.checkpoint._experimental.checkpoint_reader import CheckpointReader as TorchReader
    from torch.distributed.checkpoint._experimental.types import RankInfo as TorchRankInfo

    path = str(tmp_path / "ckpt")
    make = lc.make_sync_checkpointer if kind == "sync" else lc.make_async_checkpointer
    checkpointer = make()
    try:
        outcome = checkpointer.save(path, _state(5.0))
        if kind == "async":
            outcome[1].result(timeout=120)
    finally:
        checkpointer.close()
    assert sorted(os.listdir(path)) == ["MANIFEST.json", "checkpoint_0.pt"]
    loaded, missing = TorchReader(TorchRankInfo(global_rank=0, global_world_size=1)).read(path)
    assert missing == [] and loaded["step"] == 5
    assert_equal_state(loaded, _state(5.0))


# ---------------------------------------------------------------- the parallel CPU load (read_engine)


def _flip_tensor_byte(path: str, tensor: torch.Tensor) -> None:
    data = bytearray(open(path, "rb").read())
    pos = bytes(data).find(tensor.numpy().tobytes())
    assert pos > 0
    data[pos + 1] ^= 0x10
    open(path, "wb").write(bytes(data))


def test_a_partial_read_reads_only_the_requested_tensors_bytes(tmp_path):
    state = {"model": {"w": torch.full((1 << 18,), 1.0), "b": torch.full((1 << 18,), 2.0)},
             "optim": {"m": torch.full((1 << 18,), 3.0)}, "step": 7}
    path = write_ours(tmp_path / "a.ckpt", state)
    reader = lc.CheckpointReader()
    target = {"model": {"w": torch.zeros(1 << 18)}, "nope": torch.zeros(1)}
    out, missing = reader.read(path, target)
    assert out is target and missing == ["nope"] and torch.equal(target["model"]["w"], state["model"]["w"])
    one = state["model"]["w"].numel() * 4
    assert one <= reader.last_read_stats.bytes_read < one + 4096 and reader.last_read_stats.storages == 1
    reader.read(path)
    assert reader.last_read_stats.bytes_read >= 3 * one


def test_a_partial_read_checks_what_it_reads_and_never_reads_the_rest(tmp_path):
    n = 20_000  # 80 KB: tensors this large get records of their own (smaller ones share a run's)
    state = {"a": torch.full((n,), 1.0), "b": torch.full((n,), 2.0)}
    path = write_ours(tmp_path / "a.ckpt", state)
    _flip_tensor_byte(path, state["b"])
    out, _ = lc.CheckpointReader().read(path, {"a": torch.zeros(n)})
    assert torch.equal(out["a"], state["a"])
    with pytest.raises(lc.CorruptCheckpointError, match="checksum mismatch") as info:
        lc.CheckpointReader().read(path, {"b": torch.zeros(n)})
    assert info.value.key == "b" and info.value.path == path


def _many_small() -> dict:
    return {"state": {i: {"exp_avg": torch.full((11,), float(i))} for i in range(300)}}


def test_a_flipped_byte_in_one_of_many_small_tensors_names_its_key(tmp_path):
    state = _many_small()
    path = write_per_tensor(tmp_path / "a.ckpt", state)
    _flip_tensor_byte(path, state["state"][123]["exp_avg"])
    with pytest.raises(lc.CorruptCheckpointError, match="tensor 'state.123.exp_avg' checksum mismatch") as info:
        lc.CheckpointReader().read(path)
    assert info.value.key == "state.123.exp_avg" and info.value.path == path


@pytest.mark.parametrize("verify_path", ["engine", "mmap"])
def test_a_flipped_byte_in_a_run_of_small_tensors_names_the_run_and_its_first_tensors(tmp_path, verify_path):
    state = _many_small()
    path = write_ours(tmp_path / "a.ckpt", state)
    _flip_tensor_byte(path, state["state"][123]["exp_avg"])
    reader = lc.CheckpointReader()
    expected = (r"one of the 300 tensors in record data/0 \('state.0.exp_avg', 'state.1.exp_avg', 'state.2.exp_avg', "
                r"\.\.\.\) checksum mismatch")
    with pytest.raises(lc.CorruptCheckpointError, match=expected) as info:
        if verify_path == "engine":
            reader.read(path)
        else:  # the loaded tensors checked after torch.load (a map_location the engine does not take)
            reader.read(path, map_location=lambda storage, _: storage)
    assert info.value.key == "data/0" and info.value.path == path


def test_the_parallel_load_keeps_shared_storages_parameters_and_layouts(tmp_path):
    base = torch.arange(24, dtype=torch.float64)
    weight = torch.nn.Parameter(torch.randn(3, 4))
    state = {"base": base, "view": base[4:10], "strided": base.view(4, 6).t(), "tied": [weight, weight],
             "half": torch.ones(5, dtype=torch.bfloat16), "flags": torch.tensor([True, False]),
             "empty": torch.empty(0, 3), "grad": torch.ones(2, requires_grad=True), "tuple": (torch.zeros(2), 1)}
    path = write_ours(tmp_path / "a.ckpt", state)
    reader = lc.CheckpointReader()
    loaded, _ = reader.read(path)
    assert reader.last_read_stats is not None  # not torch.load's path
    assert_equal_state(loaded, state)
    assert loaded["view"].untyped_storage().data_ptr() == loaded["base"].untyped_storage().data_ptr()
    assert loaded["strided"].stride() == state["strided"].stride()
    assert isinstance(loaded["tied"][0], torch.nn.Parameter) and loaded["tied"][0] is loaded["tied"][1]
    assert loaded["grad"].requires_grad and not loaded["base"].requires_grad


def test_a_plain_torch_save_file_loads_through_the_engine(tmp_path):
    path = str(tmp_path / "plain.pt")
    torch.save(_state(4.0), path)
    reader = lc.CheckpointReader()
    loaded, _ = reader.read(path)
    assert reader.last_read_stats is not None and reader.last_read_stats.storages == 2
    assert_equal_state(loaded, _state(4.0))


def test_weights_only_refusals_stay_torchs_and_weights_only_false_loads_objects(tmp_path):
    from tests.unit._crafted import write_code_checkpoint

    marker = str(tmp_path / "ran")
    path = write_code_checkpoint(str(tmp_path / "evil.ckpt"), marker)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        lc.CheckpointReader().read(path)
    assert not os.path.exists(marker)
    ours = write_ours(tmp_path / "obj.ckpt", {"t": torch.ones(3), "od": collections.OrderedDict(a=1),
                                              "frac": fractions.Fraction(1, 3)})
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        lc.CheckpointReader().read(ours)
    reader = lc.CheckpointReader()
    loaded, _ = reader.read(ours, weights_only=False)
    assert loaded["frac"] == fractions.Fraction(1, 3) and reader.last_read_stats is not None


def test_the_parallel_load_reads_the_file_it_opened_when_the_path_is_replaced(tmp_path, monkeypatch):
    from lightning_ckpt import storage_load

    path, newer = str(tmp_path / "a.ckpt"), str(tmp_path / "newer.ckpt")
    write_ours(path, _state(1.0))
    write_ours(newer, _state(2.0))
    real = storage_load.StorageReader

    def replace_then_read(*args, **kwargs):
        os.replace(newer, path)  # the overwrite lands after the file was opened, before its storages are read
        return real(*args, **kwargs)

    monkeypatch.setattr(storage_load, "StorageReader", replace_then_read)
    reader = lc.CheckpointReader()
    assert_equal_state(reader.read(path)[0], _state(1.0))
    assert reader.last_read_stats is not None and not os.path.exists(newer)


def test_a_partial_read_reads_into_matching_target_tensors_in_place(tmp_path):
    state = {"w": torch.arange(4096, dtype=torch.float32), "m": torch.full((8, 16), 3.0), "other": torch.ones(10)}
    path = write_ours(tmp_path / "a.ckpt", state)
    w, m = torch.zeros(4096), torch.zeros(8, 16)
    address = w.data_ptr()
    out, _ = lc.CheckpointReader().read(path, {"w": w, "m": m})
    assert out["w"] is w and w.data_ptr() == address and torch.equal(w, state["w"])
    assert out["m"] is m and torch.equal(m, state["m"])


def test_a_partial_read_into_a_target_of_another_shape_raises_and_writes_no_target(tmp_path):
    """As torch's reader: a target tensor that cannot be filled in place is an error naming the key and both
    sizes, never a silent replacement that leaves the caller's tensor as it was."""
    state = {"w": torch.arange(4096, dtype=torch.float32), "m": torch.full((8, 16), 3.0)}
    path = write_ours(tmp_path / "a.ckpt", state)
    w, reshaped = torch.zeros(4096), torch.zeros(16, 8)  # same bytes as "m", other shape
    with pytest.raises(RuntimeError, match=r"size=torch.Size\(\[16, 8\]\).*size=torch.Size\(\[8, 16\]\).*key m"):
        lc.CheckpointReader().read(path, {"w": w, "m": reshaped})
    assert torch.count_nonzero(w) == 0 and torch.count_nonzero(reshaped) == 0
