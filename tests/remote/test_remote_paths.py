"""Remote paths through the plugins: s3:// round trips, file:// is local, memory:// and unknown protocols refused."""

from __future__ import annotations

import io
import os

import pytest
import torch

from lightning_ckpt import paths
from lightning_ckpt.builder import make_sync_checkpointer
from lightning_ckpt.lightning import AsyncCheckpointIO, SyncCheckpointIO
from lightning_ckpt.remote import RemoteConfig

pytestmark = pytest.mark.remote
PLUGINS = [AsyncCheckpointIO, SyncCheckpointIO]
PART = 5 << 20


def checkpoint(step: int = 3, numel: int = 3 << 20) -> dict:
    torch.manual_seed(step)
    return {"state_dict": {"w": torch.randn(numel), "b": torch.arange(5)}, "global_step": step}


def all_files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("plugin_cls", PLUGINS, ids=lambda c: c.__name__)
def test_round_trip_with_the_plugin_alone_lands_in_the_bucket(plugin_cls, s3, empty_cwd, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint comes from the constructor's storage_options alone
    plugin = plugin_cls(storage_options=s3.options, remote_config=RemoteConfig(part_size_bytes=PART))
    ckpt = checkpoint()
    url = f"{s3.url}/run1/model.ckpt"
    plugin.save_checkpoint(ckpt, url)
    loaded = plugin.load_checkpoint(url)
    plugin.teardown()
    (done,) = plugin.ledger.pop_completed()
    assert done.stats.path == url  # metrics and logs name the object, not the local cache copy

    assert s3.keys() == ["run1/model.ckpt"]
    assert torch.equal(loaded["state_dict"]["w"], ckpt["state_dict"]["w"])
    plain = torch.load(io.BytesIO(s3.get("run1/model.ckpt")), weights_only=True)  # an ordinary torch file
    assert torch.equal(plain["state_dict"]["w"], ckpt["state_dict"]["w"])
    parts = s3.server.ops("UploadPart", "run1/model.ckpt")
    assert len(parts) == 3 and not s3.server.ops("PutObject")  # 12 MiB in 5 MiB parts, one multipart upload
    assert os.listdir(empty_cwd) == []
    assert all_files(tmp_path / "cache") == []  # committed locally, uploaded, then the local copy freed
    with pytest.raises(FileNotFoundError, match="run1/missing.ckpt"):
        plugin.load_checkpoint(f"{s3.url}/run1/missing.ckpt")


def test_per_call_storage_options_reach_the_store(s3, empty_cwd, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    plugin = AsyncCheckpointIO()
    plugin.save_checkpoint(checkpoint(numel=10), f"{s3.url}/a/b.ckpt", storage_options=s3.options)
    plugin.teardown()
    assert s3.keys() == ["a/b.ckpt"]
    assert os.listdir(empty_cwd) == []


def test_storage_options_with_a_local_path_are_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="storage_options"):
        SyncCheckpointIO().save_checkpoint(checkpoint(numel=10), tmp_path / "x.ckpt", storage_options={"a": 1})


def test_file_url_is_the_local_path_not_a_folder_named_file(tmp_path, empty_cwd):
    target = tmp_path / "out" / "x.ckpt"
    plugin = SyncCheckpointIO()
    plugin.save_checkpoint(checkpoint(numel=10), f"file://{target}")
    assert torch.equal(plugin.load_checkpoint(f"file://{target}")["state_dict"]["b"], torch.arange(5))
    plugin.remove_checkpoint(f"file://{target}")
    plugin.teardown()
    assert not target.exists() and target.parent.is_dir()
    assert os.listdir(empty_cwd) == []


@pytest.mark.parametrize("url, match", [
    ("memory://bucket/run/x.ckpt", "lives inside one process"),
    ("nosuchproto://bucket/x.ckpt", "unknown protocol 'nosuchproto'"),
    ("simplecache::s3://bucket/x.ckpt", "unsupported protocol 'simplecache'"),
    ("ftp://host/x.ckpt", "unsupported protocol 'ftp'"),
    ("s3://bucket-only", "needs a bucket and a key"),
])
@pytest.mark.parametrize("plugin_cls", PLUGINS, ids=lambda c: c.__name__)
def test_unwritable_protocols_are_rejected_at_once(plugin_cls, url, match, empty_cwd):
    plugin = plugin_cls()
    with pytest.raises(ValueError, match=match):
        plugin.save_checkpoint(checkpoint(numel=10), url)
    with pytest.raises(ValueError, match=match):
        plugin.remove_checkpoint(url)
    assert plugin._checkpointer is None  # refused before any writer started
    plugin.teardown()
    assert os.listdir(empty_cwd) == []


def test_core_checkpointers_write_remote_paths_to_the_store_not_a_local_folder(s3, empty_cwd, tmp_path):
    checkpointer = make_sync_checkpointer()
    checkpointer.save(f"{s3.url}/run/x.ckpt", {"w": torch.arange(4.0)})
    loaded = checkpointer.load(f"{s3.url}/run/x.ckpt")
    checkpointer.close()
    assert torch.equal(loaded["w"], torch.arange(4.0))
    assert [k.rsplit("/", 1)[-1] for k in s3.keys()] == ["MANIFEST.json", "checkpoint_0.pt"]  # layout "dir"
    assert os.listdir(empty_cwd) == [] and all_files(tmp_path / "cache") == []


def test_paths_resolve_in_one_place(tmp_path):
    assert paths.resolve(f"file://{tmp_path}/k") == f"{tmp_path}/k"
    assert paths.resolve("rel/k") == os.path.abspath("rel/k")
    remote = paths.resolve("s3a://bkt/run//x.ckpt/", {"endpoint_url": "http://127.0.0.1:1"})
    assert (remote.url, remote.name, remote.storage_options) == ("s3://bkt/run//x.ckpt", "x.ckpt",
                                                                 {"endpoint_url": "http://127.0.0.1:1"})
    assert paths.path_key(remote) == paths.path_key("s3://bkt/run//x.ckpt") == remote.url
    assert not isinstance(remote, os.PathLike)  # cannot be turned into a local path by accident


LAZY_IMPORT_SCRIPT = """
import sys, torch
from lightning_ckpt.lightning import AsyncCheckpointIO, SyncCheckpointIO
SyncCheckpointIO().save_checkpoint({"w": torch.zeros(2)}, sys.argv[1] + "/local.ckpt")
assert "aiobotocore" not in sys.modules and "botocore" not in sys.modules, "imported for a local save"
plugin = AsyncCheckpointIO()
plugin.save_checkpoint({"w": torch.zeros(2)}, sys.argv[2])
plugin.teardown()
assert "aiobotocore" not in sys.modules, "the training process imported the S3 client for an async upload"
assert plugin.load_checkpoint(sys.argv[2])["w"].shape == (2,)
assert "aiobotocore" in sys.modules
"""


@pytest.mark.timeout(120)
def test_the_s3_client_is_imported_only_by_the_process_that_calls_the_store(s3, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", LAZY_IMPORT_SCRIPT, str(tmp_path), f"{s3.url}/lazy/x.ckpt"],
                            capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-3000:]
    assert s3.keys() == ["lazy/x.ckpt"]


@pytest.mark.parametrize("size, align", [(0, 1), (1, 1), (PART, 1), (PART + 1, 256 << 10),
                                         (10_000 * PART + 3, 256 << 10)])
def test_upload_parts_cover_the_file_once_within_the_store_limits(size, align):
    from lightning_ckpt.remote import MAX_PARTS, plan_parts

    parts = plan_parts(size, RemoteConfig(part_size_bytes=PART), align)
    assert [p.number for p in parts] == list(range(1, len(parts) + 1)) and len(parts) <= MAX_PARTS
    assert parts[0].offset == 0 and parts[-1].offset + parts[-1].nbytes == size
    assert all(p.offset + p.nbytes == q.offset for p, q in zip(parts, parts[1:]))
    assert [p.last for p in parts] == [False] * (len(parts) - 1) + [True]
    assert all(p.nbytes % align == 0 and p.nbytes >= PART for p in parts[:-1])  # GCS: 256 KiB multiples


@pytest.mark.parametrize("url", ["gs://bucket/run/x.ckpt", "gcs://bucket/run/x.ckpt"])
def test_gs_and_gcs_urls_name_one_gcs_object(url):
    resolved = paths.resolve(url, {"token": "anon"})
    assert isinstance(resolved, paths.RemotePath) and resolved.url == "gs://bucket/run/x.ckpt"
    assert resolved.storage_options == {"token": "anon"} and paths.path_key(url) == "gs://bucket/run/x.ckpt"
