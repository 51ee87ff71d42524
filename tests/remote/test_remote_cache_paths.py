"""Where remote saves and loads touch the local disk: only inside the cache directory, whatever the key, and nothing
left there after a failed upload; ``file:/abs`` is the local path ``/abs``."""

from __future__ import annotations

import io
import os

import pytest
import torch

from lightning_ckpt import paths
from lightning_ckpt.errors import CheckpointWriteError
from lightning_ckpt.lightning import AsyncCheckpointIO, SyncCheckpointIO
from tests.remote.test_remote_paths import all_files, checkpoint

pytestmark = pytest.mark.remote
PLUGINS = [AsyncCheckpointIO, SyncCheckpointIO]
ODD_KEYS = [".", "..", "a/..", "a/../../../../../../etc/passwd", "a//b.ckpt", "run/" + "m" * 300 + ".ckpt",
            "run/" + "é" * 200, "run/.hidden.ckpt", "run/a b?c*.ckpt", "run/..."]


@pytest.mark.parametrize("key", ODD_KEYS)
@pytest.mark.parametrize("kind", ["upload", "download"])
def test_the_cache_path_of_any_key_is_one_short_file_two_levels_inside_the_cache(key, kind, tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(tmp_path / "cache"))
    location = paths.RemotePath("s3", "bucket", key)
    local = location.cache_path(kind)
    below = os.path.relpath(local, tmp_path / "cache" / kind).split(os.sep)
    assert len(below) == 2 and os.path.normpath(local) == local, local
    assert all(part not in ("", ".", "..") and len(part.encode()) <= 255 for part in below), below
    assert paths.RemotePath("s3", "bucket", key + "x").cache_path(kind) != local  # one directory per URL
    assert paths.RemotePath("s3", "other", key).cache_path(kind) != local


@pytest.mark.parametrize("plugin_cls", PLUGINS, ids=lambda c: c.__name__)
def test_a_key_climbing_out_of_the_cache_never_writes_or_removes_a_local_file(plugin_cls, s3, tmp_path, empty_cwd):
    victim = tmp_path / "victim" / "x.ckpt"  # where <cache>/upload/s3/<bucket>/<key segments> used to land
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    key = "a/../../../../../victim/x.ckpt"
    plugin = plugin_cls()
    ckpt = checkpoint(numel=10)
    plugin.save_checkpoint(ckpt, f"{s3.url}/{key}")
    plugin.teardown()

    assert victim.read_bytes() == b"precious"
    assert s3.keys() == [key]
    assert torch.equal(torch.load(io.BytesIO(s3.get(key)), weights_only=True)["state_dict"]["w"],
                       ckpt["state_dict"]["w"])
    assert torch.equal(plugin.load_checkpoint(f"{s3.url}/{key}")["state_dict"]["w"], ckpt["state_dict"]["w"])
    assert all_files(tmp_path / "cache") == [] and os.listdir(empty_cwd) == []


def test_a_key_segment_longer_than_a_file_name_saves_and_loads(s3, tmp_path):
    url = f"{s3.url}/run/{'m' * 300}.ckpt"  # S3 takes 1024-byte keys; a local name is at most 255 bytes
    plugin = SyncCheckpointIO()
    ckpt = checkpoint(numel=10)
    plugin.save_checkpoint(ckpt, url)
    assert torch.equal(plugin.load_checkpoint(url)["state_dict"]["w"], ckpt["state_dict"]["w"])
    plugin.teardown()
    assert all_files(tmp_path / "cache") == []


@pytest.mark.parametrize("plugin_cls", PLUGINS, ids=lambda c: c.__name__)
def test_a_failed_upload_leaves_nothing_in_the_cache(plugin_cls, s3, tmp_path):
    s3.server.set_faults({"op": "CreateMultipartUpload", "action": "error", "status": 403, "code": "AccessDenied"})
    plugin = plugin_cls()
    with pytest.raises(CheckpointWriteError, match="AccessDenied"):
        try:
            plugin.save_checkpoint(checkpoint(numel=10), f"{s3.url}/run/model.ckpt")
        finally:
            plugin.teardown()
    assert all_files(tmp_path / "cache") == [] and s3.keys() == [] and s3.uploads() == []


def test_file_colon_single_slash_is_the_absolute_local_path(tmp_path, empty_cwd):
    target = tmp_path / "out" / "x.ckpt"
    url = f"file:{target}"  # RFC 8089; what pathlib makes of file:///abs
    assert paths.resolve(url) == str(target) and paths.path_key(url) == str(target)
    assert paths.resolve(f"local:{target}") == str(target)
    plugin = SyncCheckpointIO()
    plugin.save_checkpoint(checkpoint(numel=10), url)
    assert torch.equal(plugin.load_checkpoint(url)["state_dict"]["w"], checkpoint(numel=10)["state_dict"]["w"])
    plugin.teardown()
    assert target.is_file() and os.listdir(empty_cwd) == []
