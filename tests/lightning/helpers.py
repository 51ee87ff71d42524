"""Tiny models, data and injected failures shared by the Lightning tests (importable: the writer process loads hooks)."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ckpt.checkpoint_writer import WriterHook
from lightning_ckpt.layout import TMP_MARKER


class TinyModel(pl.LightningModule):
    """Linear -> BatchNorm -> Linear with Adam: parameters, buffers and optimizer state all change every step."""

    def __init__(self, width: int = 16, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 1))
        self.snapshots: dict[int, dict[str, Any]] = {}
        self.record_snapshots = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.record_snapshots:  # what the checkpoint must contain: the state at the moment of the save
            self.snapshots[checkpoint["global_step"]] = {
                "state_dict": clone_tree(checkpoint["state_dict"]),
                "optimizer_states": clone_tree(checkpoint["optimizer_states"]),
            }


def clone_tree(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_tree(v) for v in obj)
    return obj


def assert_trees_equal(actual: Any, expected: Any, where: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert torch.equal(actual, expected), f"tensor differs at {where}"
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), f"keys differ at {where}: {set(actual) ^ set(expected)}"
        for k in expected:
            assert_trees_equal(actual[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_trees_equal(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size, shuffle=False)


def trainer(tmp_path: Any, **kwargs: Any) -> pl.Trainer:
    defaults = dict(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, max_steps=4,
                    enable_progress_bar=False, enable_model_summary=False, logger=False,
                    num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def final_files(directory: Any) -> list[str]:
    """Names at final paths (no temp names), sorted."""
    return sorted(n for n in os.listdir(directory) if TMP_MARKER not in n)


def temp_files(directory: Any) -> list[str]:
    out = []
    for root, _, names in os.walk(directory):
        out += [os.path.join(root, n) for n in names if TMP_MARKER in n]
    return out


class FailCommitHook(WriterHook):
    """Fails every commit of a path containing ``substring`` (runs in the writer process)."""

    def __init__(self, substring: str) -> None:
        self.substring = substring

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        if self.substring in os.path.basename(path):
            raise OSError(f"injected write failure for {path}")


class SlowCommitHook(WriterHook):
    """Holds each commit until a flag file exists, so a test decides when a write lands (no timing guesses)."""

    def __init__(self, release_file: str, timeout_secs: float = 60.0) -> None:
        self.release_file = release_file
        self.timeout_secs = timeout_secs

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        from tests._helpers import wait_for

        wait_for(lambda: os.path.exists(self.release_file), self.timeout_secs, self.release_file)


class DelayCommitHook(WriterHook):
    """Makes every write land late, so removals, links and loads really meet writes still in flight."""

    def __init__(self, delay_secs: float = 0.2) -> None:
        self.delay_secs = delay_secs

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        import time

        time.sleep(self.delay_secs)
