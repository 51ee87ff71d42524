"""Run by test_ddp.py: a 2-rank CPU DDP fit (Lightning's ddp launcher re-executes this file for rank 1).

Usage: python tests/lightning/ddp_script.py <dir> <ok|fail|fail_alone> [ddp|ddp_spawn]

``fail_alone``: the plugin without our callback, ModelCheckpoint saving every step, the save of step 2 failing.
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_ckpt.lightning import AsyncCheckpointCallback, AsyncCheckpointIO
from tests.lightning.helpers import FailCommitHook, TinyModel, loader


class Report(Callback):
    def on_exception(self, trainer, pl_module, exception):
        print(f"RANK {trainer.global_rank} FAILED at step {trainer.global_step}: {type(exception).__name__}: "
              f"{str(exception).splitlines()[0]}", flush=True)

    def on_fit_end(self, trainer, pl_module):
        print(f"RANK {trainer.global_rank} OK at step {trainer.global_step}", flush=True)


def main() -> None:
    directory, mode = sys.argv[1], sys.argv[2]
    strategy = sys.argv[3] if len(sys.argv) > 3 else "ddp"  # ddp_spawn pickles the trainer, plugin and callback
    hook = FailCommitHook("step=2") if mode.startswith("fail") else None
    if mode == "fail_alone":
        callbacks = [Report(), ModelCheckpoint(dirpath=os.path.join(directory, "mc"), every_n_train_steps=1,
                                               save_top_k=-1)]
    else:
        callbacks = [
            Report(),
            AsyncCheckpointCallback(dirpath=os.path.join(directory, "own"), every_n_train_steps=1, keep_last_k=2),
            ModelCheckpoint(dirpath=os.path.join(directory, "mc"), every_n_train_steps=1, save_top_k=1,
                            save_last="link"),
        ]
    trainer = pl.Trainer(
        default_root_dir=directory, accelerator="cpu", devices=2, strategy=strategy, max_steps={"ok": 4, "fail_alone": 6}.get(mode, 40),
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        plugins=[AsyncCheckpointIO(commit_hook=hook)], callbacks=callbacks,
    )
    trainer.fit(TinyModel(), loader(n=1024))


if __name__ == "__main__":
    main()
