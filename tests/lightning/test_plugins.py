"""The CheckpointIO plugins on their own and inside real Trainer runs (sync and async behave the same)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

from lightning_ckpt.errors import CheckpointWriteError
from lightning_ckpt.lightning import AsyncCheckpointIO, SyncCheckpointIO
from tests.lightning import helpers
from tests.lightning.helpers import FailCommitHook, SlowCommitHook, TinyModel

pytestmark = pytest.mark.lightning
PLUGINS = [AsyncCheckpointIO, SyncCheckpointIO]


@pytest.mark.parametrize("cls", PLUGINS)
def test_direct_api_contract(cls, tmp_path):
    """Pickle before use, storage_options refused, missing path, CPU default, weights_only, idempotent teardown."""
    plugin = pickle.loads(pickle.dumps(cls()))
    ckpt = {"state_dict": {"w": torch.arange(4.0)}, "global_step": 7}
    with pytest.raises(TypeError, match="storage_options"):
        plugin.save_checkpoint(ckpt, tmp_path / "x.ckpt", storage_options={"a": 1})
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        plugin.load_checkpoint(tmp_path / "nope.ckpt")
    path = tmp_path / "new_dir" / "a.ckpt"  # the directory does not exist yet
    plugin.save_checkpoint(ckpt, path)
    loaded = plugin.load_checkpoint(path, weights_only=True)  # waits for the pending write of this path
    assert loaded["global_step"] == 7 and torch.equal(loaded["state_dict"]["w"], torch.arange(4.0))
    assert loaded["state_dict"]["w"].device.type == "cpu"
    assert torch.load(path, weights_only=True)["global_step"] == 7  # a plain torch file
    plugin.teardown()
    plugin.teardown()
    plugin.save_checkpoint(ckpt, tmp_path / "b.ckpt")  # usable after teardown
    plugin.remove_checkpoint(tmp_path / "missing.ckpt")  # not an error, like TorchCheckpointIO
    plugin.teardown()
    assert helpers.final_files(tmp_path / "new_dir") == ["a.ckpt"] and (tmp_path / "b.ckpt").exists()
    assert helpers.temp_files(tmp_path) == []


class _InLoop(Checkpoint):
    """Runs ``script(trainer)`` in the first ``on_train_batch_end``: a checkpoint callback's saves there stay in
    flight after returning."""

    def __init__(self, script):
        self.script = script
        self.ran = False

    def on_train_batch_end(self, trainer, *args):
        if not self.ran:
            self.ran = True
            self.script(trainer)


def _run_in_loop(tmp_path, plugin, script):
    probe = _InLoop(script)
    helpers.trainer(tmp_path / "run", max_steps=1, plugins=[plugin], callbacks=[probe], enable_checkpointing=True).fit(
        TinyModel(), helpers.loader())
    assert probe.ran


@pytest.mark.timeout(90)
def test_remove_waits_for_the_replacement_and_keeps_it_on_failure(tmp_path):
    """Hazard 5: the old checkpoint stays until its replacement is committed, and stays if the replacement fails."""
    release = tmp_path / "release"
    plugin = AsyncCheckpointIO(commit_hook=SlowCommitHook(str(release)), error_policy="warn")
    ck = tmp_path / "ck"

    def script(trainer):
        release.touch()
        trainer.save_checkpoint(ck / "old.ckpt")
        plugin.wait_for_saves()
        release.unlink()
        trainer.save_checkpoint(ck / "new.ckpt")  # held in pre_commit until `release` exists
        trainer.strategy.remove_checkpoint(ck / "old.ckpt")
        assert plugin.ledger.is_pending(ck / "new.ckpt")
        assert (ck / "old.ckpt").exists() and not (ck / "new.ckpt").exists()
        release.touch()
        plugin.wait_for_saves()
        assert helpers.final_files(ck) == ["new.ckpt"]

    _run_in_loop(tmp_path, plugin, script)
    failing = AsyncCheckpointIO(commit_hook=FailCommitHook("bad"), error_policy="warn")

    def fail_then_remove(trainer):
        trainer.save_checkpoint(ck / "bad.ckpt")
        trainer.strategy.remove_checkpoint(ck / "new.ckpt")

    _run_in_loop(tmp_path, failing, fail_then_remove)  # warn policy: logged, not raised
    assert helpers.final_files(ck) == ["new.ckpt"]


@pytest.mark.timeout(90)
def test_failed_save_raises_once(tmp_path):
    plugin = AsyncCheckpointIO(commit_hook=FailCommitHook("bad"))
    raised = []

    def script(trainer):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
        plugin.wait_for_saves()
        with pytest.raises(CheckpointWriteError, match="injected write failure"):
            trainer.save_checkpoint(tmp_path / "good.ckpt")
        raised.append(True)
        trainer.save_checkpoint(tmp_path / "good.ckpt")

    _run_in_loop(tmp_path, plugin, script)  # its teardown does not raise the error again
    assert raised and helpers.final_files(tmp_path) == ["good.ckpt"]


@pytest.mark.parametrize("cls", PLUGINS)
def test_save_outside_the_loop_returns_committed(cls, tmp_path):
    """Saves after ``fit`` and from a background thread return once committed: plain ``torch.load`` reads the
    file at once, and no writer thread or process is left behind (a save after fit may be the last act)."""
    import threading

    plugin = cls()
    thread = threading.Thread(target=plugin.save_checkpoint, args=({"global_step": 1, "w": torch.ones(3)},
                                                                   tmp_path / "thread.ckpt"))
    thread.start()
    thread.join(timeout=60)
    assert torch.load(tmp_path / "thread.ckpt", weights_only=True)["global_step"] == 1
    trainer = helpers.trainer(tmp_path, max_steps=2, plugins=[plugin])
    trainer.fit(TinyModel(), helpers.loader())
    before = {t.name for t in threading.enumerate()}
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    assert torch.load(tmp_path / "after.ckpt", weights_only=False)["global_step"] == 2
    assert TinyModel.load_from_checkpoint(tmp_path / "after.ckpt").hparams.width == 16
    assert {t.name for t in threading.enumerate()} <= before
    plugin.teardown()


@pytest.mark.parametrize("cls", PLUGINS)
def test_fit_validate_fit_and_save_after_fit(cls, tmp_path):
    """Teardown after every stage; the plugin restarts lazily; trainer.save_checkpoint after fit works."""
    plugin = cls()
    model = TinyModel()
    mc = ModelCheckpoint(dirpath=tmp_path / "mc", every_n_train_steps=1, save_top_k=1)
    trainer = helpers.trainer(tmp_path, max_steps=3, plugins=[plugin], callbacks=[mc], enable_checkpointing=True)
    trainer.fit(model, helpers.loader())
    trainer.validate(model, helpers.loader(16))
    trainer.fit_loop.epoch_loop.max_steps = 5
    trainer.fit(model, helpers.loader())
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    plugin.teardown()
    files = helpers.final_files(tmp_path / "mc")
    assert len(files) == 1 and files[0].endswith("step=5.ckpt"), files
    for path in [tmp_path / "mc" / files[0], tmp_path / "after.ckpt"]:
        assert TinyModel.load_from_checkpoint(path).hparams.width == 16
        assert torch.load(path, weights_only=False)["global_step"] == 5
    assert helpers.temp_files(tmp_path) == []


@pytest.mark.timeout(90)
def test_any_plugin_load_waits_for_a_pending_save_through_a_symlinked_directory(tmp_path):
    """A load by another plugin instance, through a symlinked spelling of the directory, returns the save in
    flight, not the older file at that path (matched by real path)."""
    import threading

    release = tmp_path / "release"
    writer = AsyncCheckpointIO(commit_hook=SlowCommitHook(str(release)))
    reader = SyncCheckpointIO()
    (tmp_path / "ck").mkdir()
    os.symlink(tmp_path / "ck", tmp_path / "alias")
    waiting = threading.Event()
    original_wait = writer.ledger.wait

    def wait(*args, **kwargs):
        waiting.set()  # the reader now waits on the writer's ledger
        return original_wait(*args, **kwargs)

    writer.ledger.wait = wait

    def release_when_waited():
        waiting.wait(timeout=30)
        release.touch()

    def script(trainer):
        release.touch()
        trainer.save_checkpoint(tmp_path / "ck" / "a.ckpt")
        writer.wait_for_saves()
        release.unlink()
        waiting.clear()
        trainer.lightning_module.hparams.lr = 0.5  # tells the new save from the old one
        trainer.save_checkpoint(tmp_path / "ck" / "a.ckpt")  # held until `release` exists
        helper = threading.Thread(target=release_when_waited)
        helper.start()
        try:
            loaded = reader.load_checkpoint(tmp_path / "alias" / "a.ckpt")
        finally:
            helper.join()
        assert waiting.is_set() and loaded["hyper_parameters"]["lr"] == 0.5  # the new save, not the old one

    _run_in_loop(tmp_path, writer, script)
