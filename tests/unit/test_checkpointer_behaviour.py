"""One behaviour suite for both checkpointers: round trips, snapshots, partial reads, atomic commit, errors."""

from __future__ import annotations

import os
import pickle
import threading

import pytest
import torch

import lightning_ckpt as lc
from lightning_ckpt.staging import CheckpointStagerConfig
from lightning_ckpt.commit import is_temp_name
from tests._helpers import (FailingHook, GateHook, assert_equal_state, data_file, file_layout_config, nested_state_dict,
                           wait_for)


def _make(kind: str, **kw):
    if kind == "sync":
        return lc.make_sync_checkpointer(kw.pop("config", None), commit_hook=kw.pop("commit_hook", None))
    return lc.make_async_checkpointer(kw.pop("config", None), commit_hook=kw.pop("commit_hook", None))


def _save(ck, path, sd):
    """Save and wait until committed; returns SaveStats."""
    out = ck.save(path, sd)
    if isinstance(out, tuple):
        assert out[1].result(timeout=60) is None  # PyTorch's contract: the futures resolve to None
        return out[1].stats
    assert out is None
    return ck.last_save_stats


@pytest.fixture(params=["sync", "async"])
def kind(request):
    return request.param


@pytest.mark.parametrize("layout", ["dir", "file"])
def test_round_trip_nested_state(kind, tmp_path, layout):
    sd = nested_state_dict()
    with _make(kind, config=file_layout_config() if layout == "file" else None) as ck:
        stats = _save(ck, tmp_path / "a.ckpt", sd)
        loaded = ck.load(tmp_path / "a.ckpt")
    assert (tmp_path / "a.ckpt").is_dir() == (layout == "dir")  # dir: torch's <path>/checkpoint_0.pt + manifest
    assert stats.nbytes == os.path.getsize(data_file(tmp_path / "a.ckpt"))
    assert_equal_state(loaded, sd)
    # The file is an ordinary torch.save zip: plain torch.load with weights_only reads it.
    assert_equal_state(torch.load(data_file(tmp_path / "a.ckpt"), weights_only=True), sd)


def test_mutating_after_save_does_not_change_what_is_written(kind, tmp_path):
    sd = nested_state_dict()
    snapshot = pickle.loads(pickle.dumps(sd))
    with _make(kind) as ck:
        out = ck.save(tmp_path / "a.ckpt", sd)
        if isinstance(out, tuple):
            out[0].result(timeout=60)  # the contract: wait for staging before in-place mutation
        sd["state_dict"]["w"].add_(1.0)
        sd["optimizer_states"][0]["state"][0]["exp_avg"].zero_()
        sd["global_step"] = 99
        sd["tags"].append("late")
        ck.wait()
        loaded = ck.load(tmp_path / "a.ckpt")
    assert_equal_state(loaded, snapshot)


def test_non_tensor_values_are_captured_when_save_is_called(tmp_path):
    sd = nested_state_dict()
    with lc.make_async_checkpointer() as ck:
        stage_f, write_f = ck.save(tmp_path / "a.ckpt", sd)
        sd["tags"].append("late")  # no wait: non-tensor leaves are pickled inside save()
        write_f.result(timeout=60)
        assert ck.load(tmp_path / "a.ckpt")["tags"] == ["a", "b"]


def test_second_async_save_of_same_shapes_allocates_no_staging_memory(tmp_path):
    sd = nested_state_dict()
    with lc.make_async_checkpointer() as ck:
        _save(ck, tmp_path / "a.ckpt", sd)
        first = (ck.stager.allocations, ck.stager.buffer_bytes)
        for i in range(3):
            sd["state_dict"]["w"].add_(1.0)
            _save(ck, tmp_path / f"b{i}.ckpt", sd)
        assert (ck.stager.allocations, ck.stager.buffer_bytes) == first == (1, first[1])
        assert_equal_state(ck.load(tmp_path / "b2.ckpt"), sd)


def test_larger_state_replaces_the_staging_buffer_instead_of_adding_one(tmp_path):
    with lc.make_async_checkpointer() as ck:
        _save(ck, tmp_path / "a.ckpt", {"w": torch.ones(10)})
        _save(ck, tmp_path / "b.ckpt", {"w": torch.ones(100_000)})
        assert ck.stager.allocations == 2
        assert len(ck.stager._pool.buffers) == 1  # the small buffer was freed, not kept beside the big one


def test_partial_read_loads_only_requested_keys(kind, tmp_path):
    sd = nested_state_dict()
    with _make(kind) as ck:
        _save(ck, tmp_path / "a.ckpt", sd)
        target = {"state_dict": {"w": torch.zeros(16, 32), "bf16": None}, "global_step": 0, "absent": 1}
        w_before = target["state_dict"]["w"]
        loaded = ck.load(tmp_path / "a.ckpt", target)
        assert loaded["state_dict"]["w"] is w_before  # filled in place
        assert torch.equal(w_before, sd["state_dict"]["w"])
        assert torch.equal(loaded["state_dict"]["bf16"], sd["state_dict"]["bf16"])
        assert loaded["global_step"] == 17 and set(loaded) == {"state_dict", "global_step", "absent"}
        _, missing = ck.reader.read(tmp_path / "a.ckpt", {"absent": 1, "state_dict": {"nope": None}})
        assert missing == ["absent", "state_dict.nope"]
        with pytest.raises(lc.CheckpointError, match="absent"):
            ck.load(tmp_path / "a.ckpt", {"absent": 1}, strict=True)


def test_nothing_at_final_path_until_commit(kind, tmp_path):
    gate = GateHook(str(tmp_path / "entered"), str(tmp_path / "release"))
    final = tmp_path / "ckpt" / "a.ckpt"
    with _make(kind, commit_hook=gate) as ck:
        errors = []
        worker = threading.Thread(target=lambda: _run_and_record(errors, lambda: _save(ck, final, {"w": torch.ones(3)})))
        worker.start()
        wait_for(lambda: os.path.exists(tmp_path / "entered"), what="the writer to reach pre_commit")
        assert not final.exists()
        temps = [n for n in os.listdir(final.parent) if is_temp_name(n)]
        assert len(temps) == 1, temps  # the complete data sits under a temp name
        open(tmp_path / "release", "w").close()
        worker.join(timeout=60)
        assert not errors and final.exists()
        assert [n for n in os.listdir(final.parent)] == ["a.ckpt"]


def _run_and_record(errors, fn):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        errors.append(e)


def test_failed_write_leaves_previous_checkpoint_and_no_temp(kind, tmp_path):
    with _make(kind, commit_hook=FailingHook("bad")) as ck:
        _save(ck, tmp_path / "good.ckpt", {"w": torch.ones(3)})
        with pytest.raises((OSError, lc.CheckpointWriteError), match="injected failure"):
            _save(ck, tmp_path / "bad.ckpt", {"w": torch.zeros(3)})
        if kind == "async":
            ck.check_for_errors()  # seen through the future already: not raised twice
    assert sorted(os.listdir(tmp_path)) == ["good.ckpt"]
    assert torch.equal(torch.load(data_file(tmp_path / "good.ckpt"))["w"], torch.ones(3))


def test_async_error_is_raised_once_at_next_save_then_cleared(tmp_path):
    ck = lc.make_async_checkpointer(commit_hook=FailingHook("bad"))
    try:
        _, write_f = ck.save(tmp_path / "bad.ckpt", {"w": torch.ones(3)})
        wait_for(write_f.done, what="the failing write")
        with pytest.raises(lc.CheckpointWriteError, match="Traceback") as info:
            ck.save(tmp_path / "good.ckpt", {"w": torch.ones(3)})
        assert "injected failure" in str(info.value)
        _, write_f = ck.save(tmp_path / "good.ckpt", {"w": torch.ones(3)})  # cleared: this one works
        write_f.result(timeout=60)
        assert write_f.stats.path == ck.last_save_stats.path == str(tmp_path / "good.ckpt")
        ck.wait()
    finally:
        ck.close()


def test_async_error_pending_at_close_is_raised_by_close_once(tmp_path):
    ck = lc.make_async_checkpointer(commit_hook=FailingHook("bad"))
    ck.save(tmp_path / "bad.ckpt", {"w": torch.ones(3)})
    with pytest.raises(lc.CheckpointWriteError, match="injected failure"):
        ck.close()
    ck.close()  # idempotent, and the error is not raised again
    with pytest.raises(lc.CheckpointError, match="closed"):
        ck.save(tmp_path / "x.ckpt", {"w": torch.ones(3)})


def test_load_missing_path_raises_file_not_found(kind, tmp_path):
    with _make(kind) as ck, pytest.raises(FileNotFoundError, match="nope.ckpt"):
        ck.load(tmp_path / "nope.ckpt")


def test_truncated_file_raises_corrupt_naming_path(kind, tmp_path):
    path = tmp_path / "a.ckpt"
    with _make(kind) as ck:
        _save(ck, path, nested_state_dict())
        data = data_file(path).read_bytes()
        data_file(path).write_bytes(data[: len(data) // 2])
        with pytest.raises(lc.CorruptCheckpointError, match="a.ckpt"):
            ck.load(path)


def test_flipped_byte_in_tensor_data_is_detected_with_key_and_checksums(kind, tmp_path):
    path = tmp_path / "a.ckpt"
    w = torch.arange(4096, dtype=torch.float32)
    with _make(kind) as ck:
        _save(ck, path, {"model": {"w": w}, "step": 1})
        data = bytearray(data_file(path).read_bytes())
        pos = bytes(data).find(w[1000:1004].numpy().tobytes())
        assert pos > 0
        data[pos] ^= 0x01
        data_file(path).write_bytes(bytes(data))
        with pytest.raises(lc.CorruptCheckpointError) as info:
            ck.load(path)
        assert info.value.key == "model.w" and info.value.expected != info.value.actual
        assert str(data_file(path)) in str(info.value) and info.value.expected in str(info.value)
        ck.load(path, verify=False)  # the opt-out loads the damaged bytes as they are


def test_unpicklable_value_is_refused_at_the_call_with_its_key(kind, tmp_path):
    with _make(kind) as ck, pytest.raises(TypeError, match="hook"):
        ck.save(tmp_path / "a.ckpt", {"w": torch.ones(2), "hook": threading.Lock()})
    assert os.listdir(tmp_path) == []


def test_odd_tensors_round_trip(kind, tmp_path):
    sd = {
        "meta": torch.empty(3, 4, device="meta"),
        "sparse": torch.eye(3).to_sparse(),
        "expanded": torch.ones(1, 4).expand(3, 4),
        "scalar_int": torch.tensor(7),
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    with _make(kind) as ck:
        _save(ck, tmp_path / "odd ü.ckpt", sd)
        loaded = ck.load(tmp_path / "odd ü.ckpt")
    assert loaded["meta"].is_meta and loaded["meta"].shape == (3, 4)
    assert torch.equal(loaded["sparse"].to_dense(), torch.eye(3))
    assert torch.equal(loaded["expanded"], torch.ones(3, 4)) and torch.equal(loaded["param"], torch.ones(2))
    assert loaded["scalar_int"].item() == 7


def test_empty_state_dict_round_trips(kind, tmp_path):
    with _make(kind) as ck:
        _save(ck, tmp_path / "e.ckpt", {})
        assert ck.load(tmp_path / "e.ckpt") == {}


def test_checkpointers_are_picklable_before_first_use():
    for ck in (lc.make_sync_checkpointer(), lc.make_async_checkpointer()):
        clone = pickle.loads(pickle.dumps(ck))
        clone.close()
        ck.close()


def test_sync_staging_returns_a_done_stage_future(tmp_path):
    config = lc.CheckpointerConfig(staging_config=CheckpointStagerConfig(use_async_staging=False))
    with lc.make_async_checkpointer(config) as ck:
        stage_f, write_f = ck.save(tmp_path / "a.ckpt", {"w": torch.ones(3)})
        assert stage_f.done()
        write_f.result(timeout=60)


def test_over_budget_state_falls_back_to_a_synchronous_write(tmp_path):
    config = lc.CheckpointerConfig(staging_config=CheckpointStagerConfig(budget_bytes=1024))
    with lc.make_async_checkpointer(config) as ck:
        stage_f, write_f = ck.save(tmp_path / "a.ckpt", {"w": torch.ones(4096)})
        assert stage_f.done() and write_f.done() and write_f.result() is None and write_f.stats.fallback
        assert ck.stager.allocations == 0  # never allocated past the budget
        assert torch.equal(ck.load(tmp_path / "a.ckpt")["w"], torch.ones(4096))


def test_load_waits_for_a_pending_write_of_the_same_path(tmp_path):
    gate = GateHook(str(tmp_path / "entered"), str(tmp_path / "release"))
    with lc.make_async_checkpointer(commit_hook=gate) as ck:
        ck.save(tmp_path / "a.ckpt", {"w": torch.ones(3)})
        wait_for(lambda: os.path.exists(tmp_path / "entered"), what="pre_commit")
        assert ck.pending_paths() == [str(tmp_path / "a.ckpt")]
        timer = threading.Timer(0.2, lambda: open(tmp_path / "release", "w").close())
        timer.start()
        assert torch.equal(ck.load(tmp_path / "a.ckpt")["w"], torch.ones(3))
        timer.join()
        assert ck.pending_paths() == []


def test_wrap_future():
    from concurrent.futures import Future

    assert lc.wrap_future(5).result(timeout=1) is None
    inner = Future()
    wrapped = lc.wrap_future(inner)
    assert not wrapped.done()
    inner.set_result(42)
    assert wrapped.result(timeout=1) is None
    failing = Future()
    wrapped = lc.wrap_future(failing)
    failing.set_exception(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        wrapped.result(timeout=1)


def test_unchanged_state_with_same_token_shares_the_staged_copy(tmp_path):
    sd = nested_state_dict()
    with lc.make_async_checkpointer() as ck:
        stage_a, write_a = ck.save(tmp_path / "a.ckpt", sd, snapshot_token=17)
        sd["global_step"] = 18  # non-tensor leaves may differ: they are pickled per save
        stage_b, write_b = ck.save(tmp_path / "last.ckpt", sd, snapshot_token=17)  # no wait for a's write
        write_a.result(timeout=60), write_b.result(timeout=60)
        assert (ck.stager.allocations, ck.stager.shared_saves) == (1, 1)
        assert ck.load(tmp_path / "last.ckpt")["global_step"] == 18
        assert_equal_state(ck.load(tmp_path / "a.ckpt")["state_dict"], sd["state_dict"])
        # An in-place change bumps the version counter: the same token no longer shares a stale copy.
        sd["state_dict"]["w"].add_(1.0)
        ck.save(tmp_path / "c.ckpt", sd, snapshot_token=17)[1].result(timeout=60)
        assert ck.stager.shared_saves == 1
        assert torch.equal(ck.load(tmp_path / "c.ckpt")["state_dict"]["w"], sd["state_dict"]["w"])


def test_one_buffer_by_default_so_a_second_save_waits_for_the_first(tmp_path):
    gate = GateHook(str(tmp_path / "entered"), str(tmp_path / "release"))
    with lc.make_async_checkpointer(commit_hook=gate) as ck:
        ck.save(tmp_path / "a.ckpt", {"w": torch.ones(8)})
        wait_for(lambda: os.path.exists(tmp_path / "entered"), what="pre_commit")
        second = {}
        worker = threading.Thread(target=lambda: second.update(out=ck.save(tmp_path / "b.ckpt", {"w": torch.ones(8)})))
        worker.start()
        worker.join(timeout=0.3)
        assert worker.is_alive()  # blocked: the only staging buffer is still being written
        assert ck.stager.buffer_bytes == ck.stager._pool.buffers[0].nbytes and len(ck.stager._pool.buffers) == 1
        (tmp_path / "release").touch()
        worker.join(timeout=60)
        second["out"][1].result(timeout=60)


def test_overwriting_a_checkpoint_replaces_it_atomically_and_frees_the_old_file(kind, tmp_path):
    path = tmp_path / "last.ckpt"
    with _make(kind) as ck:
        _save(ck, path, {"w": torch.zeros(1000)})
        inode = os.stat(path).st_ino
        _save(ck, path, {"w": torch.ones(1000)})
        assert os.stat(path).st_ino != inode  # a new file was renamed over the old one
        ck.wait()
        assert torch.equal(ck.load(path)["w"], torch.ones(1000))
        if kind == "async":
            # the hard link that kept the old blocks is removed right after the commit is reported
            wait_for(lambda: os.listdir(tmp_path) == ["last.ckpt"], what="the replaced file to be freed")
    assert os.listdir(tmp_path) == ["last.ckpt"]
