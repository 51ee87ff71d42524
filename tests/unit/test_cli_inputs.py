"""The command line refuses what it cannot answer: a rank the checkpoint lacks, a negative rank, a name pattern
``latest`` can never match, a location it cannot read; and it reads every local spelling the library reads
(``file://`` URLs)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lightning_ckpt import layout
from lightning_ckpt.checkpoint_writer import CheckpointWriter, CheckpointWriterConfig
from lightning_ckpt.cli import main
from lightning_ckpt.types import RankInfo
from tests.unit._crafted import write_ours


def _two_rank_directory(tmp_path) -> str:
    """A committed two-rank directory of ours (rank 0 holds ``w0``, rank 1 ``w1``): two one-rank saves, their rank
    files put side by side under one manifest that lists both (what two ranks' save commits)."""
    target = tmp_path / "two"
    files = {}
    for rank in (0, 1):
        one = tmp_path / f"one{rank}"
        CheckpointWriter(CheckpointWriterConfig(), RankInfo(0, 1)).write(str(one), {f"w{rank}": torch.ones(rank + 2)})
        manifest = json.loads((one / layout.MANIFEST_NAME).read_text())
        target.mkdir(exist_ok=True)
        name = layout.rank_file_name(rank)
        os.rename(one / layout.rank_file_name(0), target / name)
        files[name] = manifest["files"][layout.rank_file_name(0)]
    (target / layout.MANIFEST_NAME).write_text(json.dumps({**manifest, "world_size": 2, "files": files}))
    return str(target)


def _torchs_directory(tmp_path, ranks: int) -> str:
    """A directory as PyTorch's checkpoint writer leaves it: ``checkpoint_<r>.pt`` per rank, no manifest."""
    target = tmp_path / "torchs"
    target.mkdir()
    for rank in range(ranks):
        torch.save({"w": torch.zeros(3)}, target / f"checkpoint_{rank}.pt")
    return str(target)


@pytest.mark.timeout(120)
def test_inspect_of_a_rank_the_directory_lacks_fails_in_one_line_naming_path_rank_and_ranks(tmp_path, capsys):
    path = _two_rank_directory(tmp_path)
    assert main(["verify", path]) == 0
    assert capsys.readouterr().out.startswith("VERIFIED")
    assert main(["inspect", "--json", path, "--rank", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [t["key"] for t in info["tensors"]] == ["w1"] and info["world_size"] == 2

    assert main(["inspect", path, "--rank", "2"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert path in err and "no rank 2" in err and "0-1" in err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["file", "torchs directory"])
def test_inspect_of_a_rank_a_file_or_torchs_directory_lacks_fails(tmp_path, capsys, kind):
    path = write_ours(tmp_path / "a.ckpt", {"w": torch.ones(2)}) if kind == "file" else _torchs_directory(tmp_path, 1)
    assert main(["inspect", path]) == 0  # rank 0: there
    capsys.readouterr()
    assert main(["inspect", path, "--rank", "1", "--json"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert path in err and "no rank 1" in err and "ranks: 0)" in err


@pytest.mark.timeout(120)
def test_a_negative_or_non_integer_rank_is_a_usage_error(tmp_path, capsys):
    path = _torchs_directory(tmp_path, 2)
    for rank in ("-1", "one"):
        with pytest.raises(SystemExit) as exited:
            main(["inspect", path, "--rank", rank])
        assert exited.value.code == 2
        shown = rank if rank == "-1" else repr(rank)
        assert f"--rank: a rank is an integer >= 0, got {shown}" in capsys.readouterr().err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pattern, named", [("step={stp}", "{stp}"), ("step={step:03d}", "{step:03d}"),
                                            ("{epoch}-{val_loss}", "{val_loss}"), ("step={step", "not a name pattern")])
def test_latest_refuses_a_pattern_that_can_never_name_a_checkpoint(tmp_path, capsys, pattern, named):
    write_ours(tmp_path / "step=1.ckpt", {"w": torch.ones(2)})
    with pytest.raises(SystemExit) as exited:
        main(["latest", str(tmp_path), "--filename", pattern])
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == ""
    assert "--filename" in err and named in err
    assert main(["latest", str(tmp_path), "--filename", "{epoch}"]) == 1  # a good pattern that names none here
    assert main(["latest", str(tmp_path)]) == 0


@pytest.mark.timeout(120)
def test_verify_and_inspect_read_file_urls_as_the_library_does(tmp_path, capsys):
    path = write_ours(tmp_path / "a.ckpt", {"state_dict": {"w": torch.ones(2, 3)}, "global_step": 7})
    url = "file://" + path
    assert main(["verify", url]) == 0
    assert capsys.readouterr().out.startswith("VERIFIED")
    assert main(["inspect", "--json", url]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == "verified" and info["global_step"] == 7 and info["bytes"] == os.path.getsize(path)
    assert info["tensors"] == [{"key": "state_dict.w", "shape": [2, 3], "dtype": "float32", "bytes": 24}]


@pytest.mark.timeout(120)
def test_verify_of_a_location_no_store_reads_says_why_not_missing(tmp_path, capsys):
    """A URL no store reads is UNREADABLE with the reason; a URL fsspec reads (``memory://``, this process's) is
    read as a load reads it: nothing there is MISSING."""
    assert main(["verify", "memory://ckpt/a.ckpt", "s3://bucket-without-key", "zz://x/a.ckpt"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["MISSING", "UNREADABLE", "UNREADABLE"]
    assert "nothing at memory://ckpt/a.ckpt" in lines[0]
    assert "needs a bucket and a key" in lines[1]
    assert "unknown protocol 'zz'" in lines[2]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world_size", [0, -1, "2", True])
def test_a_manifest_without_a_valid_world_size_is_corrupt_not_verified(tmp_path, capsys, world_size):
    path = _two_rank_directory(tmp_path)
    manifest_path = os.path.join(path, layout.MANIFEST_NAME)
    manifest = json.loads(open(manifest_path).read())
    with open(manifest_path, "w") as f:
        json.dump({**manifest, "world_size": world_size, **({"files": {}} if world_size == 0 else {})}, f)
    assert main(["verify", path]) == 1
    out = capsys.readouterr().out
    assert out.startswith("CORRUPT") and "world_size" in out


@pytest.mark.timeout(60)
def test_latest_of_a_directory_that_does_not_exist_says_so(tmp_path, capsys):
    missing = str(tmp_path / "no-such-dir")
    assert main(["latest", missing]) == 1
    assert capsys.readouterr().err.strip() == f"{missing} is not a directory"
