"""A real fit killed with a save in flight (SIGKILL of trainer and writer, or a job-wide SIGTERM), then resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ckpt import AsyncCheckpointIO
from lightning_ckpt.lightning.resume import is_complete
from tests.lightning import helpers
from tests.lightning.helpers import TinyModel

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(240)]
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _start(root, mode):
    (root / "release").touch()
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "tests/lightning/kill_script.py", str(root), mode], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:  # ends when the script exits (a failure before READY)
        lines.append(line)
        if line.startswith("READY"):
            return proc, lines
    proc.wait(timeout=60)
    pytest.fail("the script ended before READY:\n" + "".join(lines[-60:]))


def _descendants(pid):
    """Every live process below ``pid`` (the writer, whatever session it runs in)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _finish(proc, timeout=90):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return out


def _resume_step(root, ckpt_path):
    """Resume a fit in this process; returns the global step it restored."""
    restored = {}

    class Probe(TinyModel):
        def on_train_start(self):
            restored.setdefault("step", self.trainer.global_step)

    mc = ModelCheckpoint(dirpath=root / "ck", save_top_k=0)  # where Lightning looks for last.ckpt
    trainer = helpers.trainer(root, max_steps=4, callbacks=[mc], plugins=[AsyncCheckpointIO()], enable_checkpointing=True)
    trainer.fit(Probe(), helpers.loader(n=512), ckpt_path=ckpt_path)
    return restored["step"], trainer.ckpt_path


def test_sigkill_with_a_save_in_flight_leaves_last_ckpt_complete_and_resumable(tmp_path):
    """save_last="link", the step-2 save held in the writer, trainer and writer SIGKILLed: last.ckpt names the
    committed step-1 checkpoint (it never named the uncommitted file), and ckpt_path="last" resumes from it."""
    proc, lines = _start(tmp_path, "link")
    victims = [proc.pid, *_descendants(proc.pid)]
    assert len(victims) >= 2, f"no writer process below the trainer: {lines}"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    _finish(proc)
    last = tmp_path / "ck" / "last.ckpt"
    assert os.path.islink(last) and os.path.exists(last), "last.ckpt dangles"
    assert os.readlink(last) == "epoch=0-step=1.ckpt" and is_complete(str(last), verify=True)
    assert not (tmp_path / "ck" / "epoch=0-step=2.ckpt").exists()
    step, path = _resume_step(tmp_path, "last")
    assert step == 1 and os.path.basename(path) == "last.ckpt"


def test_hpc_save_inside_the_loop_is_committed_when_it_returns(tmp_path):
    """Lightning's SLURM requeue saves hpc_ckpt_N.ckpt and the job is killed right after: the file is complete as
    soon as save_checkpoint returns, and ckpt_path="hpc" resumes from it (no temp name is taken for a version)."""
    proc, lines = _start(tmp_path, "hpc")
    for pid in [proc.pid, *_descendants(proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    _finish(proc)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    assert is_complete(str(hpc), verify=True), "".join(lines)
    assert torch.load(hpc, weights_only=False)["global_step"] == 2
    step, path = _resume_step(tmp_path, "hpc")
    assert step == 2 and os.path.basename(path) == "hpc_ckpt_1.ckpt"


def test_job_wide_sigterm_commits_the_checkpoint_in_flight(tmp_path):
    """SIGTERM to the whole process group (SLURM scancel, a Kubernetes stop) while the step-2 save is held in the
    writer: Lightning stops gracefully, the plugin's teardown drains, and the checkpoint in flight is committed."""
    proc, lines = _start(tmp_path, "sigterm")
    os.killpg(proc.pid, signal.SIGTERM)
    for pid in _descendants(proc.pid):  # a writer in its own session gets the job-wide signal too
        os.kill(pid, signal.SIGTERM)
    (tmp_path / "release").touch()  # the held commit may now finish
    out = "".join(lines) + _finish(proc)
    assert "Received SIGTERM" in out, out[-3000:]  # Lightning stopped gracefully (its own SIGTERM handling)
    last = tmp_path / "ck" / "last.ckpt"  # step 2, or step 3 saved at the batch end before Lightning stops
    assert os.path.exists(last) and is_complete(str(last), verify=True), out[-3000:]
    assert torch.load(last, weights_only=False)["global_step"] >= 2 and helpers.temp_files(tmp_path) == []
