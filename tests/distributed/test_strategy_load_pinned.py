"""A sharded Lightning load reads one committed version, even when a save commits over the path mid-load.

Lightning reads a sharded checkpoint in passes by path: the model's shards, each optimizer's, then ``meta.pt`` (the
loop state). Here a real commit replaces the checkpoint with another run's right after the model's pass; the
resume must still get the optimizer and loop state of the checkpoint whose model it loaded.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.multiprocess, pytest.mark.lightning, pytest.mark.timeout(300)]


def _overwrite(target: str, source: str) -> None:
    """Commit ``source``'s checkpoint directory over ``target`` (an exchange, as a save over it does)."""
    from lightning_ckpt.commit import Commit

    with Commit.create(target, directory=True) as c:
        for name in sorted(os.listdir(source)):
            with open(os.path.join(source, name), "rb") as f:
                c.write_bytes(name, f.read())
        c.publish()


def _trainer(world: int, root: str, max_steps: int, callbacks: list | None = None):
    """A ModelParallel trainer of ``world`` CPU ranks, checkpointing only through ``callbacks``."""
    import lightning.pytorch as pl

    from tests.distributed.test_lightning_strategies import _strategy

    return pl.Trainer(accelerator="cpu", devices=world, strategy=_strategy("model_parallel", True, world),
                      max_steps=max_steps, logger=False, enable_checkpointing=bool(callbacks), callbacks=callbacks,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)


def _resume_while_overwritten(rank: int, world: int, root: str) -> dict:
    import lightning.pytorch as pl
    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_ckpt.lightning import strategies
    from tests.distributed.test_lightning_strategies import _full_params, _module_class

    module_cls = _module_class("model_parallel")

    def trainer(max_steps: int, callbacks: list | None = None) -> pl.Trainer:
        return _trainer(world, root, max_steps, callbacks)

    def fit(name: str, seed: int, steps: int) -> tuple[str, dict]:
        dirpath = os.path.join(root, name)
        every = ModelCheckpoint(dirpath=dirpath, filename="{step}", every_n_train_steps=steps, save_top_k=1)
        module = module_cls(seed=seed)
        t = trainer(steps, [every])
        t.fit(module)
        return os.path.join(dirpath, f"step={steps}.ckpt"), _full_params(t, module)

    loaded, _ = fit("loaded", 0, 2)
    other, _ = fit("other", 5, 3)  # another run's checkpoint, a step further
    real_load = strategies.load_verified
    passes = []

    def load_then_overwrite(state, path):
        real_load(state, path)
        passes.append(path)
        if len(passes) == 1:  # the model's pass is done: a save now commits over the checkpoint
            dist.barrier()
            if rank == 0:
                _overwrite(loaded, other)
            dist.barrier()

    strategies.load_verified = load_then_overwrite
    error = None
    try:
        second = trainer(2)
        second.fit(module_cls(seed=1), ckpt_path=loaded)
        step = second.global_step
    except Exception as e:  # noqa: BLE001 - the test asserts on what every rank raised
        error, step = f"{type(e).__name__}: {e}", None
    finally:
        strategies.load_verified = real_load
    dist.barrier()
    now_at_path = torch.load(os.path.join(loaded, "meta.pt"), weights_only=False)["global_step"]
    return {"step": step, "error": error, "passes": len(passes), "now_at_path": now_at_path}


def test_a_sharded_resume_spanning_an_overwrite_never_mixes_two_checkpoints(tmp_path):
    """The commit removes the replaced directory, so the version the load began with is gone before the
    optimizer's pass: that pass must fail naming the replacement, never read the other run's optimizer and loop
    state into the model it already loaded (which resumed at the other run's step 3 before)."""
    from tests.distributed.launcher import run_ranks

    for out in run_ranks(_resume_while_overwritten, 2, str(tmp_path), init_process_group=False, timeout_secs=240):
        assert out["now_at_path"] == 3  # the overwrite happened
        assert out["step"] is None, f"resumed at step {out['step']} from a mix of two checkpoints"
        assert out["error"].startswith("CheckpointError: ") and "was replaced by another save" in out["error"]
        assert out["passes"] == 1  # no pass after the overwrite returned data


def _resume_from_damaged(rank: int, world: int, root: str) -> list[str]:
    import lightning.pytorch as pl
    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.distributed.test_lightning_strategies import _module_class

    module_cls = _module_class("model_parallel")

    def trainer(max_steps: int, callbacks: list | None = None) -> pl.Trainer:
        return _trainer(world, root, max_steps, callbacks)

    dirpath = os.path.join(root, "ckpts")
    trainer(2, [ModelCheckpoint(dirpath=dirpath, filename="{step}", every_n_train_steps=2)]).fit(module_cls(seed=0))
    path = os.path.join(dirpath, "step=2.ckpt")
    errors = []
    for damaged in (sorted(n for n in os.listdir(path) if n.endswith(".distcp"))[0], "meta.pt"):
        dist.barrier()
        if rank == 0:
            with open(os.path.join(path, damaged), "r+b") as f:
                f.seek(-64, os.SEEK_END)
                f.write(b"\xff" * 64)
        dist.barrier()
        try:
            trainer(3).fit(module_cls(seed=1), ckpt_path=path)
            errors.append("resumed from a damaged checkpoint")
        except Exception as e:  # noqa: BLE001 - the test asserts on what every rank raised
            errors.append(f"{type(e).__name__}: {e}")
    return errors


def test_a_failed_sharded_load_names_the_users_path_not_the_pinned_descriptor(tmp_path):
    """The load reads through ``/proc/self/fd/<fd>``; what it raises names the checkpoint the user asked for."""
    from tests.distributed.launcher import run_ranks

    path = str(tmp_path / "ckpts" / "step=2.ckpt")
    for errors in run_ranks(_resume_from_damaged, 2, str(tmp_path), init_process_group=False, timeout_secs=240):
        assert len(errors) == 2
        for error in errors:
            assert "Corrupt" in error and path in error and "/proc/self/fd" not in error, errors
