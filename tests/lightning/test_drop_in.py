"""Where a script that works with Lightning's default ``TorchCheckpointIO`` could notice the async plugin: files read
right after a save, saves made after the plugin's teardown, exceptions, logger steps."""

from __future__ import annotations

import csv
import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_ckpt.lightning import AsyncCheckpointIO
from lightning_ckpt.lightning.resume import is_complete
from tests.lightning import helpers
from tests.lightning.helpers import DelayCommitHook, FailCommitHook, TinyModel

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(90)]


class _SaveAndRead(Callback):
    """A user's callback that saves and reads the file back at once (an upload, a check), as it can with torch."""

    def __init__(self, directory):
        self.directory = str(directory)
        self.read_steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        path = os.path.join(self.directory, f"user-{trainer.global_step}.ckpt")
        trainer.save_checkpoint(path)
        self.read_steps.append(torch.load(path, weights_only=False)["global_step"])


class _ModuleSaves(TinyModel):
    def training_step(self, batch, batch_idx):
        if self.global_step == 1:
            path = os.path.join(self.trainer.default_root_dir, "module.ckpt")
            self.trainer.save_checkpoint(path)
            self.read_back = torch.load(path, weights_only=False)["global_step"]
        return super().training_step(batch, batch_idx)


def test_a_save_from_user_code_in_the_loop_is_readable_when_it_returns(tmp_path):
    """Saves from the user's callback or module commit before returning; ModelCheckpoint's stay async."""
    user = _SaveAndRead(tmp_path / "user")
    mc = ModelCheckpoint(dirpath=tmp_path / "mc", every_n_train_steps=1, save_top_k=-1)
    plugin = AsyncCheckpointIO(commit_hook=DelayCommitHook(0.2))  # an async save would not be there yet
    model = _ModuleSaves()
    trainer = helpers.trainer(tmp_path, max_steps=3, plugins=[plugin], callbacks=[user, mc], enable_checkpointing=True)
    trainer.fit(model, helpers.loader())
    assert user.read_steps == [1, 2, 3] and model.read_back == 1
    assert sum(s.stall_secs >= 0.2 for s in plugin.binding.saves) == 4  # the 3 user saves and the module's
    assert len(plugin.binding.saves) == 7  # and ModelCheckpoint's 3, which did not wait for their commit


class _SavesAfterFit(Checkpoint):
    """A checkpoint callback saving in ``on_fit_end`` and ``teardown``: Lightning runs them after the plugin's
    teardown, with the trainer still FITTING and RUNNING."""

    def __init__(self, directory):
        self.directory = str(directory)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.save_checkpoint(os.path.join(self.directory, f"loop-{trainer.global_step}.ckpt"))

    def on_fit_end(self, trainer, pl_module):
        trainer.save_checkpoint(os.path.join(self.directory, "fit_end.ckpt"))

    def teardown(self, trainer, pl_module, stage):
        trainer.save_checkpoint(os.path.join(self.directory, "teardown.ckpt"))


def test_saves_after_the_plugins_teardown_are_committed_when_fit_returns(tmp_path):
    plugin = AsyncCheckpointIO(commit_hook=DelayCommitHook(0.3))
    trainer = helpers.trainer(tmp_path, max_steps=2, plugins=[plugin], callbacks=[_SavesAfterFit(tmp_path / "ck")],
                              enable_checkpointing=True)
    trainer.fit(TinyModel(), helpers.loader())
    for name in ("fit_end.ckpt", "teardown.ckpt"):
        assert is_complete(str(tmp_path / "ck" / name), verify=True), name
    assert plugin.ledger.pending_paths() == []
    trainer.fit_loop.epoch_loop.max_steps = 4  # the next fit's loop saves are async again
    trainer.fit(TinyModel(), helpers.loader())
    assert any(s.step == 3 and s.stall_secs < 0.3 for s in plugin.binding.saves)


class _RaisesAtStep1(TinyModel):
    def training_step(self, batch, batch_idx):
        if self.global_step == 1:
            raise ValueError("the user's own bug")
        return super().training_step(batch, batch_idx)


def test_the_users_exception_propagates_over_a_failed_background_save(tmp_path):
    """The step-1 save fails in the writer, then training raises: the user's exception is what ``fit`` raises
    (as with torch), the failed save is logged and named in its notes."""
    mc = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1)
    trainer = helpers.trainer(tmp_path, max_steps=4, plugins=[AsyncCheckpointIO(commit_hook=FailCommitHook("step=1"))],
                              callbacks=[mc], enable_checkpointing=True)
    with pytest.raises(ValueError, match="the user's own bug") as info:
        trainer.fit(_RaisesAtStep1(), helpers.loader())
    notes = getattr(info.value, "__notes__", [])
    assert any("checkpoint save had also failed" in n and "injected write failure" in n for n in notes), notes


def test_save_metrics_are_logged_at_steps_that_never_go_back(tmp_path):
    """A commit lands steps after its save: its metrics go to the step the trainer logs at then (loggers such as
    W&B drop steps that go back), and ``ckpt/step`` names the save's own step."""
    logger = CSVLogger(str(tmp_path / "logs"), name="run")
    mc = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1)
    trainer = helpers.trainer(tmp_path, max_steps=8, plugins=[AsyncCheckpointIO(commit_hook=DelayCommitHook(0.5))],
                              callbacks=[mc], enable_checkpointing=True, logger=logger, log_every_n_steps=1)
    trainer.fit(TinyModel(), helpers.loader())
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps), steps
    saves = [r for r in rows if r.get("ckpt/step")]
    assert sorted(int(float(r["ckpt/step"])) for r in saves) == [2, 4, 6, 8]
    assert any(int(r["step"]) > int(float(r["ckpt/step"])) for r in saves)  # landed later, logged later
