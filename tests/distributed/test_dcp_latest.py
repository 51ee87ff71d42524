"""find_latest, is_complete and the command line over sharded (DCP) checkpoint directories saved by real gloo ranks:
committed ones count, ones without the manifest, temps and corrupted ones are skipped with the reason logged, and a
Lightning fit resumes from the newest sharded checkpoint it finds."""

from __future__ import annotations

import io
import logging
import os
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lightning_ckpt.cli import main as cli_main
from lightning_ckpt.commit import temp_name
from lightning_ckpt.dcp import DistributedCheckpointer, StorageWriter
from lightning_ckpt.dcp.manifest import DATA_FILE_TEMPLATE, METADATA_NAME
from lightning_ckpt.integrity import check_checkpoint, describe_checkpoint
from lightning_ckpt.latest import find_latest_checkpoint, is_complete
from lightning_ckpt.torch_zip import record_spans
from tests.distributed._dcp_states import sharded_state

pytestmark = [pytest.mark.multiprocess]

STEPS = (1, 2, 3)


def _save_steps(rank: int, world: int, root: str) -> None:
    """``step=N.ckpt`` for each step, as our sharded strategies write them (shards of every rank plus ``meta.pt``)."""
    for step in STEPS:
        writer = StorageWriter(os.path.join(root, f"step={step}.ckpt"))
        if rank == 0:
            meta = io.BytesIO()
            torch.save({"epoch": 0, "global_step": step}, meta)
            writer.add_file("meta.pt", meta.getvalue())
        DistributedCheckpointer(writer).save(sharded_state(world, step))


@pytest.fixture(scope="module")
def saved(ranks2, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sharded"))
    ranks2.run(_save_steps, root)
    return root


@pytest.fixture
def ckpt_dir(saved, tmp_path):
    """A fresh copy of the three committed sharded checkpoints, for a test to damage."""
    target = tmp_path / "run"
    shutil.copytree(saved, target)
    return target


def _flip_byte(path, offset_from_end: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - offset_from_end)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_committed_sharded_directories_are_complete_and_the_newest_is_found(ckpt_dir):
    newest = str(ckpt_dir / "step=3.ckpt")
    assert find_latest_checkpoint(str(ckpt_dir)) == newest
    assert find_latest_checkpoint(str(ckpt_dir), verify=True) == newest
    result = check_checkpoint(newest, deep=True)
    assert result.status == "verified", result
    assert sorted(os.path.basename(f) for f in result.files) == sorted(
        [METADATA_NAME, "meta.pt", DATA_FILE_TEMPLATE.format(rank=0), DATA_FILE_TEMPLATE.format(rank=1)])
    assert result.hashed_bytes >= sum(os.path.getsize(f) for f in result.files if f.endswith(".distcp"))
    assert check_checkpoint(newest, deep=False).status == "complete"


def test_a_directory_without_manifest_is_skipped_and_the_reason_logged(ckpt_dir, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save({"w": torch.ones(4)}, checkpoint_id=str(ckpt_dir / "step=4.ckpt"), no_dist=True)  # plain DCP
    os.remove(ckpt_dir / "step=3.ckpt" / "MANIFEST.json")  # as if our save never committed
    with caplog.at_level(logging.WARNING, logger="lightning_ckpt.latest"):
        assert find_latest_checkpoint(str(ckpt_dir)) == str(ckpt_dir / "step=2.ckpt")
    assert "step=4.ckpt: incomplete" in caplog.text and "DCP directory without MANIFEST.json" in caplog.text
    assert "step=3.ckpt: incomplete" in caplog.text


def test_a_temp_of_a_sharded_save_is_never_a_checkpoint(ckpt_dir):
    temp = ckpt_dir / temp_name("0123456789abcdef")
    shutil.copytree(ckpt_dir / "step=3.ckpt", temp)  # complete bytes, but a temp name: never committed
    assert not is_complete(str(temp), verify=True)
    assert check_checkpoint(temp).status == "incomplete"
    assert find_latest_checkpoint(str(ckpt_dir)) == str(ckpt_dir / "step=3.ckpt")


def test_a_flipped_chunk_byte_is_skipped_with_verify(ckpt_dir, caplog):
    _flip_byte(ckpt_dir / "step=3.ckpt" / DATA_FILE_TEMPLATE.format(rank=1))
    assert find_latest_checkpoint(str(ckpt_dir)) == str(ckpt_dir / "step=3.ckpt")  # sizes and records still agree
    with caplog.at_level(logging.WARNING, logger="lightning_ckpt.latest"):
        assert find_latest_checkpoint(str(ckpt_dir), verify=True) == str(ckpt_dir / "step=2.ckpt")
    assert "step=3.ckpt: corrupt" in caplog.text and "checksum mismatch" in caplog.text
    result = check_checkpoint(ckpt_dir / "step=3.ckpt")
    assert result.status == "corrupt" and "__1_0.distcp@" in result.detail


@pytest.mark.parametrize("damage", ["truncated shard", "flipped metadata byte", "flipped meta.pt byte",
                                    "missing shard"])
def test_structural_damage_is_skipped_even_without_verify(ckpt_dir, damage, caplog):
    victim = ckpt_dir / "step=3.ckpt"
    if damage == "truncated shard":
        shard = victim / DATA_FILE_TEMPLATE.format(rank=0)
        os.truncate(shard, os.path.getsize(shard) - 1)
    elif damage == "flipped metadata byte":
        _flip_byte(victim / METADATA_NAME, offset_from_end=10)
    elif damage == "flipped meta.pt byte":
        _flip_byte(victim / "meta.pt", offset_from_end=10)
    else:
        os.remove(victim / DATA_FILE_TEMPLATE.format(rank=1))
    with caplog.at_level(logging.WARNING, logger="lightning_ckpt.latest"):
        assert find_latest_checkpoint(str(ckpt_dir)) == str(ckpt_dir / "step=2.ckpt")
    assert "skipping" in caplog.text and "step=3.ckpt" in caplog.text


def test_the_command_line_verifies_finds_and_inspects_sharded_checkpoints(ckpt_dir, capsys):
    good, bad = str(ckpt_dir / "step=2.ckpt"), str(ckpt_dir / "step=3.ckpt")
    _flip_byte(os.path.join(bad, DATA_FILE_TEMPLATE.format(rank=0)))
    assert cli_main(["verify", good]) == 0
    assert capsys.readouterr().out.startswith("VERIFIED")
    assert cli_main(["verify", good, bad]) == 1
    assert "CORRUPT" in capsys.readouterr().out
    assert cli_main(["verify", "--quick", bad]) == 0  # structure only: the bytes are not hashed
    capsys.readouterr()
    assert cli_main(["latest", "--verify", str(ckpt_dir)]) == 0
    assert capsys.readouterr().out.strip() == good
    info = describe_checkpoint(good)
    assert info["status"] == "verified" and info["world_size"] == 2 and info["global_step"] == 2
    assert info["chunks"] == 3  # "w" from each rank, and the pickled non-tensor leaf
    assert cli_main(["inspect", good]) == 0
    assert "a sharded DCP checkpoint" in capsys.readouterr().out


# ---------------------------------------------------------------- Lightning: resume from the newest sharded checkpoint


def _fit_then_resume(rank: int, world: int, root: str) -> dict:
    """Fit 3 steps with our ModelParallelStrategy saving every step (and last.ckpt); corrupt step=3's shard;
    resume from what ``find_latest_checkpoint(verify=True)`` finds, and from ``ckpt_path="last"``."""
    import lightning.pytorch as pl
    import torch.distributed as dist
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from lightning_ckpt.lightning import find_latest_checkpoint as resume_helper
    from tests.distributed.test_lightning_strategies import _module_class, _strategy

    class StartStep(Callback):
        def on_train_start(self, trainer, pl_module):
            self.step = trainer.global_step

    def fit(max_steps: int, ckpt_path: str | None = None, callbacks: list | None = None) -> int:
        start = StartStep()
        trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=_strategy("model_parallel", True, world),
                             max_steps=max_steps, logger=False, callbacks=[start, *(callbacks or [])],
                             enable_checkpointing=bool(callbacks), enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=root)
        trainer.fit(_module_class("model_parallel")(seed=0), ckpt_path=ckpt_path)
        return start.step

    dirpath = os.path.join(root, "ckpts")
    fit(3, callbacks=[ModelCheckpoint(dirpath=dirpath, filename="{step}", every_n_train_steps=1, save_top_k=-1,
                                      save_last=True)])
    newest = resume_helper(dirpath, verify=True)
    dist.barrier()
    if rank == 0:
        _flip_byte(os.path.join(dirpath, "step=3.ckpt", DATA_FILE_TEMPLATE.format(rank=1)))
    dist.barrier()
    found = resume_helper(dirpath, verify=True)
    start_found = fit(4, ckpt_path=found)
    # "last": Lightning looks for last.ckpt in the dirpath of the trainer's ModelCheckpoint
    start_last = fit(4, ckpt_path="last", callbacks=[ModelCheckpoint(dirpath=dirpath, save_last=True)])
    return {"newest": newest, "found": found, "start_found": start_found, "start_last": start_last}


@pytest.mark.lightning
@pytest.mark.timeout(300)
def test_lightning_resumes_from_the_newest_complete_sharded_checkpoint(tmp_path):
    from tests.distributed.launcher import run_ranks

    dirpath = str(tmp_path / "ckpts")
    for out in run_ranks(_fit_then_resume, 2, str(tmp_path), init_process_group=False, timeout_secs=240):
        assert out["newest"] == os.path.join(dirpath, "step=3.ckpt")
        assert out["found"] == os.path.join(dirpath, "step=2.ckpt")  # step=3 is corrupt: skipped
        assert out["start_found"] == 2
        assert out["start_last"] == 3  # last.ckpt: a separate, committed sharded directory


def _async_save(rank: int, world: int, path: str) -> None:
    checkpointer = DistributedCheckpointer(StorageWriter(path))
    try:
        checkpointer.async_save(sharded_state(world, 7)).result(timeout=120)
    finally:
        checkpointer.close()


def test_an_async_sharded_save_written_by_the_writer_process_verifies_and_a_flipped_record_byte_is_caught(
        ranks2, tmp_path):
    # The writer process records each chunk's zip records (not one xxh3 per chunk): the check must read both kinds.
    path = str(tmp_path / "step=7.ckpt")
    ranks2.run(_async_save, path)
    manifest = check_checkpoint(path, deep=True)
    assert manifest.status == "verified", manifest
    assert any("records" in entry for entry in manifest.manifest["chunks"].values())
    chunk = os.path.join(path, max((f for f in os.listdir(path) if f.endswith(".distcp")),
                                   key=lambda f: os.path.getsize(os.path.join(path, f))))
    with open(chunk, "rb") as f:
        start, size = next(span for name, span in record_spans(f, chunk).items() if name.startswith("data/"))
    _flip_byte(chunk, offset_from_end=os.path.getsize(chunk) - (start + size // 2))  # inside a tensor record
    assert check_checkpoint(path, deep=True).status == "corrupt"
    assert find_latest_checkpoint(str(tmp_path), verify=True) is None
