"""When a remote save becomes a server-side copy of the previous upload instead of an upload: only ModelCheckpoint's
``save_last=True`` save of the checkpoint it has just uploaded, only once that upload committed, and a copy made
outside the training loop has happened (or raised) when the save returns."""

from __future__ import annotations

import io

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_ckpt.errors import CheckpointWriteError
from lightning_ckpt.lightning import AsyncCheckpointIO, SyncCheckpointIO
from tests.lightning.helpers import TinyModel, loader, trainer

pytestmark = [pytest.mark.lightning, pytest.mark.remote]
PLUGINS = [AsyncCheckpointIO, SyncCheckpointIO]


def stored(s3, key: str) -> dict:
    return torch.load(io.BytesIO(s3.get(key)), weights_only=False)


@pytest.mark.timeout(120)
def test_a_full_checkpoint_at_the_step_of_a_weights_only_one_is_uploaded_whole(s3, empty_cwd, tmp_path):
    dirpath = f"{s3.url}/run"
    callbacks = [ModelCheckpoint(dirpath=dirpath, filename="weights-{step}", save_weights_only=True,
                                 every_n_train_steps=1, save_top_k=-1),
                 ModelCheckpoint(dirpath=dirpath, filename="full-{step}", every_n_train_steps=2, save_top_k=-1)]
    trainer(tmp_path, max_steps=2, callbacks=callbacks, plugins=[AsyncCheckpointIO()],
            enable_checkpointing=True).fit(TinyModel(), loader())

    assert s3.keys() == ["run/full-step=2.ckpt", "run/weights-step=1.ckpt", "run/weights-step=2.ckpt"]
    assert "optimizer_states" in stored(s3, "run/full-step=2.ckpt")
    assert "optimizer_states" not in stored(s3, "run/weights-step=2.ckpt")
    assert s3.server.ops("CopyObject") == []


@pytest.mark.parametrize("plugin_cls", PLUGINS, ids=lambda c: c.__name__)
def test_weights_changed_through_data_at_the_same_step_are_uploaded_not_copied(plugin_cls, s3):
    model = torch.nn.Linear(4, 4)
    plugin = plugin_cls()
    plugin.save_checkpoint({"state_dict": model.state_dict(), "global_step": 7}, f"{s3.url}/run/a.ckpt")
    plugin.wait_for_saves()
    model.weight.data.add_(1.0)  # bumps no version counter
    plugin.save_checkpoint({"state_dict": model.state_dict(), "global_step": 7}, f"{s3.url}/run/b.ckpt")
    plugin.teardown()

    assert torch.equal(stored(s3, "run/b.ckpt")["state_dict"]["weight"], model.weight.detach())
    assert not torch.equal(stored(s3, "run/a.ckpt")["state_dict"]["weight"], model.weight.detach())
    assert s3.server.ops("CopyObject") == []


@pytest.mark.parametrize("plugin_cls", PLUGINS, ids=lambda c: c.__name__)
@pytest.mark.timeout(120)
def test_save_last_after_a_refused_step_save_never_copies_the_object_of_another_run(plugin_cls, s3, empty_cwd,
                                                                                     tmp_path):
    dirpath = f"{s3.url}/run"
    other = SyncCheckpointIO()  # another run wrote step=1 (step-named objects are never overwritten)
    other.save_checkpoint({"state_dict": {"w": torch.full((3,), 9.0)}, "global_step": 1}, f"{dirpath}/step=1.ckpt")
    other.teardown()
    theirs = s3.get("run/step=1.ckpt")

    module = TinyModel()
    mc = ModelCheckpoint(dirpath=dirpath, filename="{step}", save_last=True, every_n_train_steps=1,
                         enable_version_counter=False)
    trainer(tmp_path, max_steps=1, callbacks=[mc], plugins=[plugin_cls(error_policy="warn")],
            enable_checkpointing=True).fit(module, loader())

    assert s3.get("run/step=1.ckpt") == theirs
    assert s3.server.ops("CopyObject") == []
    if plugin_cls is SyncCheckpointIO:  # the refusal is known before last.ckpt is saved: it is uploaded
        last = stored(s3, "run/last.ckpt")
        for name, value in module.state_dict().items():
            assert torch.equal(last["state_dict"][name], value), name
    else:  # refused after last.ckpt was requested: that copy is skipped (the old last.ckpt stays)
        assert "run/last.ckpt" not in s3.keys()


class _SigtermArrives(Callback):
    """SIGTERM reached the trainer during the step (what Lightning's handler sets): its saves commit at once."""

    def on_train_batch_end(self, trainer, *args) -> None:
        trainer._signal_connector.received_sigterm = True


@pytest.mark.parametrize("plugin_cls", PLUGINS, ids=lambda c: c.__name__)
@pytest.mark.timeout(120)
def test_a_copy_that_must_commit_before_returning_raises_from_its_save_when_it_fails(plugin_cls, s3, empty_cwd,
                                                                                      tmp_path):
    plugin = plugin_cls()
    outcomes = []
    real_save = plugin.save_checkpoint

    def save(checkpoint, path, storage_options=None):
        try:
            real_save(checkpoint, path, storage_options)
        except Exception as e:
            outcomes.append((str(path).rsplit("/", 1)[-1], e))
            raise
        outcomes.append((str(path).rsplit("/", 1)[-1], None))

    plugin.save_checkpoint = save
    s3.server.set_faults({"op": "CopyObject", "action": "error", "status": 403, "code": "AccessDenied"})
    mc = ModelCheckpoint(dirpath=f"{s3.url}/run", save_last=True, every_n_train_steps=1)
    with pytest.raises(CheckpointWriteError, match="server-side copy .* failed"):
        trainer(tmp_path, max_steps=1, callbacks=[_SigtermArrives(), mc], plugins=[plugin],
                enable_checkpointing=True).fit(TinyModel(), loader())

    (first, error), (last, copy_error) = outcomes
    assert first == "epoch=0-step=1.ckpt" and error is None
    assert last == "last.ckpt" and isinstance(copy_error, CheckpointWriteError), outcomes
    assert len(s3.server.ops("CopyObject", "run/last.ckpt")) == 1
    assert s3.keys() == ["run/epoch=0-step=1.ckpt"]


@pytest.mark.timeout(120)
def test_save_last_outside_the_loop_is_a_copy_made_before_the_save_returns(s3, empty_cwd, tmp_path):
    plugin = AsyncCheckpointIO()
    keys_when_returned = []
    real_save = plugin.save_checkpoint

    def save(checkpoint, path, storage_options=None):
        real_save(checkpoint, path, storage_options)
        keys_when_returned.append(s3.keys())

    plugin.save_checkpoint = save
    mc = ModelCheckpoint(dirpath=f"{s3.url}/run", save_last=True, every_n_train_steps=1)
    with pytest.raises(SIGTERMException):  # Lightning stops the fit after the step
        trainer(tmp_path, max_steps=1, callbacks=[_SigtermArrives(), mc], plugins=[plugin],
                enable_checkpointing=True).fit(TinyModel(), loader())

    assert keys_when_returned[-1] == ["run/epoch=0-step=1.ckpt", "run/last.ckpt"]
    assert len(s3.server.ops("CopyObject", "run/last.ckpt")) == 1 and not s3.server.ops("UploadPart", "last")
    assert s3.get("run/last.ckpt") == s3.get("run/epoch=0-step=1.ckpt")
