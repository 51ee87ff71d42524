"""Uploads streamed from the staging memory (``RemoteConfig(stream_from_staging=True)``): nothing written locally,
the same commit and abort rules as uploads of a locally committed file."""

from __future__ import annotations

import io
import os

import pytest
import torch

import lightning_ckpt as lc
from lightning_ckpt import paths, torch_zip
from lightning_ckpt.errors import CheckpointWriteError
from lightning_ckpt.lightning import AsyncCheckpointIO, SyncCheckpointIO
from lightning_ckpt.remote import RemoteConfig, RemoteUpload
from tests._helpers import wait_for
from tests.remote.test_remote_paths import PART, all_files, checkpoint

pytestmark = pytest.mark.remote
PLUGINS = [AsyncCheckpointIO, SyncCheckpointIO]
STREAM = RemoteConfig(part_size_bytes=PART, stream_from_staging=True)


@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    """The local cache is a file: any attempt to write or create something in it fails."""
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE_DIR", str(blocker))
    return blocker


@pytest.mark.parametrize("plugin_cls", PLUGINS, ids=lambda c: c.__name__)
def test_streamed_round_trip_writes_nothing_locally(plugin_cls, s3, no_cache, empty_cwd, monkeypatch, tmp_path):
    url = f"{s3.url}/run/model.ckpt"
    ckpt = checkpoint(1)
    plugin = plugin_cls(remote_config=STREAM)
    plugin.save_checkpoint(ckpt, url)
    plugin.teardown()
    assert s3.keys() == ["run/model.ckpt"] and s3.uploads() == []
    assert len(s3.server.ops("UploadPart", "run/model.ckpt")) == 3  # 12 MiB in 5 MiB parts from memory
    plain = torch.load(io.BytesIO(s3.get("run/model.ckpt")), weights_only=True)  # an ordinary torch file
    assert torch.equal(plain["state_dict"]["w"], ckpt["state_dict"]["w"])
    assert no_cache.read_bytes() == b"" and os.listdir(empty_cwd) == []

    monkeypatch.setenv("LIGHTNING_CKPT_CACHE_DIR", str(tmp_path / "cache"))  # loading downloads, verifying
    loaded = plugin.load_checkpoint(url)
    plugin.teardown()
    assert torch.equal(loaded["state_dict"]["w"], ckpt["state_dict"]["w"])
    assert all_files(tmp_path / "cache") == []


def test_the_same_plugin_without_streaming_needs_the_local_cache(s3, no_cache):
    plugin = SyncCheckpointIO(remote_config=RemoteConfig(part_size_bytes=PART))
    with pytest.raises(OSError):
        plugin.save_checkpoint(checkpoint(1), f"{s3.url}/run/model.ckpt")
    plugin.teardown()
    assert s3.keys() == []


def test_an_exception_after_two_parts_publishes_nothing(s3, no_cache, monkeypatch):
    url = f"{s3.url}/run/model.ckpt"
    plugin = SyncCheckpointIO(remote_config=STREAM)
    plugin.save_checkpoint(checkpoint(1), url)
    old = s3.get("run/model.ckpt")
    s3.server.clear_log()
    real = torch_zip.TorchZipWriter.write_record

    def failing(self, name, data):
        if name == "data/1":  # the second tensor, after the first one's 12 MiB went into the upload
            wait_for(lambda: len(s3.server.ops("UploadPart")) >= 2, 30, "two parts at the server")
            raise RuntimeError("injected after two parts")
        return real(self, name, data)

    monkeypatch.setattr(torch_zip.TorchZipWriter, "write_record", failing)
    with pytest.raises(RuntimeError, match="injected after two parts"):
        plugin.save_checkpoint(checkpoint(2), url)
    plugin.teardown()
    assert len(s3.server.ops("UploadPart")) >= 2 and s3.server.ops("AbortMultipartUpload", "run/model.ckpt")
    assert s3.get("run/model.ckpt") == old and s3.uploads() == []  # the old version, bit-identical


def test_a_part_refused_by_the_store_is_raised_and_publishes_nothing(s3, no_cache):
    s3.server.set_faults({"op": "UploadPart", "part": 3, "action": "error", "status": 403, "code": "AccessDenied"})
    plugin = AsyncCheckpointIO(remote_config=STREAM)
    plugin.save_checkpoint(checkpoint(1), f"{s3.url}/run/model.ckpt")
    with pytest.raises(CheckpointWriteError, match="AccessDenied"):
        plugin.teardown()
    assert s3.keys() == [] and s3.uploads() == []


def test_a_streamed_directory_checkpoint_round_trips_without_local_files(s3, no_cache, monkeypatch, tmp_path):
    url = f"{s3.url}/run/ckpt"
    state = {"w": torch.randn(3 << 20), "step": 4}
    with lc.make_sync_checkpointer(lc.CheckpointerConfig()) as ck:
        ck.save(url, state, after_commit=RemoteUpload(paths.resolve(url), STREAM, 60.0))
        assert no_cache.read_bytes() == b""
        monkeypatch.setenv("LIGHTNING_CKPT_CACHE_DIR", str(tmp_path / "cache"))
        loaded = ck.load(url)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 4
    assert [k.rsplit("/", 1)[-1] for k in s3.keys()] == ["MANIFEST.json", "checkpoint_0.pt"]
