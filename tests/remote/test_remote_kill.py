"""SIGKILL of a real Lightning trainer while its checkpoint is being uploaded to S3 (the server holds UploadPart).

Run as a script (``python -m tests.remote.test_remote_kill URL ROOT``), this module is the trainer: a tiny fit
whose step-1 save goes to ``URL`` through ``AsyncCheckpointIO``; it prints ``READY`` once that save is handed to
the writer and waits to be killed.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lightning_ckpt.lightning import AsyncCheckpointIO, SyncCheckpointIO
from tests._helpers import wait_for
from tests.lightning.test_kill_and_resume import _descendants, _finish
from tests.remote.test_remote_faults import plugin_for, save_and_finish
from tests.remote.test_remote_paths import checkpoint

pytestmark = [pytest.mark.faults, pytest.mark.remote, pytest.mark.timeout(180)]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WAIT_SECS = 120.0  # how long the trainer waits to be killed before it gives up


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start_trainer(url: str, root) -> subprocess.Popen:
    """The trainer, up to its step-1 save handed to the plugin (its writer may still be starting)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.remote.test_remote_kill", url, str(root)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:  # ends when the script exits (a failure before READY)
        lines.append(line)
        if line.startswith("READY"):
            return proc
    _finish(proc, timeout=60)
    pytest.fail("the trainer ended before READY:\n" + "".join(lines[-60:]))


def _upload_in_flight(s3, proc: subprocess.Popen) -> list[int]:
    """Wait until the trainer's upload reached UploadPart (so its writer runs); returns the writer's pids."""
    wait_for(lambda: s3.server.ops("UploadPart", "run/model.ckpt"), 60, "the trainer's upload to reach UploadPart")
    writers = _descendants(proc.pid)
    assert writers, "no writer process below the trainer while its upload is in flight"
    return writers


def _previous(s3, url: str) -> bytes:
    save_and_finish(SyncCheckpointIO(), checkpoint(1, numel=10), url)
    return s3.get(url.split("/", 3)[3])


def test_sigkill_of_trainer_and_writer_mid_upload_keeps_the_old_object_and_the_next_writer_aborts_it(s3, tmp_path):
    """A node loss (the trainer and its writer SIGKILLed) while UploadPart is held: the old object stays
    bit-identical, nothing partial is visible, and the next writer of the prefix aborts the dangling upload."""
    url = f"{s3.url}/run/model.ckpt"
    old = _previous(s3, url)
    s3.server.set_faults({"op": "UploadPart", "key": "run/model.ckpt", "action": "hang", "secs": 60})
    s3.server.clear_log()
    proc = _start_trainer(url, tmp_path)
    writers = _upload_in_flight(s3, proc)
    for pid in [proc.pid, *writers]:
        os.kill(pid, signal.SIGKILL)
    _finish(proc)
    wait_for(lambda: not any(map(_alive, writers)), 30, "the writer to be gone")
    s3.server.set_faults()
    assert s3.keys() == ["run/model.ckpt"] and s3.get("run/model.ckpt") == old  # bit-identical, nothing partial
    (dangling,) = s3.uploads()
    assert dangling["Key"] == "run/model.ckpt"

    timeout = 5.0  # the next writer aborts our uploads in its prefix older than its write timeout
    wait_for(lambda: time.time() - dangling["Initiated"].timestamp() > timeout, 30, "the dangling upload to age")
    save_and_finish(plugin_for(AsyncCheckpointIO, write_timeout_secs=timeout / 0.8), checkpoint(3, numel=10),
                    f"{s3.url}/run/next.ckpt")
    assert s3.uploads() == [] and s3.server.ops("AbortMultipartUpload", "run/model.ckpt")
    assert s3.get("run/model.ckpt") == old


def test_sigkill_of_the_trainer_alone_mid_upload_never_shows_a_partial_object(s3, tmp_path):
    """The trainer SIGKILLed while UploadPart is held: its writer sees the socket's EOF after the request in
    flight, which it was sent whole: the upload completes (a complete, verifying checkpoint) or nothing changes;
    either way no partial object is visible, no upload is left behind, and the writer exits."""
    url = f"{s3.url}/run/model.ckpt"
    old = _previous(s3, url)
    s3.server.set_faults({"op": "UploadPart", "key": "run/model.ckpt", "action": "delay", "secs": 10})
    s3.server.clear_log()
    proc = _start_trainer(url, tmp_path)
    writers = _upload_in_flight(s3, proc)
    os.kill(proc.pid, signal.SIGKILL)  # the part is held for 10 s: the kill lands mid-upload
    s3.server.clear_log()
    _finish(proc)
    wait_for(lambda: not any(map(_alive, writers)), 60, "the orphaned writer to finish and exit")
    s3.server.set_faults()
    assert s3.server.ops("CompleteMultipartUpload", "run/model.ckpt")  # completed after the trainer died
    assert s3.keys() == ["run/model.ckpt"] and s3.uploads() == []
    data = s3.get("run/model.ckpt")
    assert data != old and torch.load(io.BytesIO(data), weights_only=False)["global_step"] == 1
    loaded = SyncCheckpointIO().load_checkpoint(url)  # verifies every checksum
    assert loaded["global_step"] == 1


def _train(url: str, root: str) -> None:
    from lightning.pytorch.callbacks import Checkpoint

    from tests.lightning.helpers import TinyModel, loader, trainer

    class SaveThenWait(Checkpoint):  # a checkpoint callback's save in the loop stays in flight
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                trainer.save_checkpoint(url)  # inside the loop: returns once staged, the upload in flight
                print("READY", flush=True)
                time.sleep(WAIT_SECS)  # until the test's SIGKILL
                sys.exit(3)

    trainer(root, plugins=[AsyncCheckpointIO()], callbacks=[SaveThenWait()], enable_checkpointing=True).fit(
        TinyModel(), loader(n=64))


if __name__ == "__main__":
    _train(sys.argv[1], sys.argv[2])
