"""``python -m lightning_ckpt verify|inspect`` on remote URLs, run as an operator runs it (a real subprocess, the
store reached through the environment: ``AWS_ENDPOINT_URL`` and credentials, as the ``s3`` fixture sets them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import lightning_ckpt
from lightning_ckpt.builder import make_sync_checkpointer
from lightning_ckpt.lightning import SyncCheckpointIO
from tests.remote.test_remote_paths import all_files

pytestmark = pytest.mark.remote
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(lightning_ckpt.__file__)))
BIAS = torch.arange(4, dtype=torch.float64) + 0.25  # bytes that occur once in the object: the one to flip


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "lightning_ckpt", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def _checkpoint(step: int) -> dict:
    return {"state_dict": {"layer.weight": torch.randn(4, 3), "layer.bias": BIAS.clone()}, "epoch": 2,
            "global_step": step, "pytorch-lightning_version": "2.6.0"}


def _save_object(url: str, checkpoint: dict) -> None:
    plugin = SyncCheckpointIO()
    try:
        plugin.save_checkpoint(checkpoint, url)
    finally:
        plugin.teardown()


def _save_directory(url: str, state: dict) -> None:
    """A multi-rank layout (``MANIFEST.json`` and a generation of rank objects), here of one rank."""
    checkpointer = make_sync_checkpointer()
    try:
        checkpointer.save(url, state)
    finally:
        checkpointer.close()


def _flip_bias_byte(s3, key: str) -> None:
    data = bytearray(s3.get(key))
    at = bytes(data).find(BIAS.numpy().tobytes())
    assert at >= 0
    data[at + 3] ^= 0x40
    s3.client.put_object(Bucket=s3.name, Key=key, Body=bytes(data))


def _rank_object(s3, prefix: str) -> str:
    (key,) = [k for k in s3.keys() if k.startswith(prefix + "/gen-")]
    return key


@pytest.mark.timeout(300)
def test_verify_of_good_remote_checkpoints_exits_0(s3, tmp_path):
    single, directory = f"{s3.url}/run/step=1.ckpt", f"{s3.url}/run/ck"
    _save_object(single, _checkpoint(1))
    _save_directory(directory, {"w": torch.arange(6.0), "bias": BIAS.clone()})
    done = _run("verify", single, directory)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["VERIFIED", single], ["VERIFIED", directory]]
    assert "bytes hashed" in lines[0] and "bytes hashed" in lines[1]
    quick = _run("verify", "--quick", single, directory)
    assert quick.returncode == 0 and [line.split() for line in quick.stdout.splitlines()] == [
        ["COMPLETE", single], ["COMPLETE", directory]]
    assert all_files(tmp_path / "cache") == []  # every download removed


@pytest.mark.timeout(300)
def test_verify_of_a_remote_checkpoint_with_a_corrupted_object_fails_naming_it(s3):
    single, directory = f"{s3.url}/run/step=1.ckpt", f"{s3.url}/run/ck"
    _save_object(single, _checkpoint(1))
    _save_directory(directory, {"w": torch.arange(6.0), "bias": BIAS.clone()})
    _flip_bias_byte(s3, "run/step=1.ckpt")
    rank_object = _rank_object(s3, "run/ck")
    _flip_bias_byte(s3, rank_object)
    done = _run("verify", single, directory)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["CORRUPT", "CORRUPT"], done.stdout
    assert f"corrupt checkpoint {single}: tensor 'state_dict.layer.bias' checksum mismatch" in lines[0]
    assert f"corrupt checkpoint {s3.url}/{rank_object}: tensor 'bias' checksum mismatch" in lines[1]


@pytest.mark.timeout(300)
def test_verify_of_a_missing_url_or_a_missing_rank_object_fails_naming_it(s3):
    directory = f"{s3.url}/run/ck"
    _save_directory(directory, {"w": torch.arange(6.0)})
    rank_object = _rank_object(s3, "run/ck")
    s3.client.delete_object(Bucket=s3.name, Key=rank_object)
    missing = f"{s3.url}/run/nothing.ckpt"
    done = _run("verify", missing, directory)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["MISSING", "INCOMPLETE"], done.stdout
    assert f"checkpoint not found: {missing}" in lines[0]
    assert f"{directory} lacks {rank_object.split('/', 2)[2]}" in lines[1]


@pytest.mark.timeout(300)
def test_inspect_of_a_remote_checkpoint_shows_what_inspect_shows_of_it_locally(s3, tmp_path):
    url, local = f"{s3.url}/run/step=42.ckpt", str(tmp_path / "step=42.ckpt")
    checkpoint = _checkpoint(42)
    _save_object(url, checkpoint)
    _save_object(local, checkpoint)
    done = _run("inspect", "--json", url)
    assert done.returncode == 0, done.stderr
    remote_info, local_info = json.loads(done.stdout), json.loads(_run("inspect", "--json", local).stdout)
    assert remote_info["path"] == url and remote_info["files"] == [url]
    assert remote_info["bytes"] == s3.client.head_object(Bucket=s3.name, Key="run/step=42.ckpt")["ContentLength"]
    assert remote_info["status"] == "verified" and remote_info["global_step"] == 42
    assert {t["key"]: t["shape"] for t in remote_info["tensors"]} == {"state_dict.layer.weight": [4, 3],
                                                                      "state_dict.layer.bias": [4]}
    for field in ("status", "detail", "tensors", "epoch", "global_step", "versions", "top_level_keys"):
        assert remote_info.get(field) == local_info.get(field), field

    text = _run("inspect", url)
    assert text.returncode == 0 and "state_dict.layer.bias" in text.stdout and "float64" in text.stdout
    wrong_rank = _run("inspect", url, "--rank", "1")
    assert wrong_rank.returncode == 1 and wrong_rank.stdout == ""
    assert wrong_rank.stderr.strip() == f"lightning-ckpt inspect: {url} has no rank 1 (its ranks: 0)"
    assert all_files(tmp_path / "cache") == []


@pytest.mark.timeout(300)
def test_a_quick_verify_fetches_the_structure_of_each_object_never_its_tensors(s3):
    """``verify --quick`` of a large remote checkpoint reads its zip directory, pickle and checksum record with
    ranged GETs, not the whole object; a deep verify still reads and hashes it all."""
    from lightning_ckpt.integrity import COMPLETE, VERIFIED, check_checkpoint
    from tests.remote.test_remote_partial_read import fetched_bytes

    big = {"w": torch.randn(4 << 20), "bias": BIAS.clone()}  # 16 MiB of tensors
    single, directory = f"{s3.url}/run/big.ckpt", f"{s3.url}/run/bigdir"
    _save_object(single, {"state_dict": big, "global_step": 1})
    _save_directory(directory, big)
    for url, key in ((single, "run/big.ckpt"), (directory, _rank_object(s3, "run/bigdir"))):
        size = s3.client.head_object(Bucket=s3.name, Key=key)["ContentLength"]
        s3.server.clear_log()
        assert check_checkpoint(url, deep=False).status == COMPLETE
        assert fetched_bytes(s3, key) < size // 8, f"{url}: a quick check fetched most of the object"  # the 1 MiB tail
        assert check_checkpoint(url).status == VERIFIED  # a deep check downloads and hashes every byte


@pytest.mark.timeout(300)
def test_a_quick_verify_still_finds_a_truncated_object_and_one_that_is_not_ours(s3):
    from lightning_ckpt.integrity import CORRUPT, UNVERIFIED, check_checkpoint

    directory = f"{s3.url}/run/ck"
    _save_directory(directory, {"w": torch.arange(6.0), "bias": BIAS.clone()})
    key = _rank_object(s3, "run/ck")
    s3.client.put_object(Bucket=s3.name, Key=key, Body=s3.get(key)[:-100])
    truncated = check_checkpoint(directory, deep=False)
    assert truncated.status == CORRUPT and "manifest says" in truncated.detail, truncated
    plain = f"{s3.url}/run/plain.ckpt"
    import io

    buffer = io.BytesIO()
    torch.save({"w": torch.arange(3.0)}, buffer)
    s3.client.put_object(Bucket=s3.name, Key="run/plain.ckpt", Body=buffer.getvalue())
    assert check_checkpoint(plain, deep=False).status == UNVERIFIED  # downloaded to say what it is
