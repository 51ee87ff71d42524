"""The CheckpointIO plugins on their own and inside real Trainer runs (sync and async behave the same)."""

from __future__ import annotations

import pickle

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

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


@pytest.mark.timeout(60)
def test_remove_waits_for_the_replacement_and_keeps_it_on_failure(tmp_path):
    """Hazard 5: the old checkpoint stays until its replacement is committed, and stays if the replacement fails."""
    release = tmp_path / "release"
    plugin = AsyncCheckpointIO(commit_hook=SlowCommitHook(str(release)), error_policy="warn")
    release.touch()
    plugin.save_checkpoint({"step": 1}, tmp_path / "old.ckpt")
    plugin.wait_for_saves()
    release.unlink()
    plugin.save_checkpoint({"step": 2}, tmp_path / "new.ckpt")  # held in pre_commit until `release` exists
    plugin.remove_checkpoint(tmp_path / "old.ckpt")
    assert plugin.is_pending(tmp_path / "new.ckpt")
    assert (tmp_path / "old.ckpt").exists() and not (tmp_path / "new.ckpt").exists()
    release.touch()
    plugin.wait_for_saves()
    assert helpers.final_files(tmp_path) == ["new.ckpt", "release"]
    plugin.teardown()

    failing = AsyncCheckpointIO(commit_hook=FailCommitHook("bad"), error_policy="warn")
    failing.save_checkpoint({"step": 3}, tmp_path / "bad.ckpt")
    failing.remove_checkpoint(tmp_path / "new.ckpt")
    failing.teardown()  # warn policy: logged, not raised
    assert helpers.final_files(tmp_path) == ["new.ckpt", "release"]


def test_failed_save_raises_once(tmp_path):
    plugin = AsyncCheckpointIO(commit_hook=FailCommitHook("bad"))
    plugin.save_checkpoint({"x": torch.ones(2)}, tmp_path / "bad.ckpt")
    plugin.wait_for_saves()
    with pytest.raises(CheckpointWriteError, match="injected write failure"):
        plugin.save_checkpoint({"x": torch.ones(2)}, tmp_path / "good.ckpt")
    plugin.save_checkpoint({"x": torch.ones(2)}, tmp_path / "good.ckpt")
    plugin.teardown()  # the error was raised already: not again
    assert helpers.final_files(tmp_path) == ["good.ckpt"]


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
