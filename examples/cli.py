"""LightningCLI with the plugin and callback from YAML: ``python examples/cli.py fit --config examples/cli_config.yaml``."""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train import SmallCNN  # noqa: E402


class RandomImages(BoringDataModule):
    """Random 3x16x16 images for SmallCNN."""

    def train_dataloader(self):
        from train import random_data

        return random_data(256)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(SmallCNN, RandomImages, args=args, run=run, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
