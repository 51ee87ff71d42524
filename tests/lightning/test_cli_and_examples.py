"""The examples: LightningCLI builds plugin and callback (nested dataclass config) from the YAML and fits."""

from __future__ import annotations

import os
import sys

import pytest

from lightning_ckpt import CheckpointerConfig
from lightning_ckpt.lightning import AsyncCheckpointCallback, AsyncCheckpointIO
from lightning_ckpt.lightning.resume import is_complete

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(90)]
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


@pytest.fixture
def cli_main(monkeypatch):
    monkeypatch.syspath_prepend(os.path.abspath(EXAMPLES))
    import cli

    yield cli.main
    for name in ("cli", "train"):
        sys.modules.pop(name, None)


def test_cli_yaml_builds_plugin_and_callback_then_fits(cli_main, tmp_path):
    config = os.path.join(EXAMPLES, "cli_config.yaml")
    cli = cli_main(["--config", config, f"--trainer.default_root_dir={tmp_path}"], run=False)
    plugin = cli.trainer.strategy.checkpoint_io
    assert isinstance(plugin, AsyncCheckpointIO) and isinstance(plugin.config, CheckpointerConfig)
    assert plugin.config.max_in_flight == 2 and plugin.config.staging_config.budget_bytes == 1_000_000_000
    assert plugin.config.process_config.write_timeout_secs == 300.0
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, AsyncCheckpointCallback))
    assert (callback.every_n_train_steps, callback.keep_last_k) == (5, 2)

    cli = cli_main(["fit", "--config", config, f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.max_steps=2", "--trainer.callbacks+=AsyncCheckpointCallback",
                    "--trainer.callbacks.every_n_train_steps=1"], run=True)
    own = os.path.join(tmp_path, "checkpoints")  # shared with ModelCheckpoint's default directory
    names = sorted(os.listdir(own))
    assert [n for n in names if n.startswith("step=")] == ["step=1.ckpt", "step=2.ckpt"] and "last.ckpt" in names
    assert all(is_complete(os.path.join(own, n), verify=True) for n in names)
