"""Two real gloo ranks write one checkpoint directory; the commit marker appears only after both finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lightning_ckpt.commit import PAYLOAD_NAME, is_temp_name
from lightning_ckpt.layout import MANIFEST_NAME
from tests._helpers import wait_for

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _launch(rank: int, port: int, path: str, mode: str, gate_dir: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.multiprocess._rank_worker", "--rank", str(rank), "--init-port", str(port),
           "--path", path, "--mode", mode, "--gate-dir", gate_dir]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("mode", ["sync", "async"])  # sync: DistBarrier in the main thread; async: TCPStoreBarrier
def test_commit_marker_only_after_every_rank_wrote(mode, tmp_path, free_port):
    path = str(tmp_path / "ckpt")
    gate = tmp_path / "gate"
    gate.mkdir()
    procs = [_launch(r, free_port, path, mode, str(gate)) for r in range(2)]
    try:
        # Rank 1 holds in pre_commit (its file is durable in the temp dir); rank 0 waits at the barrier.
        wait_for(lambda: (gate / "entered").exists() or any(p.poll() is not None for p in procs), 120,
                 "rank 1 to reach pre_commit")
        assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
        temps = [n for n in os.listdir(tmp_path) if is_temp_name(n)]
        assert len(temps) == 1, temps  # one temp directory, shared by both ranks
        tmp = os.path.join(tmp_path, temps[0], PAYLOAD_NAME)
        wait_for(lambda: os.path.exists(os.path.join(tmp, "checkpoint_0.pt")), 60, "rank 0's file")
        assert os.path.exists(os.path.join(tmp, "checkpoint_1.pt"))
        assert not os.path.exists(path)  # nothing at the final path while a rank is still writing
        assert not os.path.exists(os.path.join(tmp, MANIFEST_NAME))
        (gate / "release").touch()
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sorted(os.listdir(path)) == [MANIFEST_NAME, "checkpoint_0.pt", "checkpoint_1.pt"]
    assert not any(is_temp_name(n) for n in os.listdir(tmp_path))
    with open(os.path.join(path, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    assert manifest["world_size"] == 2
    for name, entry in manifest["files"].items():
        assert entry["nbytes"] == os.path.getsize(os.path.join(path, name))
