"""A training script without an ``if __name__ == "__main__":`` guard: our writer process never re-runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lightning_ckpt.integrity import check_checkpoint

pytestmark = [pytest.mark.lightning, pytest.mark.multiprocess, pytest.mark.timeout(180)]
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join("tests", "lightning", "no_main_guard_script.py")


def _run_script(directory, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, SCRIPT, str(directory), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=150, check=False)


def _top_level_runs(directory) -> list[str]:
    with open(os.path.join(directory, "top_level_runs.txt")) as f:
        return f.read().splitlines()


def test_a_script_without_main_guard_runs_once_and_leaves_complete_checkpoints(tmp_path):
    proc = _run_script(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SCRIPT DONE" in proc.stdout
    runs = _top_level_runs(tmp_path)
    assert len(runs) == 1, runs  # the writer processes never imported the script
    checkpoints = [os.path.join(tmp_path, kind, f"epoch=0-step={step}.ckpt")
                   for kind in ("plain", "sharded") for step in (1, 2)] + [str(tmp_path / "dcp")]
    for path in checkpoints:
        result = check_checkpoint(path, deep=True)
        assert result.status == "verified", result
    assert os.path.isdir(checkpoints[2]) and os.path.isfile(checkpoints[0])  # sharded directories, plain files


def test_the_check_catches_a_spawn_child_that_re_runs_the_script(tmp_path):
    """The control: multiprocessing's ``spawn`` re-imports such a script, and the marker file shows it."""
    proc = _run_script(tmp_path, "spawn")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert len(_top_level_runs(tmp_path)) == 2
    assert "bootstrapping phase" in proc.stderr  # the child died where the script started a process
