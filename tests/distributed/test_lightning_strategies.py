"""Our FSDP and ModelParallel strategies in real 2-rank Lightning fits: same training as stock, committed saves."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = [pytest.mark.multiprocess, pytest.mark.lightning, pytest.mark.timeout(300)]


def _module_class(kind: str):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    class Module(pl.LightningModule):
        """A 2-layer MLP; sharded in ``configure_model`` (FSDP2 over the data-parallel mesh) for ModelParallel."""

        def __init__(self, seed: int) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4))

        def configure_model(self) -> None:
            if kind != "model_parallel":
                return
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

        def training_step(self, batch, batch_idx):
            return self.model(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.05)

        def train_dataloader(self):
            return DataLoader(torch.randn(64, 8, generator=torch.Generator().manual_seed(3)), batch_size=4)

    return Module


def _strategy(kind: str, ours: bool, world: int):
    import lightning.pytorch.strategies as stock

    import lightning_ckpt.lightning as ours_module

    if kind == "model_parallel":
        cls = ours_module.ModelParallelStrategy if ours else stock.ModelParallelStrategy
        return cls(data_parallel_size=world, tensor_parallel_size=1)
    # Lightning refuses accelerator="cpu" for FSDPStrategy itself, not for a subclass: both sides are subclasses
    # that wrap the model with device_id=cpu (the parent would pass None, which FSDP refuses without a GPU).
    base = ours_module.FSDPStrategy if ours else stock.FSDPStrategy
    return type("CPUFSDPStrategy", (base,), {"_setup_model": _setup_model_on_cpu})(state_dict_type="sharded")


def _setup_model_on_cpu(self, model):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not any(isinstance(m, FSDP) for m in model.modules()):
        model = FSDP(model, device_id=torch.device("cpu"))
    return super(type(self), self)._setup_model(model)


def _full_params(trainer, module) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor

    if isinstance(trainer.strategy.model, FSDP):
        with FSDP.summon_full_params(trainer.strategy.model):
            return {k: v.detach().clone() for k, v in module.model.named_parameters()}
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.model.state_dict().items()}


VARIANTS = ("ours_async", "ours_sync", "stock")


def _fit_save_resume(rank: int, world: int, root: str, kind: str) -> dict:
    """Fit 2 steps saving every step (top-1: the step-1 checkpoint is removed once step 2 is saved), then resume
    a fresh module from step 2 to step 4; with our strategy and plugin (async), ours without plugin, and stock."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_ckpt.lightning import AsyncCheckpointIO

    out = {}
    module_cls = _module_class(kind)
    for variant in VARIANTS:
        dirpath = os.path.join(root, variant)

        def trainer(max_steps: int, callbacks: list | None = None) -> pl.Trainer:
            return pl.Trainer(accelerator="cpu", devices=world, strategy=_strategy(kind, variant != "stock", world),
                              max_steps=max_steps, logger=False, enable_checkpointing=bool(callbacks),
                              callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                              default_root_dir=root,
                              plugins=[AsyncCheckpointIO()] if variant == "ours_async" else None)

        every_step = ModelCheckpoint(dirpath=dirpath, filename="{step}", every_n_train_steps=1, save_top_k=1)
        trainer(2, [every_step]).fit(module_cls(seed=0))
        ckpt = os.path.join(dirpath, "step=2.ckpt")
        resumed = module_cls(seed=1)  # other initial values: the resume must replace them
        second = trainer(4)
        second.fit(resumed, ckpt_path=ckpt)
        out[variant] = {"params": _full_params(second, resumed), "step": second.global_step,
                        "files": sorted(os.listdir(ckpt)), "kept": sorted(os.listdir(dirpath))}
        if variant == "ours_async":
            out["corrupt_resume"] = _resume_after_flipping_a_byte(rank, ckpt, module_cls, trainer(6))
    return out


def _resume_after_flipping_a_byte(rank: int, ckpt: str, module_cls, trainer) -> str | None:
    import torch.distributed as dist

    if rank == 0:
        victim = os.path.join(ckpt, "__1_0.distcp")
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) - 100)  # inside the last chunk
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    try:
        trainer.fit(module_cls(seed=2), ckpt_path=ckpt)
    except Exception as e:  # noqa: BLE001 - the test asserts on what every rank raised
        return type(e).__name__
    return None


def _check_same_training(results: list[dict], root: str) -> None:
    for out in results:
        stock = out["stock"]
        for variant in ("ours_async", "ours_sync"):
            ours = out[variant]
            assert ours["step"] == stock["step"] == 4
            assert ours["params"].keys() == stock["params"].keys()
            for key in stock["params"]:
                assert torch.equal(ours["params"][key], stock["params"][key]), (variant, key)
            assert "MANIFEST.json" in ours["files"] and "meta.pt" in ours["files"]
            assert ours["kept"] == ["step=2.ckpt"]  # top-1: step=1 removed after step=2 committed
        assert "MANIFEST.json" not in stock["files"]
        assert out["corrupt_resume"] == "CorruptCheckpointError"  # on every rank
    with open(os.path.join(root, "ours_async", "step=2.ckpt", "MANIFEST.json")) as f:
        manifest = json.load(f)
    assert "meta.pt" in manifest["files"]  # meta.pt joined the commit, with its checksum
    assert any("records" in c for c in manifest["chunks"].values())  # async: shards written by the writer process
    for variant in VARIANTS:
        assert not [n for n in os.listdir(os.path.join(root, variant)) if n.startswith(".lckpt-")]


def test_model_parallel_resume_matches_stock_and_commits_meta(tmp_path):
    from tests.distributed.launcher import run_ranks

    _check_same_training(run_ranks(_fit_save_resume, 2, str(tmp_path), "model_parallel",
                                   init_process_group=False, timeout_secs=240), str(tmp_path))


def test_fsdp_sharded_resume_matches_stock_and_commits_meta(tmp_path):
    from tests.distributed.launcher import run_ranks

    _check_same_training(run_ranks(_fit_save_resume, 2, str(tmp_path), "fsdp",
                                   init_process_group=False, timeout_secs=240), str(tmp_path))


def test_our_strategies_are_not_reported_as_bypassing_the_plugin():
    from lightning_ckpt.lightning import FSDPStrategy, ModelParallelStrategy
    from lightning_ckpt.lightning.binding import bypass_reason

    assert bypass_reason(FSDPStrategy(state_dict_type="sharded")) is None
    assert bypass_reason(ModelParallelStrategy()) is None
