"""Lightning Trainer runs with an s3:// dirpath: ModelCheckpoint top-k and last.ckpt, and resuming from the store."""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ckpt.lightning import AsyncCheckpointCallback, AsyncCheckpointIO
from tests.lightning.helpers import TinyModel, loader, trainer

pytestmark = [pytest.mark.lightning, pytest.mark.remote]


@pytest.mark.timeout(180)
def test_model_checkpoint_top2_and_last_leave_exactly_three_objects_and_last_is_a_server_side_copy(
        s3, empty_cwd, tmp_path):
    mc = ModelCheckpoint(dirpath=f"{s3.url}/run", monitor="step", mode="max", save_top_k=2, save_last=True,
                         every_n_train_steps=1)
    plugin = AsyncCheckpointIO()
    fit = trainer(tmp_path / "root", max_steps=6, callbacks=[mc], plugins=[plugin], enable_checkpointing=True)
    fit.fit(TinyModel(), loader())

    keys = s3.keys()
    assert len(keys) == 3 and "run/last.ckpt" in keys, keys
    assert set(keys) - {"run/last.ckpt"} == {os.path.relpath(p, s3.url) for p in mc.best_k_models}
    copies = s3.server.ops("CopyObject", "run/last.ckpt")
    assert len(copies) == 6  # one server-side copy per step ...
    assert not s3.server.ops("UploadPart", "last.ckpt") and not s3.server.ops("CreateMultipartUpload", "last")
    assert len(s3.server.ops("CompleteMultipartUpload")) == 6  # ... and one upload per step, no second one
    last = plugin.load_checkpoint(f"{s3.url}/run/last.ckpt")
    assert last["global_step"] == 6
    assert s3.uploads() == []
    assert os.listdir(empty_cwd) == []


@pytest.mark.timeout(180)
def test_resume_from_a_remote_last_ckpt_restores_the_weights(s3, empty_cwd, tmp_path):
    dirpath = f"{s3.url}/run"
    first = TinyModel()
    fit = trainer(tmp_path / "a", max_steps=3, plugins=[AsyncCheckpointIO()], enable_checkpointing=True,
                  callbacks=[ModelCheckpoint(dirpath=dirpath, save_last=True, every_n_train_steps=1)])
    fit.fit(first, loader())

    resumed = TinyModel()
    plugin = AsyncCheckpointIO()
    loads = []
    real_load = plugin.load_checkpoint
    plugin.load_checkpoint = lambda path, *a, **k: loads.append(path) or real_load(path, *a, **k)
    again = trainer(tmp_path / "b", max_steps=3, plugins=[plugin], enable_checkpointing=True,
                    callbacks=[ModelCheckpoint(dirpath=dirpath, save_last=True, every_n_train_steps=1)])
    # Lightning's ckpt_path="last" cannot find remote files (its listing drops the s3:// prefix): name the object
    again.fit(resumed, loader(), ckpt_path=f"{dirpath}/last.ckpt")
    assert loads == [f"{dirpath}/last.ckpt"] and again.global_step == 3
    for name, value in first.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert os.listdir(empty_cwd) == []


@pytest.mark.timeout(180)
def test_callback_keeps_the_last_two_remote_checkpoints_and_resumes_from_the_newest(s3, empty_cwd, tmp_path):
    dirpath = f"{s3.url}/cb"
    first = TinyModel()
    callback = AsyncCheckpointCallback(dirpath=dirpath, every_n_train_steps=1, keep_last_k=2)
    trainer(tmp_path / "a", max_steps=5, plugins=[AsyncCheckpointIO()], callbacks=[callback]).fit(first, loader())
    assert s3.keys() == ["cb/step=4.ckpt", "cb/step=5.ckpt"]

    s3.client.put_object(Bucket=s3.name, Key="cb/step=9.ckpt", Body=b"not a checkpoint")  # foreign, newest name
    s3.server.clear_log()
    latest = AsyncCheckpointCallback.find_latest(dirpath)
    assert latest == f"{dirpath}/step=5.ckpt"
    tails = [o for o in s3.server.ops("GetObject") if o["range"] and o["range"].startswith("bytes=-")]
    assert [o["key"] for o in tails] == ["cb/step=9.ckpt", "cb/step=5.ckpt"]  # the records, by ranged GETs

    resumed = TinyModel()
    again = trainer(tmp_path / "b", max_steps=5, plugins=[AsyncCheckpointIO()],
                    callbacks=[AsyncCheckpointCallback(dirpath=dirpath, every_n_train_steps=1, keep_last_k=2)])
    again.fit(resumed, loader(), ckpt_path=latest)
    assert again.global_step == 5
    for name, value in first.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert os.listdir(empty_cwd) == []


@pytest.mark.timeout(180)
def test_fit_with_ckpt_path_last_resumes_from_the_remote_last_ckpt(s3, empty_cwd, tmp_path, installed_entry_points):
    dirpath = f"{s3.url}/run"
    first = TinyModel()
    trainer(tmp_path / "a", max_steps=3, plugins=[AsyncCheckpointIO()], enable_checkpointing=True,
            callbacks=[ModelCheckpoint(dirpath=dirpath, save_last=True, every_n_train_steps=1)]).fit(first, loader())

    resumed = TinyModel()
    again = trainer(tmp_path / "b", max_steps=3, plugins=[AsyncCheckpointIO()], enable_checkpointing=True,
                    callbacks=[ModelCheckpoint(dirpath=dirpath, save_last=True, every_n_train_steps=1)])
    again.fit(resumed, loader(), ckpt_path="last")  # Lightning lists the dirpath itself
    assert again.ckpt_path == f"{dirpath}/last.ckpt" and again.global_step == 3
    for name, value in first.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert os.listdir(empty_cwd) == []


def test_the_entry_point_changes_only_remote_model_checkpoints_of_trainers_using_our_plugin(installed_entry_points,
                                                                                              tmp_path):
    from lightning.pytorch import Trainer

    from lightning_ckpt.lightning.resume import RemoteLastCheckpoints

    options = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    theirs = ModelCheckpoint(dirpath="s3://bucket/a")
    Trainer(callbacks=[theirs], **options)  # Lightning's own CheckpointIO: left alone
    local, remote = ModelCheckpoint(dirpath=str(tmp_path / "local")), ModelCheckpoint(dirpath="s3://bucket/b",
                                                                                     monitor="loss")
    Trainer(callbacks=[local, remote], plugins=[AsyncCheckpointIO()], **options)
    assert "_find_last_checkpoints" not in theirs.__dict__ and "_find_last_checkpoints" not in local.__dict__
    assert isinstance(remote.__dict__["_find_last_checkpoints"], RemoteLastCheckpoints)
