"""Loads from fsspec URLs that we do not write (``http://``, ``memory://``) work as with Lightning's default plugin:
``Trainer.fit(ckpt_path="http://...")`` resumes; our files are verified; nothing stays in the local cache."""

from __future__ import annotations

import functools
import http.server
import io
import os
import threading

import pytest
import torch

from lightning_ckpt import CorruptCheckpointError
from lightning_ckpt.lightning import AsyncCheckpointIO, SyncCheckpointIO
from tests.lightning import helpers

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(120), pytest.mark.usefixtures("fsspec_loop")]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path):
    """``(directory, base URL)``: a real HTTP server on 127.0.0.1 serving the directory."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _files(directory) -> list[str]:
    return [os.path.join(r, n) for r, _, names in os.walk(directory) for n in names]


def _checkpoint() -> dict:
    return {"state_dict": {"w": torch.arange(6.0), "b": torch.ones(2, dtype=torch.float64)}, "global_step": 3,
            "epoch": 0, "pytorch-lightning_version": "2.6.6"}


@pytest.mark.parametrize("plugin_cls", [SyncCheckpointIO, AsyncCheckpointIO])
def test_a_checkpoint_over_http_loads_verified_and_leaves_no_copy(served, cache, plugin_cls):
    root, base = served
    checkpoint = _checkpoint()
    saver = SyncCheckpointIO()
    saver.save_checkpoint(checkpoint, str(root / "good.ckpt"))
    saver.teardown()
    plugin = plugin_cls()
    try:
        helpers.assert_trees_equal(plugin.load_checkpoint(f"{base}/good.ckpt"), checkpoint)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # Lightning's default wrote it: read unverified, as torch.load reads it
        (root / "plain.ckpt").write_bytes(buffer.getvalue())
        helpers.assert_trees_equal(plugin.load_checkpoint(f"{base}/plain.ckpt"), checkpoint)
        data = bytearray((root / "good.ckpt").read_bytes())
        at = bytes(data).find(torch.arange(6.0).numpy().tobytes())
        data[at + 5] ^= 0x10
        (root / "bad.ckpt").write_bytes(bytes(data))
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
            plugin.load_checkpoint(f"{base}/bad.ckpt")
        with pytest.raises(FileNotFoundError):
            plugin.load_checkpoint(f"{base}/none.ckpt")
        with pytest.raises(ValueError, match="unsupported protocol 'http'"):
            plugin.save_checkpoint(checkpoint, f"{base}/new.ckpt")  # we never write there
    finally:
        plugin.teardown()
    assert _files(cache) == []


def test_a_checkpoint_in_fsspec_memory_loads(cache):
    import fsspec

    buffer = io.BytesIO()
    torch.save(_checkpoint(), buffer)
    with fsspec.open("memory://run/x.ckpt", "wb") as f:
        f.write(buffer.getvalue())
    plugin = SyncCheckpointIO()
    helpers.assert_trees_equal(plugin.load_checkpoint("memory://run/x.ckpt"), _checkpoint())
    assert _files(cache) == []


def test_fit_resumes_from_a_checkpoint_over_http(served, tmp_path):
    """Lightning's own ``test_fit_ckpt_path_epoch_restored`` with a URL: what the default plugin does."""
    root, base = served
    first = helpers.trainer(tmp_path / "a", max_steps=4, plugins=[AsyncCheckpointIO()])
    first.fit(helpers.TinyModel(), train_dataloaders=helpers.loader())
    first.save_checkpoint(str(root / "step4.ckpt"))
    second = helpers.trainer(tmp_path / "b", max_steps=6, plugins=[AsyncCheckpointIO()])
    second.fit(helpers.TinyModel(), train_dataloaders=helpers.loader(), ckpt_path=f"{base}/step4.ckpt")
    assert second.global_step == 6
