"""Remote uploads under faults injected by the test server: nothing half-published, errors raised, time bounded."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
import torch

from lightning_ckpt import remote
from lightning_ckpt.checkpoint_process import CheckpointProcessConfig
from lightning_ckpt.config import CheckpointerConfig
from lightning_ckpt.errors import CheckpointError, CheckpointWriteError, CorruptCheckpointError
from tests._helpers import wait_for
from lightning_ckpt.lightning import AsyncCheckpointIO, SyncCheckpointIO
from lightning_ckpt.remote import RemoteConfig
from tests.remote.test_remote_paths import PART, checkpoint

pytestmark = [pytest.mark.faults, pytest.mark.remote]
PLUGINS = [AsyncCheckpointIO, SyncCheckpointIO]


def plugin_for(cls, write_timeout_secs: float = 60.0, **remote_kwargs):
    config = CheckpointerConfig(process_config=CheckpointProcessConfig(write_timeout_secs=write_timeout_secs))
    return cls(config, remote_config=RemoteConfig(part_size_bytes=PART, **remote_kwargs))


def save_and_finish(plugin, ckpt, url) -> None:
    """Save, then wait for the save (a failure is raised here, from the save itself or from teardown)."""
    try:
        plugin.save_checkpoint(ckpt, url)
    finally:
        plugin.teardown()


@pytest.mark.parametrize("plugin_cls", PLUGINS, ids=lambda c: c.__name__)
def test_a_part_refused_after_two_parts_publishes_nothing_and_aborts_the_upload(plugin_cls, s3, empty_cwd):
    url = f"{s3.url}/run/model.ckpt"
    save_and_finish(plugin_for(plugin_cls), checkpoint(1), url)
    old = s3.get("run/model.ckpt")
    s3.server.set_faults({"op": "UploadPart", "part": 3, "action": "error", "status": 403, "code": "AccessDenied"})
    with pytest.raises(CheckpointWriteError, match="AccessDenied"):
        save_and_finish(plugin_for(plugin_cls), checkpoint(2), url)
    assert s3.get("run/model.ckpt") == old  # the old version, bit-identical
    assert s3.uploads() == [] and s3.server.ops("AbortMultipartUpload", "run/model.ckpt")
    assert os.listdir(empty_cwd) == []


def test_an_interrupt_in_the_middle_of_the_upload_aborts_it(s3, monkeypatch):
    real = remote._upload_part

    async def interrupted(client, upload, read, part, *args):
        if part.number == 2:
            raise KeyboardInterrupt
        return await real(client, upload, read, part, *args)

    monkeypatch.setattr(remote, "_upload_part", interrupted)
    plugin = plugin_for(SyncCheckpointIO, max_concurrency=1)
    with pytest.raises(KeyboardInterrupt):
        plugin.save_checkpoint(checkpoint(1), f"{s3.url}/run/model.ckpt")
    plugin.teardown()
    assert s3.keys() == [] and s3.uploads() == [] and s3.server.ops("AbortMultipartUpload")


@pytest.mark.parametrize("fault", [
    {"op": "CreateMultipartUpload", "status": 403, "code": "AccessDenied"},
    {"op": "UploadPart", "status": 403, "code": "QuotaExceeded"},
    {"op": "CompleteMultipartUpload", "status": 404, "code": "NoSuchBucket"},
], ids=lambda f: f["code"])
def test_refusals_are_raised_at_the_next_save_not_swallowed(fault, s3):
    s3.server.set_faults({"action": "error", **fault})
    plugin = plugin_for(AsyncCheckpointIO)
    plugin.save_checkpoint(checkpoint(1, numel=10), f"{s3.url}/run/step=1.ckpt")
    plugin.wait_for_saves()
    with pytest.raises(CheckpointWriteError, match=fault["code"]):
        plugin.save_checkpoint(checkpoint(2, numel=10), f"{s3.url}/run/step=2.ckpt")
    plugin.teardown()
    assert "run/step=1.ckpt" not in s3.keys() and s3.uploads() == []


def test_503s_and_dropped_connections_are_retried_and_the_save_succeeds(s3):
    s3.server.set_faults(
        {"op": "CreateMultipartUpload", "times": 1, "action": "error", "status": 503, "code": "SlowDown"},
        {"op": "UploadPart", "part": 2, "times": 2, "action": "error", "status": 503, "code": "SlowDown"},
        {"op": "UploadPart", "part": 1, "times": 1, "action": "drop"},
        {"op": "CompleteMultipartUpload", "times": 1, "action": "drop"},
        {"op": "GetObject", "times": 1, "action": "drop"},
    )
    plugin = plugin_for(AsyncCheckpointIO)
    ckpt = checkpoint(1)
    plugin.save_checkpoint(ckpt, f"{s3.url}/run/model.ckpt")
    loaded = plugin.load_checkpoint(f"{s3.url}/run/model.ckpt")
    plugin.teardown()
    assert torch.equal(loaded["state_dict"]["w"], ckpt["state_dict"]["w"])
    assert len(s3.server.ops("UploadPart")) == 3 + 3  # every injected fault was met and retried
    assert s3.uploads() == []


@pytest.mark.timeout(120)
def test_a_server_that_stops_reading_a_part_mid_body_is_retried_and_the_save_succeeds(s3):
    """A store or proxy that stops reading a body larger than the socket buffers holds the sender on a zero TCP
    window, where no read timeout runs: the attempt's bound (``RemoteConfig.min_send_bytes_per_sec``) cancels it
    and the part is sent again, long before the save's own deadline."""
    part = 32 << 20  # far more than loopback's buffers take from a reader that reads nothing
    s3.server.set_faults({"op": "UploadPart", "part": 1, "times": 1, "action": "hang", "secs": 60})
    s3.server.clear_log()
    config = CheckpointerConfig(process_config=CheckpointProcessConfig(write_timeout_secs=100.0))
    plugin = AsyncCheckpointIO(config, remote_config=RemoteConfig(
        part_size_bytes=part, connect_timeout_secs=2.0, read_timeout_secs=2.0, min_send_bytes_per_sec=part / 4))
    ckpt = checkpoint(1, numel=part // 4)
    save_and_finish(plugin, ckpt, f"{s3.url}/run/model.ckpt")  # before: CheckpointTimeoutError at the deadline
    parts = [o["part"] for o in s3.server.ops("UploadPart")]
    assert parts.count(1) == 2 and parts.count(2) == 1  # the stalled attempt, then its resend
    loaded = SyncCheckpointIO().load_checkpoint(f"{s3.url}/run/model.ckpt")
    assert torch.equal(loaded["state_dict"]["w"], ckpt["state_dict"]["w"]) and s3.uploads() == []


def test_remote_config_rejects_a_send_rate_that_is_not_positive():
    with pytest.raises(ValueError, match="min_send_bytes_per_sec must be > 0"):
        RemoteConfig(min_send_bytes_per_sec=0)


@pytest.mark.timeout(60)
def test_a_hung_server_fails_the_save_in_bounded_time_and_aborts(s3):
    s3.server.set_faults({"op": "UploadPart", "part": 2, "action": "hang", "secs": 60})
    plugin = plugin_for(AsyncCheckpointIO, write_timeout_secs=6.0)
    with pytest.raises(CheckpointError, match="deadline|timed out|Timeout"):
        save_and_finish(plugin, checkpoint(1), f"{s3.url}/run/model.ckpt")
    assert s3.keys() == [] and s3.uploads() == []


@pytest.mark.timeout(60)
def test_a_server_that_is_down_fails_fast(tmp_path, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE_DIR", str(tmp_path / "cache"))
    for name, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}.items():
        monkeypatch.setenv(name, value)
    plugin = SyncCheckpointIO(storage_options={"endpoint_url": f"http://127.0.0.1:{port}"},
                              remote_config=RemoteConfig(max_attempts=2))
    with pytest.raises(CheckpointWriteError, match="Could not connect|EndpointConnectionError"):
        plugin.save_checkpoint(checkpoint(1, numel=10), "s3://bucket/run/model.ckpt")
    plugin.teardown()


def test_a_flipped_byte_in_the_object_is_a_corrupt_checkpoint_error(s3):
    url = f"{s3.url}/run/model.ckpt"
    plugin = plugin_for(AsyncCheckpointIO)
    save_and_finish(plugin, checkpoint(1), url)
    data = bytearray(s3.get("run/model.ckpt"))
    data[len(data) // 2] ^= 0xFF  # inside the tensor data
    s3.client.put_object(Bucket=s3.name, Key="run/model.ckpt", Body=bytes(data))
    with pytest.raises(CorruptCheckpointError):
        plugin.load_checkpoint(url)
    plugin.teardown()


def test_step_named_objects_are_never_overwritten(s3):
    url = f"{s3.url}/run/step=1.ckpt"
    save_and_finish(plugin_for(SyncCheckpointIO), checkpoint(1, numel=10), url)
    old = s3.get("run/step=1.ckpt")
    with pytest.raises(FileExistsError, match="already exists"):
        save_and_finish(plugin_for(SyncCheckpointIO), checkpoint(2, numel=10), url)
    assert s3.get("run/step=1.ckpt") == old and s3.uploads() == []


@pytest.mark.timeout(120)
def test_sigkill_of_the_writer_mid_upload_keeps_the_old_object_and_the_next_writer_aborts_the_leftover(s3):
    url = f"{s3.url}/run/model.ckpt"
    save_and_finish(plugin_for(AsyncCheckpointIO), checkpoint(1), url)
    old = s3.get("run/model.ckpt")
    s3.server.set_faults({"op": "UploadPart", "part": 2, "action": "hang", "secs": 60})
    s3.server.clear_log()
    plugin = plugin_for(AsyncCheckpointIO)
    plugin.save_checkpoint(checkpoint(2), url)
    wait_for(lambda: any(o["part"] == 2 for o in s3.server.ops("UploadPart")), 60, "the upload's second part")
    os.kill(plugin._checkpointer.process.pid, signal.SIGKILL)
    with pytest.raises(CheckpointWriteError, match="died"):
        plugin.teardown()
    assert s3.get("run/model.ckpt") == old
    (dangling,) = s3.uploads()
    s3.server.set_faults()

    timeout = 5.0  # the next writer aborts our uploads older than its write timeout, in the same prefix only
    s3.client.create_multipart_upload(Bucket=s3.name, Key="elsewhere/model.ckpt")
    wait_for(lambda: time.time() - dangling["Initiated"].timestamp() > timeout, 30, "the dangling upload to age")
    save_and_finish(plugin_for(AsyncCheckpointIO, write_timeout_secs=timeout / 0.8), checkpoint(3, numel=10),
                    f"{s3.url}/run/other.ckpt")
    assert [u["Key"] for u in s3.uploads()] == ["elsewhere/model.ckpt"]
    assert s3.get("run/model.ckpt") == old
