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

from lightning_ckpt import CheckpointerConfig, CheckpointProcessConfig, CheckpointTimeoutError, CorruptCheckpointError
from lightning_ckpt.lightning import AsyncCheckpointIO, SyncCheckpointIO
from tests._threads import errors_of_concurrent_calls
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
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch") as corrupt:
            plugin.load_checkpoint(f"{base}/bad.ckpt")
        assert f"{base}/bad.ckpt" in str(corrupt.value) and str(cache) not in str(corrupt.value)
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


def test_concurrent_loads_of_one_url_never_share_a_copy(served, cache):
    """The ranks of a node (or several processes) load the same ``ckpt_path`` at once: each reads its own copy."""
    root, base = served
    saver = SyncCheckpointIO()
    saver.save_checkpoint(_checkpoint(), str(root / "good.ckpt"))
    saver.teardown()
    plugin = SyncCheckpointIO()
    assert errors_of_concurrent_calls(
        lambda: helpers.assert_trees_equal(plugin.load_checkpoint(f"{base}/good.ckpt"), _checkpoint())) == []
    assert _files(cache) == []


def test_a_large_file_from_a_server_without_range_requests_loads(served):
    """Python's own ``http.server`` answers every GET whole (no ranges), as many simple servers do; a file larger
    than fsspec's read-ahead block is streamed, as Lightning's default streams it."""
    root, base = served
    big = {"state_dict": {"w": torch.randn(6 << 20)}, "global_step": 1}  # 24 MiB
    torch.save(big, root / "big.ckpt")
    helpers.assert_trees_equal(SyncCheckpointIO().load_checkpoint(f"{base}/big.ckpt"), big)


def test_a_plain_http_checkpoint_loads_with_lightnings_weights_only_default(served):
    """Lightning loads ``http(s)`` checkpoints with ``weights_only=False`` unless told otherwise (its ``_load``)."""
    import argparse

    root, base = served
    torch.save({"hparams": argparse.Namespace(lr=0.1), "global_step": 1}, root / "hp.ckpt")
    assert SyncCheckpointIO().load_checkpoint(f"{base}/hp.ckpt")["hparams"].lr == 0.1
    with pytest.raises(Exception, match="[Ww]eights only"):
        SyncCheckpointIO().load_checkpoint(f"{base}/hp.ckpt", weights_only=True)


class _Stalling(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the handler's protocol
        self.send_response(200)
        self.send_header("Content-Length", str(10 << 20))
        self.end_headers()
        self.wfile.write(b"PK")
        self.server.release.wait(30)  # then never sends the rest until the test ends

    def log_message(self, *args: object) -> None:
        pass


def test_a_server_that_stops_sending_fails_the_load_within_its_timeout(cache):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stalling)
    server.release = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    plugin = SyncCheckpointIO(config=CheckpointerConfig(process_config=CheckpointProcessConfig(
        write_timeout_secs=2.5)))
    try:
        with pytest.raises(CheckpointTimeoutError, match=r"reading http://127\.0\.0\.1:\d+/x\.ckpt took longer"):
            plugin.load_checkpoint(f"http://127.0.0.1:{server.server_address[1]}/x.ckpt")  # 2 s: 0.8 x 2.5
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert _files(cache) == []


def test_verify_and_inspect_read_a_url_we_only_read_as_a_load_does(served, cache):
    from lightning_ckpt.integrity import CORRUPT, MISSING, UNVERIFIED, VERIFIED, check_checkpoint, describe_checkpoint

    root, base = served
    saver = SyncCheckpointIO()
    saver.save_checkpoint(_checkpoint(), str(root / "good.ckpt"))
    saver.teardown()
    good = check_checkpoint(f"{base}/good.ckpt")
    assert good.status == VERIFIED and good.files == [f"{base}/good.ckpt"], good
    assert describe_checkpoint(f"{base}/good.ckpt")["status"] == VERIFIED
    data = bytearray((root / "good.ckpt").read_bytes())
    data[bytes(data).find(torch.arange(6.0).numpy().tobytes()) + 5] ^= 0x10
    (root / "bad.ckpt").write_bytes(bytes(data))
    bad = check_checkpoint(f"{base}/bad.ckpt")
    assert bad.status == CORRUPT and f"{base}/bad.ckpt" in bad.detail and str(cache) not in bad.detail, bad
    torch.save(_checkpoint(), root / "plain.ckpt")
    assert check_checkpoint(f"{base}/plain.ckpt").status == UNVERIFIED
    assert check_checkpoint(f"{base}/none.ckpt").status == MISSING
    assert _files(cache) == []


def test_a_chained_url_loads_through_fsspec(served, tmp_path, monkeypatch):
    import tempfile

    root, base = served
    saver = SyncCheckpointIO()
    saver.save_checkpoint(_checkpoint(), str(root / "good.ckpt"))
    saver.teardown()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where fsspec's simplecache keeps its copy
    helpers.assert_trees_equal(SyncCheckpointIO().load_checkpoint(f"simplecache::{base}/good.ckpt"), _checkpoint())
