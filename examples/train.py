"""Train a small CNN on random data with async checkpoints: ``python examples/train.py --max-steps 200 --dir /tmp/run``.

Prints where the checkpoints are and how long saves blocked the training loop.
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ckpt.lightning import AsyncCheckpointCallback, AsyncCheckpointIO


class SmallCNN(pl.LightningModule):
    def __init__(self, channels: int = 32, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def random_data(n: int = 2048, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--dir", default="lightning_ckpt_example")
    parser.add_argument("--every-n-steps", type=int, default=10)
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    args = parser.parse_args()

    ckpt_dir = os.path.join(args.dir, "checkpoints")
    callback = AsyncCheckpointCallback(dirpath=ckpt_dir, every_n_train_steps=args.every_n_steps, keep_last_k=3)
    trainer = pl.Trainer(
        default_root_dir=args.dir, accelerator="cpu", devices=1, max_steps=args.max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        # Ours and ModelCheckpoint's saves of the same step share one staged copy: zero-argument use is enough.
        plugins=[AsyncCheckpointIO()],
        callbacks=[callback, ModelCheckpoint(dirpath=os.path.join(args.dir, "best"), monitor="train_loss",
                                             every_n_train_steps=args.every_n_steps, save_top_k=1, save_last="link")],
    )
    ckpt_path = AsyncCheckpointCallback.find_latest(ckpt_dir) if args.resume else None
    trainer.fit(SmallCNN(), random_data(), ckpt_path=ckpt_path)

    saves = callback.saves
    print(f"checkpoints in {os.path.abspath(ckpt_dir)}: {sorted(os.listdir(ckpt_dir))}")
    print(f"best/last in {os.path.abspath(os.path.join(args.dir, 'best'))}: {sorted(os.listdir(os.path.join(args.dir, 'best')))}")
    if saves:
        stalls = [s.stall_secs * 1e3 for s in saves]
        print(f"{len(saves)} saves blocked training {sum(stalls):.1f} ms in total "
              f"(max {max(stalls):.1f} ms, mean {sum(stalls) / len(stalls):.1f} ms); "
              f"mean write {sum(s.stats.write_secs for s in saves) / len(saves):.3f} s")


if __name__ == "__main__":
    main()
