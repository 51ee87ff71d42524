"""One round trip against SeaweedFS, a real disk-backed S3 server that checks signatures (moto is the fault rig)."""

from __future__ import annotations

import io
import os
import uuid

import pytest
import torch

from lightning_ckpt.lightning import AsyncCheckpointCallback, AsyncCheckpointIO
from lightning_ckpt.remote import RemoteConfig
from tests.remote.conftest import WEED_CREDENTIALS
from tests.remote.test_remote_paths import PART, checkpoint

pytestmark = pytest.mark.remote


@pytest.mark.timeout(120)
def test_round_trip_on_seaweedfs_with_multipart_copy_overwrite_guard_and_find_latest(seaweedfs, monkeypatch,
                                                                                      tmp_path, empty_cwd):
    endpoint, client = seaweedfs
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    bucket = f"weed-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    options = {"endpoint_url": endpoint, "key": WEED_CREDENTIALS["AWS_ACCESS_KEY_ID"],
               "secret": WEED_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], "client_kwargs": {"region_name": "us-east-1"}}
    plugin = AsyncCheckpointIO(storage_options=options, remote_config=RemoteConfig(part_size_bytes=PART))
    run = f"s3://{bucket}/run"
    ckpt = checkpoint(7)
    plugin.save_checkpoint(ckpt, f"{run}/step=7.ckpt")  # 12 MiB: three parts
    plugin.save_checkpoint(ckpt, f"{run}/last.ckpt")  # same step, same weights: a server-side copy
    loaded = plugin.load_checkpoint(f"{run}/last.ckpt")
    assert torch.equal(loaded["state_dict"]["w"], ckpt["state_dict"]["w"])
    with pytest.raises(Exception, match="already exists"):
        plugin.save_checkpoint(checkpoint(8, numel=10), f"{run}/step=7.ckpt")  # another run's step-7 file
        plugin.wait_for_saves()
        plugin.raise_pending_error()
    plugin.teardown()

    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))
    assert keys == ["run/last.ckpt", "run/step=7.ckpt"]
    body = client.get_object(Bucket=bucket, Key="run/step=7.ckpt")["Body"].read()
    assert torch.equal(torch.load(io.BytesIO(body), weights_only=True)["state_dict"]["w"], ckpt["state_dict"]["w"])
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert AsyncCheckpointCallback.find_latest(run, storage_options=options) == f"{run}/step=7.ckpt"
    fresh = AsyncCheckpointIO(storage_options=options)  # the other kept files: a save before it failed
    fresh.remove_checkpoint(f"{run}/last.ckpt")
    fresh.teardown()
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])] == ["run/step=7.ckpt"]
    assert os.listdir(empty_cwd) == []
