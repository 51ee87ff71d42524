"""Step-named remote checkpoints are never overwritten by another run: single objects and layout "dir" checkpoints
(whose commit, the manifest PUT, is then conditional) alike; other names are replaced as before."""

from __future__ import annotations

import pytest
import torch

from lightning_ckpt.builder import make_sync_checkpointer

pytestmark = pytest.mark.remote


def save_dir(url: str, state: dict) -> None:
    checkpointer = make_sync_checkpointer()
    try:
        checkpointer.save(url, state)
    finally:
        checkpointer.close()


def load_dir(url: str) -> dict:
    checkpointer = make_sync_checkpointer()
    try:
        return checkpointer.load(url)
    finally:
        checkpointer.close()


def test_a_step_named_dir_checkpoint_of_another_run_is_refused_and_left_whole(s3):
    url = f"{s3.url}/run/step=10"
    save_dir(url, {"w": torch.zeros(3)})
    theirs = s3.keys()
    with pytest.raises(FileExistsError, match="already exists"):
        save_dir(url, {"w": torch.ones(3)})
    assert torch.equal(load_dir(url)["w"], torch.zeros(3))
    assert s3.keys() == theirs  # the refused save's generation is deleted, theirs untouched
    assert s3.uploads() == []


def test_a_dir_checkpoint_without_a_step_in_its_name_is_replaced(s3):
    url = f"{s3.url}/run/last"
    save_dir(url, {"w": torch.zeros(3)})
    save_dir(url, {"w": torch.ones(3)})
    assert torch.equal(load_dir(url)["w"], torch.ones(3))
    assert len([k for k in s3.keys() if k.endswith("checkpoint_0.pt")]) == 1
