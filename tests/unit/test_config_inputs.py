"""Configs and callback arguments that could only fail later (mid-fit, at ``wait``) are refused when given, naming
the field and the value."""

from __future__ import annotations

import math

import pytest

from lightning_ckpt import CheckpointerConfig, CheckpointStagerConfig, make_async_checkpointer

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("value", [math.inf, 1e300, math.nan, 0.0])
def test_a_wait_timeout_that_no_wait_can_honour_is_refused(value):
    with pytest.raises(ValueError, match="wait_timeout_secs"):
        CheckpointerConfig(wait_timeout_secs=value)


def test_the_async_checkpointer_without_shared_memory_is_refused_before_any_save():
    config = CheckpointerConfig(staging_config=CheckpointStagerConfig(use_shared_memory=False))
    with pytest.raises(ValueError, match="make_async_checkpointer: .*use_shared_memory"):
        make_async_checkpointer(config)
    from lightning_ckpt.lightning import AsyncCheckpointIO, SyncCheckpointIO

    with pytest.raises(ValueError, match="AsyncCheckpointIO.config: .*use_shared_memory"):
        AsyncCheckpointIO(config={"staging_config": {"use_shared_memory": False}})
    SyncCheckpointIO(config=config)  # writes in the training thread: no shared memory needed


@pytest.mark.parametrize("kwargs, field", [
    ({"filename": "{step}_{foo}"}, "filename"),
    ({"filename": "{step}{"}, "filename"),
    ({"filename": "step={step:05d}"}, "filename"),  # saved as step=00005.ckpt, which resume would never find
    ({"filename": "{epoch!r}-{step}"}, "filename"),
    ({"filename": None}, "filename"),
    ({"every_n_train_steps": 2.5}, "every_n_train_steps"),
    ({"every_n_train_steps": "5"}, "every_n_train_steps"),
    ({"keep_last_k": True}, "keep_last_k"),
    ({"keep_last_k": 1.5}, "keep_last_k"),
    ({"every_n_seconds": math.nan}, "every_n_seconds"),
    ({"save_on_train_end": "no"}, "save_on_train_end"),
    ({"overlap_staging": "no"}, "overlap_staging"),
    ({"dirpath": 5}, "dirpath"),
])
def test_callback_arguments_of_the_wrong_type_or_pattern_are_refused_naming_the_field(kwargs, field):
    from lightning_ckpt.lightning import AsyncCheckpointCallback

    with pytest.raises(ValueError, match=rf"AsyncCheckpointCallback\.{field}"):
        AsyncCheckpointCallback(**kwargs)


def test_callback_arguments_of_the_right_types_are_taken():
    from lightning_ckpt.lightning import AsyncCheckpointCallback

    cb = AsyncCheckpointCallback(dirpath="ck", filename="run-{epoch}-{step}.ckpt", every_n_train_steps=5,
                                 every_n_seconds=30, keep_last_k=2, save_on_train_end=False, overlap_staging=True)
    assert (cb.filename, cb.every_n_train_steps, cb.keep_last_k) == ("run-{epoch}-{step}", 5, 2)
