"""The writer's layouts on the commit primitive: torch's directory layout by default, one file on request."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import timedelta

import pytest
import torch

import lightning_ckpt as lc
from lightning_ckpt import commit
from lightning_ckpt.layout import MANIFEST_NAME
from tests._helpers import assert_equal_state

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RecordingHook(lc.WriterHook):
    def __init__(self):
        self.calls = []

    def pre_commit(self, path, **kwargs):
        self.calls.append(("pre", path, kwargs))

    def post_commit(self, path, **kwargs):
        self.calls.append(("post", path, kwargs))


def test_default_layout_is_torchs_directory_and_hooks_get_the_callers_kwargs(tmp_path):
    hook = RecordingHook()
    sd = {"w": torch.arange(6.0), "step": 3}
    writer = lc.CheckpointWriter(lc.CheckpointWriterConfig(), lc.RankInfo(0, 1), commit_hook=hook)
    assert writer.write(str(tmp_path / "ck"), sd, extra="value") is None  # as torch's writer
    assert sorted(os.listdir(tmp_path / "ck")) == [MANIFEST_NAME, "checkpoint_0.pt"]
    assert_equal_state(torch.load(tmp_path / "ck" / "checkpoint_0.pt", weights_only=True), sd)
    assert writer.last_write_stats.nbytes == os.path.getsize(tmp_path / "ck" / "checkpoint_0.pt")
    assert [(c[0], c[1], c[2]["extra"]) for c in hook.calls] == [("pre", str(tmp_path / "ck"), "value"),
                                                                  ("post", str(tmp_path / "ck"), "value")]
    assert_equal_state(lc.CheckpointReader().read(tmp_path / "ck")[0], sd)


def test_layout_is_validated():
    with pytest.raises(ValueError, match="layout.*'zip'"):
        lc.CheckpointWriterConfig(layout="zip")
    with pytest.raises(ValueError, match="layout='file'.*global_world_size=2"):
        lc.CheckpointWriter(lc.CheckpointWriterConfig(layout="file"), lc.RankInfo(0, 2), barrier=object())
    with pytest.raises(ValueError, match="write_barrier_timeout_secs"):
        lc.CheckpointWriterConfig(write_barrier_timeout_secs=0)


@pytest.mark.parametrize("layout", ["dir", "file"])
def test_a_250_byte_checkpoint_name_works(tmp_path, layout):
    name = "e" * 245 + ".ckpt"
    writer = lc.CheckpointWriter(lc.CheckpointWriterConfig(layout=layout))
    writer.write(tmp_path / name, {"w": torch.ones(3)})
    writer.write(tmp_path / name, {"w": torch.zeros(3)})  # and replacing it
    assert os.listdir(tmp_path) == [name]
    assert torch.equal(lc.CheckpointReader().read(tmp_path / name)[0]["w"], torch.zeros(3))


def test_resaving_a_directory_never_leaves_its_path_without_a_complete_checkpoint(tmp_path):
    path = tmp_path / "ck"
    writer = lc.CheckpointWriter()
    writer.write(path, {"w": torch.zeros(1000)})
    stop, gaps, polls = threading.Event(), [], [0]

    def watch():
        while not stop.is_set():
            polls[0] += 1
            if not os.path.exists(path / MANIFEST_NAME) or not os.path.exists(path / "checkpoint_0.pt"):
                gaps.append(polls[0])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(30):
            writer.write(path, {"w": torch.full((1000,), float(i))})
    finally:
        stop.set()
        watcher.join()
    assert gaps == [] and polls[0] > 0
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def _two_ranks(path, port, before=None):
    from torch.distributed import TCPStore

    master = TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    errors = []

    def rank_main(rank):
        info = lc.RankInfo(rank, 2)
        try:
            barrier = lc.TCPStoreBarrier(rank_info=info, tcpstore_port=port, master_address="127.0.0.1",
                                         timeout_secs=30, is_master=False)
            lc.CheckpointWriter(rank_info=info, barrier=barrier).write(path, {"w": torch.full((10,), float(rank))})
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    del master
    assert not errors and not any(t.is_alive() for t in threads), errors


def test_planted_symlink_at_a_multi_rank_temp_name_is_never_followed(tmp_path, free_port, monkeypatch):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_bytes(b"keep")
    shared = tmp_path / "shared"
    shared.mkdir()
    # The old predictable name, and the next name our random source would give.
    os.symlink(victim, shared / ".ck.lckpt-tmp-dir")
    tokens = iter(["abcdefabcdefabcd", "0000111122223333"])
    monkeypatch.setattr(commit.secrets, "token_hex", lambda n: next(tokens))
    os.symlink(victim, shared / commit.temp_name("abcdefabcdefabcd"))
    _two_ranks(str(shared / "ck"), free_port)
    assert os.listdir(victim) == ["precious"] and (victim / "precious").read_bytes() == b"keep"
    for rank in range(2):
        state = lc.CheckpointReader(lc.RankInfo(rank, 2)).read(shared / "ck")[0]
        assert torch.equal(state["w"], torch.full((10,), float(rank)))
    assert sorted(os.listdir(shared)) == sorted([".ck.lckpt-tmp-dir", commit.temp_name("abcdefabcdefabcd"), "ck"])


_HOLDER = """
import sys
from lightning_ckpt.commit import Commit
c = Commit.create(sys.argv[1], directory=True)
c.write_bytes("checkpoint_0.pt", b"another job's rank 0, still writing")
print(c.token, flush=True)
sys.stdin.read()
c.close()
"""


def test_first_save_leaves_another_jobs_live_multi_rank_temp_alone(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "other")], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        token = proc.stdout.readline().strip()
        lc.CheckpointWriter().write(tmp_path / "mine", {"w": torch.ones(2)})  # its first write cleans stale temps
        assert commit.temp_name(token) in os.listdir(tmp_path)
    finally:
        proc.stdin.close()
        proc.wait(30)
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # the other job closed its temp itself
