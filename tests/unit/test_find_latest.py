"""find_latest picks the newest checkpoint it can prove complete, skips (and logs) what it cannot use, and never runs
code from the files it looks at."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from lightning_ckpt import latest
from lightning_ckpt.latest import find_latest_checkpoint, is_complete
from tests.unit._crafted import rewrite_checksum_record, write_code_checkpoint, write_ours


def _state(step: int) -> dict:
    return {"state_dict": {"w": torch.full((16,), float(step))}, "global_step": step}


@pytest.fixture
def ckpt_dir(tmp_path):
    for step in (3, 5):
        write_ours(tmp_path / f"step={step}.ckpt", _state(step))
    return tmp_path


@pytest.mark.parametrize("verify", [False, True])
def test_find_latest_never_unpickles_code_from_a_crafted_checkpoint(ckpt_dir, tmp_path, verify):
    marker = str(tmp_path / "code-ran")
    write_code_checkpoint(str(ckpt_dir / "step=9.ckpt"), marker)
    found = find_latest_checkpoint(str(ckpt_dir), verify=verify)
    assert not os.path.exists(marker), "verification unpickled the crafted checkpoint"
    assert found == str(ckpt_dir / "step=9.ckpt")  # its bytes match its checksums; nothing was run to learn that


def test_the_callbacks_find_latest_never_unpickles_code_either(ckpt_dir, tmp_path):
    from lightning_ckpt.lightning import AsyncCheckpointCallback

    marker = str(tmp_path / "code-ran")
    write_code_checkpoint(str(ckpt_dir / "step=9.ckpt"), marker)
    AsyncCheckpointCallback.find_latest(str(ckpt_dir), verify=True)
    assert not os.path.exists(marker)


def test_find_latest_skips_a_dangling_symlink_and_logs_it(ckpt_dir, caplog):
    os.symlink(ckpt_dir / "gone.ckpt", ckpt_dir / "step=9.ckpt")
    with caplog.at_level(logging.WARNING, logger="lightning_ckpt.latest"):
        assert find_latest_checkpoint(str(ckpt_dir), verify=True) == str(ckpt_dir / "step=5.ckpt")
    assert "step=9.ckpt" in caplog.text


def test_find_latest_skips_a_checkpoint_pruned_while_it_lists(ckpt_dir, monkeypatch, caplog):
    real_listdir = os.listdir
    monkeypatch.setattr(latest.os, "listdir", lambda d: real_listdir(d) + ["step=7.ckpt"])  # pruned after listing
    with caplog.at_level(logging.WARNING, logger="lightning_ckpt.latest"):
        assert find_latest_checkpoint(str(ckpt_dir)) == str(ckpt_dir / "step=5.ckpt")
    assert "step=7.ckpt" in caplog.text


def test_find_latest_skips_a_newest_checkpoint_removed_after_it_was_listed(ckpt_dir, monkeypatch):
    real_check = latest.check_checkpoint

    def removed_first(path, **kwargs):
        if path.endswith("step=5.ckpt") and os.path.exists(path):
            os.remove(path)
        return real_check(path, **kwargs)

    monkeypatch.setattr(latest, "check_checkpoint", removed_first)
    assert find_latest_checkpoint(str(ckpt_dir)) == str(ckpt_dir / "step=3.ckpt")


@pytest.mark.parametrize("verify", [False, True])
def test_find_latest_skips_a_malformed_checksum_record(ckpt_dir, verify, caplog):
    rewrite_checksum_record(str(ckpt_dir / "step=5.ckpt"), lambda r: {**r, "key_paths": [[[["x"]], "0"]]})
    with caplog.at_level(logging.WARNING, logger="lightning_ckpt.latest"):
        assert find_latest_checkpoint(str(ckpt_dir), verify=verify) == str(ckpt_dir / "step=3.ckpt")
    assert "key_paths" in caplog.text


def test_find_latest_with_verify_skips_a_flipped_tensor_byte(ckpt_dir):
    path = ckpt_dir / "step=5.ckpt"
    data = bytearray(path.read_bytes())
    data[bytes(data).find(torch.full((16,), 5.0).numpy().tobytes()) + 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert find_latest_checkpoint(str(ckpt_dir), verify=False) == str(path)  # structure alone cannot tell
    assert find_latest_checkpoint(str(ckpt_dir), verify=True) == str(ckpt_dir / "step=3.ckpt")


def test_temp_names_and_plain_torch_files_never_count(ckpt_dir):
    torch.save(_state(8), ckpt_dir / "step=8.ckpt")  # not ours: no checksums, so not provably complete
    os.mkdir(ckpt_dir / ".lckpt-0123456789abcdef.tmp")
    assert find_latest_checkpoint(str(ckpt_dir)) == str(ckpt_dir / "step=5.ckpt")
    assert not is_complete(str(ckpt_dir / ".lckpt-0123456789abcdef.tmp"))
    assert not is_complete(str(ckpt_dir / ".step=5.ckpt.lckpt-tmp.host.1.abc"))
