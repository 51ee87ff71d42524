"""Every public name resolves, and importing the core pulls in neither lightning nor (for the writer) torch."""

from __future__ import annotations

import subprocess
import sys

import lightning_ckpt


def test_every_exported_name_resolves():
    assert sorted(lightning_ckpt.__all__) == sorted(lightning_ckpt._EXPORTS)
    for name in lightning_ckpt.__all__:
        assert getattr(lightning_ckpt, name) is not None, name


def test_writer_modules_do_not_import_torch_and_core_does_not_import_lightning():
    code = (
        "import sys, lightning_ckpt._writer_main, lightning_ckpt.checkpoint_process;"
        "assert 'torch' not in sys.modules, 'writer imports torch';"
        "import lightning_ckpt as c; c.make_async_checkpointer;"
        "assert 'lightning' not in sys.modules and 'lightning.pytorch' not in sys.modules, 'core imports lightning'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
