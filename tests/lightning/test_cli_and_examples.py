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


def test_cli_command_line_forms_build_the_plugin_then_fit(cli_main, tmp_path):
    """No YAML: the qualified name (Lightning has its own AsyncCheckpointIO), dotted config fields or a JSON
    dict, and a fit with the plugin and callback given on the command line alone."""
    base = ["--trainer.plugins=lightning_ckpt.AsyncCheckpointIO", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    cli = cli_main(base + ["--trainer.plugins.config.max_in_flight=2",
                           "--trainer.plugins.config.staging_config.budget_bytes=1000000",
                           "--trainer.plugins.error_policy=warn"], run=False)
    plugin = cli.trainer.strategy.checkpoint_io
    assert isinstance(plugin, AsyncCheckpointIO) and plugin.error_policy == "warn"
    assert (plugin.config.max_in_flight, plugin.config.staging_config.budget_bytes) == (2, 1_000_000)
    cli = cli_main(base + ['--trainer.plugins.config={"max_in_flight": 3, "process_config": '
                           '{"write_timeout_secs": 120}}'], run=False)
    config = cli.trainer.strategy.checkpoint_io.config
    assert config.max_in_flight == 3 and config.process_config.write_timeout_secs == 120.0
    with pytest.raises(ValueError, match="max_in_flight"):
        cli_main(base + ["--trainer.plugins.config.max_in_flight=0"], run=False)

    cli_main(["fit", *base, "--trainer.max_steps=2", "--trainer.enable_checkpointing=false",
              "--trainer.callbacks+=lightning_ckpt.AsyncCheckpointCallback",
              "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.filename=step={step}.ckpt"], run=True)
    own = os.path.join(tmp_path, "checkpoints")
    assert sorted(os.listdir(own)) == ["step=1.ckpt", "step=2.ckpt"]  # ".ckpt" in the pattern is not doubled
    assert AsyncCheckpointCallback.find_latest(own, "step={step}.ckpt") == os.path.join(own, "step=2.ckpt")


def test_cli_help_names_the_qualified_class(cli_main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--trainer.plugins.help", "lightning_ckpt.AsyncCheckpointIO"], run=False)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--trainer.plugins.config" in out and "--trainer.plugins.error_policy {raise,warn}" in out


def test_top_level_names_and_config_dicts_checked_at_construction():
    """``from lightning_ckpt import ...`` works; a dict config becomes the dataclass tree at once, and a bad field
    fails there, named, instead of at the first save."""
    from lightning_ckpt import AsyncCheckpointCallback as Callback_, AsyncCheckpointIO as Async, SyncCheckpointIO

    assert Callback_ is AsyncCheckpointCallback and Async is AsyncCheckpointIO and SyncCheckpointIO is not None
    plugin = AsyncCheckpointIO(config={"max_in_flight": 2, "staging_config": {"budget_bytes": 4096}})
    assert isinstance(plugin.config, CheckpointerConfig) and plugin.config.max_in_flight == 2
    assert plugin.config.staging_config.budget_bytes == 4096
    for bad, field in [({"max_in_flight": "2"}, r"AsyncCheckpointIO\.config\.max_in_flight must be int"),
                       ({"max_in_flight": 0}, r"AsyncCheckpointIO\.config\.max_in_flight must be >= 1, got 0"),
                       ({"staging_config": {"budget_bytes": -1}}, r"config\.staging_config\.budget_bytes must be > 0"),
                       ({"max_in_fligth": 2}, r"unknown field\(s\) \['max_in_fligth'\]"),
                       ("fast", r"AsyncCheckpointIO\.config must be a CheckpointerConfig or a dict")]:
        with pytest.raises(ValueError, match=field):
            AsyncCheckpointIO(config=bad)
