"""Run by test_kill_and_resume.py: a fit that stops at a known point with a save in flight, to be killed there.

Usage: python tests/lightning/kill_script.py <root> <link|hpc|sigterm>; prints ``READY <what>`` when it is time.
"""

from __future__ import annotations

import os
import sys
import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_ckpt import AsyncCheckpointIO
from tests.lightning.helpers import DelayCommitHook, SlowCommitHook, TinyModel, loader

WAIT_SECS = 120.0  # how long the script waits to be killed before it gives up


class Stop(Callback):
    """At global step 1: waits for step 1's files, then holds later commits; at step 2: says READY and waits."""

    def __init__(self, root: str, mode: str) -> None:
        self.root, self.mode = root, mode

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        plugin = trainer.strategy.checkpoint_io
        if trainer.global_step == 1:
            plugin.wait_for_saves()
            os.remove(os.path.join(self.root, "release"))  # step 2's commit is held until the file is back
        elif trainer.global_step == 2:
            if self.mode == "hpc":
                trainer.save_checkpoint(os.path.join(self.root, "hpc_ckpt_1.ckpt"))
                print("READY hpc saved", flush=True)
            else:
                print(f"READY pending={plugin.ledger.pending_paths()}", flush=True)
            deadline = time.monotonic() + WAIT_SECS
            while time.monotonic() < deadline and not trainer.received_sigterm:
                time.sleep(0.05)  # until the test's signal arrives (SIGTERM sets the flag, SIGKILL ends us)
            if not trainer.received_sigterm:
                sys.exit(3)


def main() -> None:
    root, mode = sys.argv[1], sys.argv[2]
    hook = DelayCommitHook(2.0) if mode == "hpc" else SlowCommitHook(os.path.join(root, "release"), WAIT_SECS)
    if mode == "hpc":
        open(os.path.join(root, "release"), "w").close()  # removed at step 1 (unused by the delay hook)
    trainer = pl.Trainer(
        default_root_dir=root, accelerator="cpu", devices=1, max_steps=10, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        plugins=[AsyncCheckpointIO(commit_hook=hook)],
        callbacks=[Stop(root, mode), ModelCheckpoint(dirpath=os.path.join(root, "ck"), every_n_train_steps=1,
                                                     save_top_k=1, save_last="link")],
    )
    trainer.fit(TinyModel(), loader(n=512))


if __name__ == "__main__":
    main()
