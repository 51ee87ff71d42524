"""2 CPU ranks (gloo, strategy="ddp"): files written once by rank 0, removals ordered, a failure fails both ranks."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from lightning_ckpt.lightning.resume import is_complete
from tests.lightning import helpers

pytestmark = [pytest.mark.lightning, pytest.mark.multiprocess, pytest.mark.timeout(150)]
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _run(tmp_path, mode, strategy="ddp"):
    env = {**os.environ, "PYTHONPATH": ROOT, "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "tests/lightning/ddp_script.py", str(tmp_path), mode, strategy], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_saves_once_and_orders_removals(tmp_path):
    proc, _ = _run(tmp_path, "ok")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "RANK 0 OK at step 4" in out and "RANK 1 OK at step 4" in out, out[-4000:]
    assert helpers.final_files(tmp_path / "own") == ["step=3.ckpt", "step=4.ckpt"]
    assert helpers.final_files(tmp_path / "mc") == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert helpers.temp_files(tmp_path) == []
    for d in ("own", "mc"):
        for name in helpers.final_files(tmp_path / d):
            assert is_complete(str(tmp_path / d / name), verify=True)


def test_ddp_failure_on_rank0_fails_both_ranks_quickly(tmp_path):
    proc, elapsed = _run(tmp_path, "fail")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert "injected write failure" in out, out[-4000:]
    assert "RANK 0 FAILED" in out, out[-4000:]
    assert "OK at step" not in out
    assert elapsed < 100
    files = helpers.final_files(tmp_path / "own")
    # the failed step 2 never appears; step 1 stays unless step 3 was committed before the ranks stopped
    assert "step=2.ckpt" not in files and ("step=1.ckpt" in files or "step=3.ckpt" in files), files


def test_ddp_with_the_plugin_alone_keeps_saving_after_a_failed_save(tmp_path):
    """Without the callback errors are deferred to teardown (raising on rank 0 alone would hang rank 1); a failed
    save must not make every later save fail with it: steps 3-6 are written, step 2 is reported."""
    proc, _ = _run(tmp_path, "fail_alone")
    out = proc.stdout + proc.stderr
    assert helpers.final_files(tmp_path / "mc") == [f"epoch=0-step={s}.ckpt" for s in (1, 3, 4, 5, 6)], out[-4000:]
    assert "injected write failure" in out, out[-4000:]
    assert proc.returncode != 0, out[-4000:]  # rank 0 raises the failed save from teardown
    assert helpers.temp_files(tmp_path) == []
