"""The ``lightning-ckpt`` command line, run as a real subprocess the way an operator runs it after a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest
import torch

import lightning_ckpt
from tests.unit._crafted import write_code_checkpoint, write_ours

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(lightning_ckpt.__file__)))


def _run(*args: str, entry: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = (entry or [sys.executable, "-m", "lightning_ckpt"]) + list(args)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)


def _state(step: int) -> dict:
    return {"state_dict": {"layer.weight": torch.randn(4, 3), "layer.bias": torch.arange(4, dtype=torch.float64) + 0.25},
            "epoch": 2, "global_step": step, "pytorch-lightning_version": "2.6.0"}


def _flip_a_tensor_byte(path) -> None:
    data = bytearray(open(path, "rb").read())
    data[bytes(data).find((torch.arange(4, dtype=torch.float64) + 0.25).numpy().tobytes()) + 3] ^= 0x40
    open(path, "wb").write(bytes(data))


@pytest.mark.timeout(300)
def test_verify_exits_0_only_when_every_path_verifies_with_one_line_per_path(tmp_path):
    good = write_ours(tmp_path / "good.ckpt", _state(1))
    assert (done := _run("verify", good)).returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("VERIFIED") and good in done.stdout

    bad = write_ours(tmp_path / "bad.ckpt", _state(2))
    _flip_a_tensor_byte(bad)
    missing = str(tmp_path / "missing.ckpt")
    done = _run("verify", good, bad, missing)
    lines = done.stdout.splitlines()
    assert done.returncode == 1, done.stderr
    assert [line.split()[0] for line in lines] == ["VERIFIED", "CORRUPT", "MISSING"]
    assert bad in lines[1] and "checksum mismatch" in lines[1] and missing in lines[2]


@pytest.mark.timeout(300)
def test_inspect_reports_keys_shapes_dtypes_bytes_epoch_step_versions_and_status(tmp_path):
    path = write_ours(tmp_path / "a.ckpt", _state(42))
    done = _run("inspect", "--json", path)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["status"] == "verified" and info["bytes"] == os.path.getsize(path)
    assert info["epoch"] == 2 and info["global_step"] == 42 and info["versions"]["lightning"] == "2.6.0"
    tensors = {t["key"]: t for t in info["tensors"]}
    assert tensors["state_dict.layer.weight"] == {"key": "state_dict.layer.weight", "shape": [4, 3],
                                                  "dtype": "float32", "bytes": 48}
    assert tensors["state_dict.layer.bias"]["dtype"] == "float64"
    text = _run("inspect", path)
    assert text.returncode == 0 and "state_dict.layer.weight" in text.stdout and "verified" in text.stdout


@pytest.mark.timeout(300)
def test_inspect_never_runs_code_from_a_crafted_checkpoint(tmp_path):
    marker = str(tmp_path / "code-ran")
    path = write_code_checkpoint(str(tmp_path / "evil.ckpt"), marker)
    done = _run("inspect", "--json", path)
    assert not os.path.exists(marker)
    info = json.loads(done.stdout)
    assert info["structure"].startswith("not loaded") and info["status"] == "verified"


@pytest.mark.timeout(300)
def test_latest_prints_the_newest_complete_checkpoint_and_exits_1_when_there_is_none(tmp_path):
    for step in (1, 2):
        write_ours(tmp_path / f"step={step}.ckpt", _state(step))
    (tmp_path / "step=3.ckpt").write_bytes(b"torn")
    done = _run("latest", str(tmp_path))
    assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / "step=2.ckpt"), done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _run("latest", str(empty))
    assert done.returncode == 1 and done.stdout == "" and "no complete checkpoint" in done.stderr


@pytest.mark.timeout(300)
def test_the_console_script_runs_the_same_command_line(tmp_path):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        target = tomllib.load(f)["project"]["scripts"]["lightning-ckpt"]
    module, func = target.split(":")
    entry = [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]
    path = write_ours(tmp_path / "a.ckpt", _state(1))
    done = _run("verify", path, entry=entry)
    assert done.returncode == 0 and done.stdout.startswith("VERIFIED"), done.stderr
    assert _run("verify", str(tmp_path / "nothing"), entry=entry).returncode == 1


def test_latest_takes_the_callbacks_filename_with_or_without_ckpt_and_reports_a_bad_dir_in_one_line(tmp_path):
    write_ours(tmp_path / "step=3.ckpt", _state(3))
    for pattern in ("step={step}", "step={step}.ckpt"):  # the callback accepts both
        done = _run("latest", str(tmp_path), "--filename", pattern)
        assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / "step=3.ckpt"), (pattern, done.stderr)
    done = _run("latest", str(tmp_path / "step=3.ckpt"))  # a file, not a directory
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert str(tmp_path / "step=3.ckpt") in done.stderr and "NotADirectoryError" in done.stderr
