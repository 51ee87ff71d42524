"""ModelCheckpoint with the async plugin (and the callback guarding it): LIGHTNING_NOTES §3 hazards, one by one."""

from __future__ import annotations

import csv
import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_ckpt.lightning import AsyncCheckpointCallback, AsyncCheckpointIO, SyncCheckpointIO
from lightning_ckpt.lightning.resume import is_complete
from tests.lightning import helpers
from tests.lightning.helpers import DelayCommitHook, TinyModel

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(90)]


def _plugin():
    return AsyncCheckpointIO(commit_hook=DelayCommitHook(0.15))  # writes land well after ModelCheckpoint moves on


class _LastProbe(Callback):
    """At every step start: a last.ckpt that exists must be complete (never dangling, never torn)."""

    def __init__(self, path):
        self.path = str(path)
        self.seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if os.path.lexists(self.path):
            assert os.path.exists(self.path), "last.ckpt is a dangling link"
            assert is_complete(os.path.realpath(self.path))
            self.seen += 1


def _own(tmp_path, with_callback):
    """Our callback beside ModelCheckpoint, or nothing: the plugin alone must guard ModelCheckpoint itself."""
    return [AsyncCheckpointCallback(dirpath=str(tmp_path / "own"), save_on_train_end=False)] if with_callback else []


@pytest.mark.parametrize("with_callback", [True, False], ids=["callback", "plugin_alone"])
@pytest.mark.parametrize("save_last", [True, "link"])
def test_top_k_and_last_stay_consistent(save_last, with_callback, tmp_path):
    """save_top_k=1 leaves exactly one top-k file (no orphans); last.ckpt is valid whenever it exists, from a
    fresh directory on; every file loads with load_from_checkpoint."""
    ck = tmp_path / "ck"
    mc = ModelCheckpoint(dirpath=ck, every_n_train_steps=1, save_top_k=1, save_last=save_last)
    probe = _LastProbe(ck / "last.ckpt")
    trainer = helpers.trainer(tmp_path, max_steps=5, plugins=[_plugin()],
                              callbacks=[probe, *_own(tmp_path, with_callback), mc], enable_checkpointing=True)
    trainer.fit(TinyModel(), helpers.loader())
    assert helpers.final_files(ck) == ["epoch=0-step=5.ckpt", "last.ckpt"]
    assert probe.seen >= 1
    if save_last == "link":
        assert os.path.islink(ck / "last.ckpt") and os.readlink(ck / "last.ckpt") == "epoch=0-step=5.ckpt"
    for name in helpers.final_files(ck):
        assert TinyModel.load_from_checkpoint(ck / name).hparams.width == 16
        assert torch.load(ck / name, weights_only=False)["global_step"] == 5
    assert helpers.temp_files(tmp_path) == []


def test_plugin_alone_top_k_has_no_orphans(tmp_path):
    """Without our callback: removals are still ordered after the writes (Lightning's async plugin leaves 4 files)."""
    ck = tmp_path / "ck"
    mc = ModelCheckpoint(dirpath=ck, every_n_train_steps=1, save_top_k=1)
    helpers.trainer(tmp_path, max_steps=4, plugins=[_plugin()], callbacks=[mc], enable_checkpointing=True).fit(
        TinyModel(), helpers.loader())
    assert helpers.final_files(ck) == ["epoch=0-step=4.ckpt"]


@pytest.mark.parametrize("with_callback", [True, False], ids=["callback", "plugin_alone"])
@pytest.mark.parametrize("plugin", ["async", "sync"])
def test_version_counter_sees_pending_files(plugin, with_callback, tmp_path):
    """A fixed filename gives fixed, fixed-v1, fixed-v2 as with a synchronous writer: no two saves share a name."""
    ck = tmp_path / "ck"
    mc = ModelCheckpoint(dirpath=ck, filename="fixed", monitor="train_loss", every_n_train_steps=1, save_top_k=-1)
    io = _plugin() if plugin == "async" else SyncCheckpointIO()
    helpers.trainer(tmp_path, max_steps=3, plugins=[io], callbacks=[*_own(tmp_path, with_callback), mc],
                    enable_checkpointing=True).fit(TinyModel(), helpers.loader())
    assert helpers.final_files(ck) == ["fixed-v1.ckpt", "fixed-v2.ckpt", "fixed.ckpt"]
    steps = {n: torch.load(ck / n, weights_only=False)["global_step"] for n in helpers.final_files(ck)}
    assert steps == {"fixed.ckpt": 1, "fixed-v1.ckpt": 2, "fixed-v2.ckpt": 3}


@pytest.mark.parametrize("how", ["last", "explicit"])
def test_resume_matches_an_uninterrupted_run(how, tmp_path):
    data = helpers.loader(n=8)  # one batch per epoch: resuming mid-epoch sees the same data
    torch.manual_seed(0)
    straight = TinyModel()
    helpers.trainer(tmp_path / "a", max_steps=6).fit(straight, data)

    ck = tmp_path / "ck"
    torch.manual_seed(0)
    first = TinyModel()
    mc = ModelCheckpoint(dirpath=ck, every_n_train_steps=1, save_top_k=-1, save_last=True)
    helpers.trainer(tmp_path / "b", max_steps=3, plugins=[_plugin()], callbacks=[mc], enable_checkpointing=True).fit(
        first, data)
    resumed = TinyModel()
    mc2 = ModelCheckpoint(dirpath=ck, every_n_train_steps=1, save_top_k=-1, save_last=True)
    t = helpers.trainer(tmp_path / "b", max_steps=6, plugins=[_plugin()], callbacks=[mc2], enable_checkpointing=True)
    t.fit(resumed, data, ckpt_path="last" if how == "last" else str(ck / "epoch=2-step=3.ckpt"))
    helpers.assert_trees_equal(resumed.state_dict(), straight.state_dict())
    helpers.assert_trees_equal(t.optimizers[0].state_dict(), straight.trainer.optimizers[0].state_dict())
    for name in helpers.final_files(ck):
        assert TinyModel.load_from_checkpoint(ck / name) is not None


class _ReadingLogger(CSVLogger):
    """Like W&B's log_model: reads the checkpoint file in after_save_checkpoint."""

    read = 0

    def after_save_checkpoint(self, checkpoint_callback):
        path = checkpoint_callback.last_model_path or checkpoint_callback.best_model_path
        assert is_complete(path), f"{path} not written yet"
        self.read += 1


@pytest.mark.parametrize("with_callback", [True, False], ids=["callback", "plugin_alone"])
def test_logger_after_save_checkpoint_sees_committed_files(with_callback, tmp_path):
    ck = tmp_path / "ck"
    logger = _ReadingLogger(str(tmp_path / "logs"))
    mc = ModelCheckpoint(dirpath=ck, every_n_train_steps=1, save_top_k=1)
    trainer = helpers.trainer(tmp_path, max_steps=3, plugins=[_plugin()], callbacks=[*_own(tmp_path, with_callback), mc],
                              logger=logger, enable_checkpointing=True)
    trainer.fit(TinyModel(), helpers.loader())
    assert logger.read == 3
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:  # per-save metrics, logged by the plugin alone too
        assert sum(1 for row in csv.DictReader(f) if row.get("ckpt/stall_ms")) == 3


def test_last_ckpt_shares_the_staged_copy_of_the_top_k_save(tmp_path):
    """ModelCheckpoint(save_last=True) saves twice per step; with the callback the second save reuses the first's
    staged copy (no copy, no second buffer), and last.ckpt still holds exactly that step's state."""
    ck = tmp_path / "ck"
    mc = ModelCheckpoint(dirpath=ck, every_n_train_steps=2, save_top_k=-1, save_last=True)
    cb = AsyncCheckpointCallback(dirpath=str(tmp_path / "own"), save_on_train_end=False)
    plugin = AsyncCheckpointIO()
    model = TinyModel()
    model.record_snapshots = True
    trainer = helpers.trainer(tmp_path, max_steps=4, plugins=[plugin], callbacks=[cb, mc], enable_checkpointing=True)
    stagers = []
    original = plugin._ensure_checkpointer

    def spy():
        checkpointer = original()
        if checkpointer.stager not in stagers:
            stagers.append(checkpointer.stager)
        return checkpointer

    plugin._ensure_checkpointer = spy
    trainer.fit(model, helpers.loader())
    assert sum(s.shared_saves for s in stagers) >= 2  # steps 2 and 4: last.ckpt shared the top-k copy
    assert all(s.allocations == 1 for s in stagers)
    last = torch.load(ck / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4
    helpers.assert_trees_equal(last["state_dict"], model.snapshots[4]["state_dict"])
    helpers.assert_trees_equal(last["optimizer_states"], model.snapshots[4]["optimizer_states"])


@pytest.mark.parametrize("with_callback", [True, False], ids=["callback", "plugin_alone"])
def test_saves_of_one_step_share_one_staged_copy_with_a_monitored_model_checkpoint(with_callback, tmp_path,
                                                                                   monkeypatch):
    """A monitored ModelCheckpoint (its best score changes between the saves of a step) with save_last=True, and
    our callback at the same steps: one copy of the state per step, one buffer, and each file holds its own
    scores and that step's weights."""
    from lightning_ckpt.staging import DefaultStager

    copies = []
    original_copy = DefaultStager._copy

    def counting_copy(self, *args, **kwargs):
        copies.append(1)
        return original_copy(self, *args, **kwargs)

    monkeypatch.setattr(DefaultStager, "_copy", counting_copy)
    ck = tmp_path / "ck"
    mc = ModelCheckpoint(dirpath=ck, monitor="train_loss", every_n_train_steps=2, save_top_k=2, save_last=True)
    own = ([AsyncCheckpointCallback(dirpath=str(tmp_path / "own"), every_n_train_steps=2, save_on_train_end=False)]
           if with_callback else [])
    plugin = AsyncCheckpointIO()
    model = TinyModel()
    model.record_snapshots = True
    trainer = helpers.trainer(tmp_path, max_steps=4, plugins=[plugin], callbacks=[*own, mc], enable_checkpointing=True)
    trainer.fit(model, helpers.loader())
    assert len(copies) == 2  # steps 2 and 4, whatever the number of saves per step (2 or 3)
    saves_per_step = 3 if with_callback else 2
    assert len(plugin.binding.saves) == 2 * saves_per_step
    for name in helpers.final_files(ck):
        saved = torch.load(ck / name, weights_only=False)
        state = saved["callbacks"][mc.state_key]
        helpers.assert_trees_equal(saved["state_dict"], model.snapshots[saved["global_step"]]["state_dict"])
        if name != "last.ckpt":
            assert state["best_k_models"][str(ck / name)] == state["current_score"]  # its own score, not shared


class _SaveClipSave(Callback):
    """At step 2: saves, clips the weights through ``.data`` (WGAN-style: no version counter moves), saves again."""

    def __init__(self, directory):
        self.directory = str(directory)
        self.before = self.after = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            self.before = pl_module.net[0].weight.detach().clone()
            trainer.save_checkpoint(os.path.join(self.directory, "a.ckpt"))
            pl_module.net[0].weight.data.clamp_(-1e-3, 1e-3)
            self.after = pl_module.net[0].weight.detach().clone()
            trainer.save_checkpoint(os.path.join(self.directory, "b.ckpt"))


@pytest.mark.parametrize("with_callback", [True, False], ids=["callback", "plugin_alone"])
def test_two_saves_of_a_step_from_a_users_callback_each_hold_the_weights_of_their_moment(with_callback, tmp_path):
    """A user's callback saves, writes the weights through ``.data`` and saves again at the same step: the
    second file holds the written weights (the two saves never share one staged copy)."""
    clipper = _SaveClipSave(tmp_path)
    trainer = helpers.trainer(tmp_path, max_steps=3, plugins=[AsyncCheckpointIO()],
                              callbacks=[*_own(tmp_path, with_callback), clipper])
    trainer.fit(TinyModel(), helpers.loader())
    a = torch.load(tmp_path / "a.ckpt", weights_only=False)["state_dict"]["net.0.weight"]
    b = torch.load(tmp_path / "b.ckpt", weights_only=False)["state_dict"]["net.0.weight"]
    assert torch.equal(a, clipper.before) and torch.equal(b, clipper.after)
    assert not torch.equal(a, b)


class _Clipper(Callback):
    """Clips the weights through ``.data`` after every step (between our callback's save and ModelCheckpoint's)."""

    def __init__(self):
        self.before = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.before[trainer.global_step] = pl_module.net[0].weight.detach().clone()
        pl_module.net[0].weight.data.clamp_(-1e-3, 1e-3)


def test_a_users_callback_between_our_save_and_model_checkpoints_starts_a_new_staged_copy(tmp_path):
    """Ours saves at step 2, a user's callback then writes the weights through ``.data``, ModelCheckpoint saves
    the same step: its file holds the written weights, ours the earlier ones; without the user's callback in
    between, the two saves share one copy."""
    from lightning_ckpt.staging import DefaultStager

    ours = AsyncCheckpointCallback(dirpath=str(tmp_path / "own"), every_n_train_steps=2, save_on_train_end=False)
    mc = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1)
    plugin = AsyncCheckpointIO()
    model, clipper = TinyModel(), _Clipper()
    trainer = helpers.trainer(tmp_path, max_steps=2, plugins=[plugin], callbacks=[ours, clipper, mc],
                              enable_checkpointing=True)
    assert [type(c) for c in trainer.callbacks[-3:]] == [AsyncCheckpointCallback, _Clipper, ModelCheckpoint]
    stagers = []
    original = plugin._ensure_checkpointer
    plugin._ensure_checkpointer = lambda: stagers.append(original().stager) or original()
    trainer.fit(model, helpers.loader())
    mine = torch.load(tmp_path / "own" / "step=2.ckpt", weights_only=False)["state_dict"]["net.0.weight"]
    theirs = torch.load(tmp_path / "ck" / "epoch=0-step=2.ckpt", weights_only=False)["state_dict"]["net.0.weight"]
    assert torch.equal(theirs, model.net[0].weight.detach()) and theirs.abs().max() <= 1e-3
    assert torch.equal(mine, clipper.before[2]) and mine.abs().max() > 1e-3
    assert stagers and all(isinstance(s, DefaultStager) and s.shared_saves == 0 for s in stagers)
