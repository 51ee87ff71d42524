"""Run by test_no_main_guard.py: a user's training script with top-level code and no ``__main__`` guard.

Usage: python tests/lightning/no_main_guard_script.py <dir> [spawn]

Every line below runs at import. A writer started like ``multiprocessing``'s ``spawn`` would import this file again
in the child (as ``__mp_main__``): the marker file would get a second line and the child would start its own fits.
"""

import os
import sys
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ckpt.dcp import DistributedCheckpointer
from lightning_ckpt.lightning import AsyncCheckpointIO, ModelParallelStrategy
from tests.distributed.test_lightning_strategies import _module_class
from tests.lightning.helpers import TinyModel, loader

directory = sys.argv[1]
with open(os.path.join(directory, "top_level_runs.txt"), "a") as marker:
    marker.write(f"pid {os.getpid()} ran the top level\n")

if sys.argv[2:] == ["spawn"]:  # the test's control: what a multiprocessing "spawn" child does to such a script
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=os.getpid)
    child.start()  # the child re-runs the lines above, then fails here (bootstrapping) and exits 1
    child.join(timeout=120)
    sys.exit(3)

common = dict(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0)

# Single-file checkpoints through our async plugin (its writer process).
pl.Trainer(**common, plugins=[AsyncCheckpointIO()],
           callbacks=[ModelCheckpoint(dirpath=os.path.join(directory, "plain"), every_n_train_steps=1,
                                      save_top_k=-1)]).fit(TinyModel(), loader())

# Sharded (DCP) checkpoints through our ModelParallelStrategy with the async plugin.
pl.Trainer(**common, strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
           plugins=[AsyncCheckpointIO()],
           callbacks=[ModelCheckpoint(dirpath=os.path.join(directory, "sharded"), every_n_train_steps=1,
                                      save_top_k=-1)]).fit(_module_class("model_parallel")(seed=0))

# A sharded save in this process alone, through the public async API.
checkpointer = DistributedCheckpointer(os.path.join(directory, "dcp"), no_dist=True)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
    checkpointer.async_save({"w": torch.arange(1024, dtype=torch.float32), "step": 2}).result(timeout=120)
checkpointer.close()
print("SCRIPT DONE", flush=True)
