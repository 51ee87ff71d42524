"""What a load returns is what ``torch.load`` (and torch's ``_experimental`` reader) would return, for every path a
load can take: the parallel CPU load, ``torch.load`` over a mapping, partial reads, and the files only torch reads."""

from __future__ import annotations

import os
import pickle
import threading
import zipfile
from concurrent.futures import Future

import pytest
import torch

import lightning_ckpt as lc
from lightning_ckpt import read_engine
from lightning_ckpt.integrity import check_checkpoint
from lightning_ckpt.read_engine import Check, StorageReader
from lightning_ckpt.verification import OpenedFile, copy_out_of_mapping, read_checksum_record
from tests._helpers import assert_equal_state
from tests.unit._crafted import write_code_checkpoint, write_ours, write_per_tensor


def _write_dir(path, state) -> str:
    """Our default layout: ``<path>/checkpoint_0.pt`` and a manifest."""
    lc.CheckpointWriter(lc.CheckpointWriterConfig(enable_fsync=False), rank_info=lc.RankInfo(0, 1)).write(str(path),
                                                                                                        state)
    return str(path)


def _flip_every_storage(path: str) -> None:
    with OpenedFile(path) as opened:
        spans = opened.spans()
    with open(path, "r+b") as f:
        for name, (offset, size) in spans.items():
            if name.startswith("data/") and size:
                f.seek(offset + size // 2)
                byte = f.read(1)
                f.seek(offset + size // 2)
                f.write(bytes([byte[0] ^ 0x55]))


def _mixed_sizes() -> dict:
    """Small tensors (packed into a shared record, written first) around a large one."""
    return {"s1": torch.arange(10.0), "big": torch.arange(1 << 18, dtype=torch.float32), "s2": torch.arange(7) + 1000,
            "nested": {"x": [torch.ones(2), 3], "bf": torch.arange(5.0).bfloat16()}}


# ---------------------------------------------------------------- 1: torch's own readers read our files


@pytest.mark.filterwarnings("ignore:The given buffer is not writable")  # torch's reader's own frombuffer
def test_torch_reads_our_files_with_meta_map_location_and_computed_storage_offsets(tmp_path):
    from torch.distributed.checkpoint._experimental.checkpoint_reader import CheckpointReader as TorchReader
    from torch.distributed.checkpoint._experimental.types import RankInfo as TorchRankInfo
    from torch.utils.serialization import config

    state = _mixed_sizes()
    path = _write_dir(tmp_path / "ckpt", state)
    rank_file = os.path.join(path, "checkpoint_0.pt")
    meta = torch.load(rank_file, map_location="meta")
    assert meta["big"].device.type == "meta" and meta["big"].shape == state["big"].shape
    with config.patch({"load.calculate_storage_offsets": True}):
        assert_equal_state(torch.load(rank_file, mmap=True), state)
        assert_equal_state(lc.CheckpointReader().read(path, map_location=lambda s, _: s)[0], state)
    target = {"s1": torch.zeros(10), "big": torch.zeros(1 << 18), "s2": torch.zeros(7, dtype=torch.int64)}
    got, missing = TorchReader(TorchRankInfo(global_rank=0, global_world_size=1)).read(path, target)
    assert missing == []
    for key in target:
        assert torch.equal(got[key], state[key]), key


# ---------------------------------------------------------------- 2, 6, 14: files only torch.load reads, and junk


def _deflated(tmp_path, state) -> str:
    src, path = str(tmp_path / "src.pt"), str(tmp_path / "deflated.pt")
    torch.save(state, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            method = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
            zout.writestr(info.filename, zin.read(info.filename), compress_type=method)
    return path


@pytest.mark.parametrize("verify", [True, False])
def test_a_zip_with_deflated_records_loads_through_torch_load(tmp_path, verify):
    state = {"zeros": torch.zeros(1 << 12), "ramp": torch.arange(1 << 12, dtype=torch.int32)}
    path = _deflated(tmp_path, state)
    reader = lc.CheckpointReader(verify=verify)
    loaded, _ = reader.read(path)
    assert_equal_state(loaded, state)
    assert reader.last_read_stats is None  # not the parallel load of stored bytes
    partial, _ = reader.read(path, {"ramp": torch.zeros(1 << 12, dtype=torch.int32)})
    assert torch.equal(partial["ramp"], state["ramp"])
    assert check_checkpoint(path).status == "unverified"


def test_a_legacy_torch_save_file_loads_unverified_and_junk_stays_corrupt(tmp_path):
    state = {"w": torch.arange(300.0), "step": 3}
    path = str(tmp_path / "legacy.pt")
    torch.save(state, path, _use_new_zipfile_serialization=False)
    for verify in (True, False):
        assert_equal_state(lc.CheckpointReader(verify=verify).read(path)[0], state)
    target = {"w": torch.zeros(300)}
    lc.CheckpointReader().read(path, target)
    assert torch.equal(target["w"], state["w"])
    assert check_checkpoint(path).status == "unverified"
    torn = str(tmp_path / "torn.pt")
    with open(path, "rb") as f, open(torn, "wb") as out:
        out.write(f.read()[:os.path.getsize(path) // 2])
    junk = str(tmp_path / "junk.pt")
    with open(junk, "wb") as f:
        f.write(b"not a checkpoint" * 64)
    for bad in (torn, junk):
        with pytest.raises(lc.CorruptCheckpointError) as info:
            lc.CheckpointReader().read(bad)
        assert info.value.path == bad
    assert check_checkpoint(junk).status == "corrupt"


@pytest.mark.parametrize("verify", [True, False])
def test_an_empty_file_is_corrupt_with_a_reason(tmp_path, verify):
    path = str(tmp_path / "empty.ckpt")
    open(path, "wb").close()
    with pytest.raises(lc.CorruptCheckpointError, match=r"empty file \(0 bytes\)") as info:
        lc.CheckpointReader(verify=verify).read(path)
    assert info.value.path == path


# ---------------------------------------------------------------- 3: torch.load's weights_only overrides


@pytest.mark.parametrize("value", ["1", "y", "YES", "true"])
def test_force_weights_only_env_overrides_an_explicit_weights_only_false(tmp_path, monkeypatch, value):
    marker = str(tmp_path / "ran")
    path = write_code_checkpoint(str(tmp_path / "code.ckpt"), marker)
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", value)
    with pytest.raises(pickle.UnpicklingError):
        lc.CheckpointReader().read(path, weights_only=False)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("value", ["0", "false", ""])
def test_force_weights_only_env_not_truthy_leaves_weights_only_false(tmp_path, monkeypatch, value):
    marker = str(tmp_path / "ran")
    path = write_code_checkpoint(str(tmp_path / "code.ckpt"), marker)
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", value)
    loaded, _ = lc.CheckpointReader().read(path, weights_only=False)
    assert loaded["epoch"] == 1 and os.path.isdir(marker)


def test_both_weights_only_overrides_set_is_refused_as_torch_refuses(tmp_path, monkeypatch):
    path = write_ours(tmp_path / "a.ckpt", {"w": torch.ones(2)})
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(RuntimeError, match="Only one of"):
        lc.CheckpointReader().read(path)


# ---------------------------------------------------------------- 4: lazily conjugated or negated targets


@pytest.mark.parametrize("make", [lambda: torch.zeros(4096, dtype=torch.complex64).conj(),
                                  lambda: torch._neg_view(torch.zeros(4096, dtype=torch.complex64))],
                         ids=["conj", "neg"])
def test_a_partial_read_into_a_conjugate_or_negative_view_gets_the_saved_values(tmp_path, make):
    saved = torch.complex(torch.arange(4096.0), torch.ones(4096))
    path = write_ours(tmp_path / "a.ckpt", {"c": saved})
    target = make()
    assert target.is_conj() or target.is_neg()
    out, _ = lc.CheckpointReader().read(path, {"c": target})
    assert out["c"] is target and torch.equal(target, saved)


# ---------------------------------------------------------------- 5: every requested tensor is verified


@pytest.mark.parametrize("map_location", [None, {"cpu": "cpu"}, lambda storage, _: storage])
def test_a_partial_read_verifies_tensors_under_keys_that_are_neither_str_nor_int(tmp_path, map_location):
    state = {"layer": {(0, 1): torch.arange(20_000.0), 1.5: torch.arange(20_000.0) + 1}}
    path = write_ours(tmp_path / "a.ckpt", state)
    good, _ = lc.CheckpointReader().read(path, {"layer": {(0, 1): None, 1.5: None}}, map_location=map_location)
    assert_equal_state(good, state)
    _flip_every_storage(path)
    with pytest.raises(lc.CorruptCheckpointError, match="checksum mismatch"):
        lc.CheckpointReader().read(path, {"layer": {(0, 1): None, 1.5: None}}, map_location=map_location)


# ---------------------------------------------------------------- 7: map_location="meta"


@pytest.mark.parametrize("meta", ["meta", torch.device("meta")], ids=["str", "device"])
def test_meta_map_location_returns_meta_tensors_verified_from_the_file(tmp_path, meta):
    state = {"w": torch.randn(10, 10), "n": {"b": torch.arange(4)}, "step": 1}
    path = write_ours(tmp_path / "a.ckpt", state)
    loaded, _ = lc.CheckpointReader().read(path, map_location=meta)
    assert loaded["w"].device.type == "meta" and loaded["w"].shape == (10, 10) and loaded["step"] == 1
    assert loaded["n"]["b"].device.type == "meta" and loaded["n"]["b"].dtype == torch.int64
    _flip_every_storage(path)
    with pytest.raises(lc.CorruptCheckpointError, match="checksum mismatch"):
        lc.CheckpointReader().read(path, map_location=meta)


# ---------------------------------------------------------------- 8, 9: tensors come back as torch.load builds them


def test_a_partial_read_of_a_plain_torch_save_file_keeps_parameters_as_leaves(tmp_path):
    path = str(tmp_path / "plain.pt")
    torch.save({"p": torch.nn.Parameter(torch.ones(3)), "q": torch.zeros(2)}, path)
    out, _ = lc.CheckpointReader().read(path, {"p": None})
    p = out["p"]
    assert isinstance(p, torch.nn.Parameter) and p.is_leaf and p.grad_fn is None and p.requires_grad
    torch.optim.SGD([p], lr=0.1)  # an optimizer takes it


def test_a_partial_read_through_torch_load_keeps_tied_tensors_tied(tmp_path):
    path = str(tmp_path / "plain.pt")
    weight = torch.nn.Parameter(torch.arange(6.0))
    torch.save({"a": weight, "b": weight, "c": torch.zeros(2)}, path)
    out, _ = lc.CheckpointReader().read(path, {"a": None, "b": None})
    assert out["a"].data_ptr() == out["b"].data_ptr() and torch.equal(out["a"], weight)
    assert isinstance(out["b"], torch.nn.Parameter)


def test_copy_out_of_mapping_keeps_requires_grad_and_python_attributes(tmp_path):
    t, a = torch.ones(3).requires_grad_(), torch.ones(2)
    a.note = "hello"
    path = str(tmp_path / "plain.pt")
    torch.save({"t": t, "a": a, "p": torch.nn.Parameter(torch.ones(2))}, path)
    mapped = torch.load(path, weights_only=False, mmap=True)
    copied = copy_out_of_mapping(mapped)
    assert copied["t"].requires_grad and copied["t"].is_leaf
    assert copied["a"].note == "hello" and not copied["a"].requires_grad
    assert isinstance(copied["p"], torch.nn.Parameter)
    for key in mapped:
        assert copied[key].data_ptr() != mapped[key].data_ptr() and torch.equal(copied[key], mapped[key])


# ---------------------------------------------------------------- 10: a partial read honours any map_location


def _to_meta(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
    return torch.UntypedStorage(storage.nbytes(), device="meta")


@pytest.mark.parametrize("map_location", [{"cpu": "meta"}, "meta", _to_meta], ids=["dict", "str", "callable"])
def test_a_partial_read_applies_map_location_as_torch_load_does(tmp_path, map_location):
    path = _write_dir(tmp_path / "ckpt", {"w": torch.ones(3), "b": torch.zeros(2)})
    full = torch.load(os.path.join(path, "checkpoint_0.pt"), map_location=map_location)
    out, _ = lc.CheckpointReader().read(path, {"w": None}, map_location=map_location)
    assert full["w"].device.type == "meta" and out["w"].device == full["w"].device and out["w"].shape == (3,)


def test_a_partial_read_with_an_identity_map_location_copies_out_of_the_file(tmp_path):
    path = write_ours(tmp_path / "a.ckpt", {"w": torch.arange(5.0), "b": torch.zeros(2)})
    out, _ = lc.CheckpointReader().read(path, {"w": None}, map_location=lambda storage, _: storage)
    assert torch.equal(out["w"], torch.arange(5.0))
    out["w"].add_(1)  # memory of its own, writable (a MAP_PRIVATE mapping would be too, but not pin the file)
    assert torch.equal(lc.CheckpointReader().read(path)[0]["w"], torch.arange(5.0))


# ---------------------------------------------------------------- 11: an interrupted load stops its reads


def test_keyboard_interrupt_while_waiting_cancels_the_queued_reads(tmp_path, monkeypatch):
    n = 32
    path = write_per_tensor(tmp_path / "a.ckpt", {f"t{i}": torch.full((8192,), float(i)) for i in range(n)})
    monkeypatch.setattr(read_engine, "BATCH_BYTES", 1024)  # every storage a read of its own
    real_preadv, release, reads = os.preadv, threading.Event(), []

    def preadv(*args):
        reads.append(1)
        release.wait(30)  # a slow disk, until the interrupt
        return real_preadv(*args)

    def interrupted(self, timeout=None):
        release.set()
        raise KeyboardInterrupt

    with OpenedFile(path) as opened:
        record = read_checksum_record(opened)
        spans = {n[len("data/"):]: s for n, s in opened.spans().items() if n.startswith("data/")}
        assert len(spans) == n
        checks = [Check(r.xxh3, [k]) for k, r in record.records.items()]
        monkeypatch.setattr(read_engine.os, "preadv", preadv)
        reader = StorageReader(opened.fd, path, spans, checks, threads=2, direct_io=False).start()
        monkeypatch.setattr(Future, "result", interrupted)
        with pytest.raises(KeyboardInterrupt):
            reader.finish(timeout_secs=60)
    assert len(reads) <= 4  # the reads in flight finished; the queued ones never started


# ---------------------------------------------------------------- 12: a FIFO is refused, never waited on


def test_a_fifo_in_place_of_a_checkpoint_file_is_refused_at_once(tmp_path):
    fifo = str(tmp_path / "pipe.ckpt")
    os.mkfifo(fifo)
    directory = tmp_path / "ckpt"
    directory.mkdir()
    os.mkfifo(directory / "checkpoint_0.pt")
    for path, named in ((fifo, fifo), (str(directory), str(directory / "checkpoint_0.pt"))):
        with pytest.raises(lc.CorruptCheckpointError, match="FIFO") as info:
            lc.CheckpointReader().read(path)
        assert named in str(info.value)
        result = check_checkpoint(path)
        assert not result.ok and result.status == "corrupt" and named in result.detail


# ---------------------------------------------------------------- 13: partial reads as torch's reader does them


def _writers():
    def plain(path, state):
        torch.save(state, str(path))
        return str(path)

    return pytest.mark.parametrize("write", [write_ours, plain], ids=["ours", "torch.save"])


@_writers()
def test_a_target_tensor_of_another_size_or_dtype_raises_naming_key_and_both(tmp_path, write):
    state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.arange(5), "step": 2}
    path = write(tmp_path / "a.ckpt", state)
    with pytest.raises(RuntimeError, match=r"size=torch.Size\(\[4, 3\]\).*size=torch.Size\(\[3, 4\]\).*key w"):
        lc.CheckpointReader().read(path, {"w": torch.zeros(4, 3)})
    with pytest.raises(RuntimeError, match=r"dtype=torch.int32.*dtype=torch.int64 for key b"):
        lc.CheckpointReader().read(path, {"b": torch.zeros(5, dtype=torch.int32)})
    with pytest.raises(RuntimeError, match="Target value step"):
        lc.CheckpointReader().read(path, {"step": torch.zeros(1)})


@_writers()
def test_lists_and_tuples_of_target_tensors_are_filled_in_place(tmp_path, write):
    state = {"lst": [torch.ones(3), torch.full((2,), 7.0), torch.arange(2.0)], "tup": (torch.ones(4), 5)}
    path = write(tmp_path / "a.ckpt", state)
    first, second, third = torch.zeros(3), torch.zeros(2), torch.zeros(4)
    lst = [first, second]  # shorter than the file's: the rest comes from the file, as torch's reader does
    target = {"lst": lst, "tup": (third, None)}
    out, missing = lc.CheckpointReader().read(path, target)
    assert missing == [] and out["lst"] is lst and lst[0] is first and lst[1] is second
    assert torch.equal(first, state["lst"][0]) and torch.equal(second, state["lst"][1])
    assert torch.equal(lst[2], state["lst"][2])
    assert isinstance(out["tup"], tuple) and out["tup"][0] is third and out["tup"][1] == 5
    assert torch.equal(third, state["tup"][0])
