"""A full disk, a refused write and a slow disk: clear errors, nothing torn, the backlog and memory stay bounded."""

from __future__ import annotations

import os
import time

import pytest
import torch

import lightning_ckpt as lc
from tests.faults._faults import (
    FileSizeLimitHook, SlowHook, assert_invariant, immutable_dir, small_tmpfs, tmp_leftovers,
)

pytestmark = pytest.mark.faults

SMALL = {"w": torch.arange(64.0), "step": 1}
BIG = {"w": torch.randn(512, 1024), "step": 2}  # 2 MiB: more than the full disk takes


def _make(kind, **kw):
    return lc.make_sync_checkpointer(**kw) if kind == "sync" else lc.make_async_checkpointer(**kw)


def _save(ck, path, state):
    """Save and wait until committed; returns its SaveStats."""
    out = ck.save(path, state)
    if isinstance(out, tuple):
        out[1].result(timeout=60)
    return ck.last_save_stats


def _assert_refused_then_recovers(kind, ck, directory, error, reason):
    """The big save fails with ``error`` matching ``reason``; nothing is left; the next small save works."""
    _save(ck, os.path.join(directory, "prev.ckpt"), SMALL) if not os.path.exists(
        os.path.join(directory, "prev.ckpt")) else None
    with pytest.raises(error, match=reason) as info:
        _save(ck, os.path.join(directory, "big.ckpt"), BIG)
    if kind == "async":
        ck.check_for_errors()  # seen through the future: not raised again
    assert "big.ckpt" in str(info.value)
    assert sorted(os.listdir(directory)) == ["prev.ckpt"]  # no partial file, no temp
    _save(ck, os.path.join(directory, "after.ckpt"), {"w": torch.ones(3)})  # the writer survived the failure
    assert_invariant(directory, {"prev.ckpt": SMALL, "after.ckpt": {"w": torch.ones(3)}})
    assert tmp_leftovers(directory) == []
    return info.value


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_disk_full_on_a_small_tmpfs(kind, tmp_path):
    with small_tmpfs(str(tmp_path), "1m") as mount:
        if mount is None:
            pytest.skip("mounting a tmpfs is not permitted here (test_disk_full_by_file_size_limit covers it)")
        with _make(kind) as ck:
            _assert_refused_then_recovers(kind, ck, mount, (OSError, lc.CheckpointWriteError),
                                          "No space left on device")


def test_disk_full_by_file_size_limit_in_the_writer(tmp_path):
    """Where no tmpfs can be mounted: RLIMIT_FSIZE lowered inside the writer process makes big writes fail."""
    with lc.make_async_checkpointer(commit_hook=FileSizeLimitHook(256 << 10)) as ck:
        _assert_refused_then_recovers("async", ck, str(tmp_path), lc.CheckpointWriteError, "File too large")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_permission_denied_on_an_immutable_directory(kind, tmp_path):
    with _make(kind) as ck:
        _save(ck, tmp_path / "prev.ckpt", SMALL)
        with immutable_dir(str(tmp_path)) as ok:
            if not ok:
                pytest.skip("chattr +i is not available on this filesystem")
            with pytest.raises((PermissionError, lc.CheckpointWriteError), match="Operation not permitted") as info:
                _save(ck, tmp_path / "big.ckpt", BIG)
            assert "big.ckpt" in str(info.value)
            if kind == "async":
                ck.check_for_errors()
        assert sorted(os.listdir(tmp_path)) == ["prev.ckpt"]
        _save(ck, tmp_path / "after.ckpt", SMALL)
    assert_invariant(str(tmp_path), {"prev.ckpt": SMALL, "after.ckpt": SMALL})


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_parent_is_a_regular_file(kind, tmp_path):
    (tmp_path / "blocker").write_text("not a directory")
    with _make(kind) as ck:
        with pytest.raises((NotADirectoryError, FileExistsError, lc.CheckpointWriteError), match="blocker"):
            _save(ck, tmp_path / "blocker" / "sub" / "a.ckpt", SMALL)
        if kind == "async":
            ck.check_for_errors()
        _save(ck, tmp_path / "ok.ckpt", SMALL)
    assert sorted(os.listdir(tmp_path)) == ["blocker", "ok.ckpt"]
    assert (tmp_path / "blocker").read_text() == "not a directory"


@pytest.mark.parametrize("max_in_flight", [1, 2])
def test_slow_disk_backs_up_saves_within_max_in_flight_and_one_buffer_each(max_in_flight, tmp_path):
    delay, saves = 0.25, 5
    config = lc.CheckpointerConfig(max_in_flight=max_in_flight)
    state = {"w": torch.randn(256, 1024)}
    with lc.make_async_checkpointer(config, commit_hook=SlowHook(delay)) as ck:
        _save(ck, tmp_path / "warm.ckpt", state)  # starts the writer outside the timed part
        one_buffer = ck.stager.buffer_bytes
        start = time.monotonic()
        futures = []
        for i in range(saves):
            state["w"].add_(1.0)
            stage_f, write_f = ck.save(tmp_path / f"s{i}.ckpt", state)
            stage_f.result(timeout=60)
            futures.append(write_f)
            assert len(ck.pending_paths()) <= max_in_flight  # the backlog is bounded...
            assert ck.stager.buffer_bytes <= max_in_flight * one_buffer  # ...and so is staging memory
        blocked = time.monotonic() - start
        for f in futures:
            f.result(timeout=60)
        assert ck.stager.allocations <= max_in_flight
        last = ck.load(tmp_path / f"s{saves - 1}.ckpt")["w"]
    # save() waited for the slow commits instead of queueing without bound: a lower bound, never flaky.
    assert blocked >= (saves - max_in_flight) * delay
    assert torch.equal(last, state["w"])
