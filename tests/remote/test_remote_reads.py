"""Reading remote checkpoints: the end of an object is read as far back as its zip directory and checksum record
reach, a body that stalls or drops is fetched again, a store that cannot be read is an error (never "not a
checkpoint"), and an object replaced during a download is read again from its new version."""

from __future__ import annotations

import io
import time
import zipfile

import pytest
import torch

from lightning_ckpt import remote_files
from lightning_ckpt.builder import make_sync_checkpointer
from lightning_ckpt.errors import CheckpointError, CheckpointWriteError
from lightning_ckpt.latest import find_latest_checkpoint, is_complete
from lightning_ckpt.lightning import SyncCheckpointIO
from lightning_ckpt.remote import RemoteConfig
from lightning_ckpt.remote_s3 import S3Store
from tests._threads import errors_of_concurrent_calls
from tests.remote.test_remote_paths import all_files

pytestmark = pytest.mark.remote
MANY = 30_000  # tensors: the zip directory and checksum record outgrow the first tail read (1 MiB)


def many_tensors(n: int = MANY) -> dict:
    return {f"layer.{i}.weight": torch.full((2,), float(i)) for i in range(n)}


def save(url: str, state: dict, step: int, remote_config: RemoteConfig | None = None) -> None:
    plugin = SyncCheckpointIO(remote_config=remote_config)
    plugin.save_checkpoint({"state_dict": state, "global_step": step}, url)
    plugin.teardown()


@pytest.mark.timeout(120)
def test_verify_checks_every_tensor_of_an_object_whose_record_lies_before_the_first_tail(s3):
    base = f"{s3.url}/run"
    save(f"{base}/step=1.ckpt", {"w": torch.ones(3)}, 1)
    state = many_tensors()
    state["big"] = torch.zeros(1 << 16)
    save(f"{base}/step=2.ckpt", state, 2)
    assert is_complete(f"{base}/step=2.ckpt", verify=True)

    data = bytearray(s3.get("run/step=2.ckpt"))
    data[data.find(bytes(4096)) + 100] ^= 0xFF  # one bit in "big"
    s3.client.put_object(Bucket=s3.name, Key="run/step=2.ckpt", Body=bytes(data))
    assert not is_complete(f"{base}/step=2.ckpt", verify=True)
    assert find_latest_checkpoint(base, verify=True) == f"{base}/step=1.ckpt"


@pytest.mark.timeout(120)
def test_a_foreign_zip_with_a_large_directory_is_not_a_complete_checkpoint(s3):
    base = f"{s3.url}/run"
    save(f"{base}/step=1.ckpt", {"w": torch.ones(3)}, 1)
    body = io.BytesIO()
    with zipfile.ZipFile(body, "w", zipfile.ZIP_STORED) as archive:
        for i in range(25_000):  # ~2 MiB of central directory
            archive.writestr(f"archive/data/some_rather_long_entry_name_{i:08d}", b"")
    s3.client.put_object(Bucket=s3.name, Key="run/step=2.ckpt", Body=body.getvalue())

    assert not is_complete(f"{base}/step=2.ckpt")
    assert find_latest_checkpoint(base) == f"{base}/step=1.ckpt"


@pytest.mark.timeout(120)
def test_a_layout_dir_checkpoint_of_70k_tensors_commits_and_loads(s3, tmp_path):
    url = f"{s3.url}/run/ck"
    state = many_tensors(70_000)  # a rank object's record alone is over 1 MiB
    checkpointer = make_sync_checkpointer()
    try:
        checkpointer.save(url, state)  # the manifest is written from each rank object's checksum record
        loaded = checkpointer.load(url)
    finally:
        checkpointer.close()
    assert len(loaded) == 70_000 and torch.equal(loaded["layer.123.weight"], state["layer.123.weight"])
    assert is_complete(url, verify=True)


def test_a_manifest_larger_than_the_first_tail_read_is_read_whole(s3, monkeypatch):
    url = f"{s3.url}/run/ck"
    checkpointer = make_sync_checkpointer()
    try:
        checkpointer.save(url, {"w": torch.arange(4)})
        monkeypatch.setattr(remote_files, "TAIL_BYTES", 16)  # the manifest is a few hundred bytes
        assert torch.equal(checkpointer.load(url)["w"], torch.arange(4))
    finally:
        checkpointer.close()
    assert len(s3.server.ops("GetObject", "MANIFEST.json")) >= 2


@pytest.mark.timeout(60)
def test_a_body_that_stalls_past_the_read_timeout_is_fetched_again(s3):
    config = RemoteConfig(read_timeout_secs=1.0)
    url = f"{s3.url}/run/x.ckpt"
    state = {"w": torch.randn(1 << 20)}  # 4 MiB: more than the socket buffers hold
    save(url, state, 1, config)
    s3.server.set_faults({"op": "GetObject", "action": "stallbody", "secs": 5, "times": 1})
    start = time.monotonic()
    loaded = SyncCheckpointIO(remote_config=config).load_checkpoint(url)
    assert torch.equal(loaded["state_dict"]["w"], state["w"])
    assert len(s3.server.ops("GetObject", "run/x.ckpt")) == 2 and time.monotonic() - start < 5


@pytest.mark.timeout(60)
def test_a_body_that_stalls_on_every_attempt_fails_as_a_read_failure_not_a_deadline(s3):
    config = RemoteConfig(read_timeout_secs=1.0, max_attempts=2)
    url = f"{s3.url}/run/x.ckpt"
    save(url, {"w": torch.randn(1 << 20)}, 1, config)
    s3.server.set_faults({"op": "GetObject", "action": "stallbody", "secs": 3})
    with pytest.raises(CheckpointWriteError, match="GetObject .* timed out"):
        SyncCheckpointIO(remote_config=config).load_checkpoint(url)
    assert len(s3.server.ops("GetObject", "run/x.ckpt")) == 2


@pytest.mark.timeout(60)
def test_find_latest_raises_when_the_newest_checkpoint_cannot_be_read(s3):
    base = f"{s3.url}/run"
    for step in (1, 2):
        save(f"{base}/step={step}.ckpt", {"w": torch.ones(3)}, step)
    s3.server.set_faults({"op": "GetObject", "key": "step=2", "action": "error", "status": 403,
                          "code": "AccessDenied"})
    with pytest.raises(CheckpointWriteError, match="AccessDenied"):
        find_latest_checkpoint(base)  # never step=1 in silence: step=2 may well be complete
    with pytest.raises(CheckpointWriteError, match="AccessDenied"):
        is_complete(f"{base}/step=2.ckpt")
    s3.server.set_faults()
    assert find_latest_checkpoint(base) == f"{base}/step=2.ckpt"


def _replace_after_head(monkeypatch, s3, key: str, times: int) -> list:
    """Make the next ``times`` HEADs of ``key`` be followed at once by a new version of the object."""
    real_head = S3Store.head
    versions = []

    async def head(self, target, deadline):
        answer = await real_head(self, target, deadline)
        if target.key == key and len(versions) < times:
            versions.append(torch.full((4,), float(len(versions) + 1)))
            body = io.BytesIO()
            torch.save({"state_dict": {"w": versions[-1]}}, body)
            s3.client.put_object(Bucket=s3.name, Key=key, Body=body.getvalue())
        return answer

    monkeypatch.setattr(S3Store, "head", head)
    return versions


def test_an_object_replaced_during_its_download_is_read_again_from_its_new_version(s3, monkeypatch, tmp_path):
    url = f"{s3.url}/run/last.ckpt"
    save(url, {"w": torch.zeros(4)}, 1)
    versions = _replace_after_head(monkeypatch, s3, "run/last.ckpt", times=1)
    loaded = SyncCheckpointIO().load_checkpoint(url)
    assert torch.equal(loaded["state_dict"]["w"], versions[0])
    assert len(s3.server.ops("HeadObject", "run/last.ckpt")) == 2
    assert all_files(tmp_path / "cache") == []


def test_an_object_replaced_on_every_read_fails_after_a_bounded_number_of_tries(s3, monkeypatch, tmp_path):
    url = f"{s3.url}/run/last.ckpt"
    save(url, {"w": torch.zeros(4)}, 1)
    _replace_after_head(monkeypatch, s3, "run/last.ckpt", times=100)
    with pytest.raises(CheckpointError, match="replaced during its download"):
        SyncCheckpointIO().load_checkpoint(url)
    assert len(s3.server.ops("HeadObject", "run/last.ckpt")) == remote_files._READ_ATTEMPTS
    assert all_files(tmp_path / "cache") == []


@pytest.mark.timeout(180)
def test_concurrent_loads_of_one_remote_checkpoint_never_share_a_download(s3, tmp_path):
    """The ranks of a node load the same ``ckpt_path`` at once: each download is its own file (a shared cache path
    let one load remove the copy another was about to read: FileNotFoundError), and none is left behind."""
    single, directory = f"{s3.url}/run/a.ckpt", f"{s3.url}/run/dir"
    state = {"w": torch.arange(1000.0)}
    plugin = SyncCheckpointIO()
    plugin.save_checkpoint({"state_dict": state}, single)
    checkpointer = make_sync_checkpointer()
    checkpointer.save(directory, state)
    checkpointer.close()

    def load_both() -> None:
        assert torch.equal(plugin.load_checkpoint(single)["state_dict"]["w"], state["w"])
        reader = make_sync_checkpointer()
        try:
            assert torch.equal(reader.load(directory)["w"], state["w"])
        finally:
            reader.close()

    try:
        assert errors_of_concurrent_calls(load_both, timeout_secs=120) == []
    finally:
        plugin.teardown()
    assert all_files(tmp_path / "cache") == []
