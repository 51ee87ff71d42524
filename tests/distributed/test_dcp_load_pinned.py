"""A DCP load through our ``StorageReader`` reads one committed version whole: a save committing over the same path
between ``read_metadata`` and ``read_data`` changes nothing it reads, ranks that opened different versions all fail,
and no file descriptor outlives a load, finished or failed."""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from lightning_ckpt.dcp import DistributedCheckpointer, StorageReader, StorageWriter
from lightning_ckpt.dcp import storage_reader as storage_reader_module
from lightning_ckpt.dcp.manifest import DATA_FILE_TEMPLATE, read_manifest
from lightning_ckpt.errors import CheckpointError, CorruptCheckpointError, IncompleteCheckpointError

# ---------------------------------------------------------------- helpers


def _state(version: int) -> dict:
    """Same keys and shapes for every version, other values: a load mixing versions still fits its target."""
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    return {"w": base + 1000 * version, "b": torch.full((5,), float(version)), "step": version,
            "note": f"version {version}"}


def _zeros() -> dict:
    return {"w": torch.zeros(6, 8), "b": torch.zeros(5), "step": -1, "note": ""}


def _save(path: str, version: int) -> None:
    """A real save and commit with our writer: it exchanges the directory at ``path`` for the new one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(_state(version), storage_writer=StorageWriter(path), no_dist=True)


def _assert_version(state: dict, version: int) -> None:
    expected = _state(version)
    assert torch.equal(state["w"], expected["w"]) and torch.equal(state["b"], expected["b"])
    assert state["step"] == version and state["note"] == expected["note"]


def _load(reader: StorageReader, state: dict) -> None:
    """Our entry point (DCP's ``CheckpointException`` unwrapped into our errors, the reader closed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DistributedCheckpointer(StorageWriter(reader.path), reader, no_dist=True).load(state)


class _OverwritingReader(StorageReader):
    """Commits version ``new`` over its own path at one point of DCP's load flow (the rare interleaving, forced)."""

    def __init__(self, path: str, new: int, when: str, *, verify: bool = True) -> None:
        super().__init__(path, verify=verify)
        self.new, self.when = new, when

    def read_metadata(self, *args, **kwargs):
        metadata = super().read_metadata(*args, **kwargs)
        if self.when == "after_read_metadata":
            _save(self.path, self.new)
        return metadata

    def read_data(self, plan, planner):
        if self.when == "before_read_data":
            _save(self.path, self.new)
        return super().read_data(plan, planner)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------- single process


@pytest.mark.timeout(60)
@pytest.mark.parametrize("when", ["after_read_metadata", "before_read_data"])
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no_verify"])
def test_overwrite_during_load_returns_the_old_version_whole(tmp_path, verify, when):
    path = str(tmp_path / "ckpt")
    _save(path, 1)
    old_manifest = read_manifest(path)
    state = _zeros()
    _load(_OverwritingReader(path, new=2, when=when, verify=verify), state)
    _assert_version(state, 1)
    assert read_manifest(path) != old_manifest  # the overwrite really committed during the load
    again = _zeros()
    _load(StorageReader(path, verify=verify), again)
    _assert_version(again, 2)


@pytest.mark.timeout(60)
def test_files_not_held_open_fail_naming_the_file_and_never_mix(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt")
    _save(path, 1)
    monkeypatch.setattr(storage_reader_module, "PINNED_FILES_MAX", 0)  # every data file opened only when read
    state = _zeros()
    _load(StorageReader(path), state)  # without an overwrite, the files opened one at a time load as usual
    _assert_version(state, 1)
    for verify in (True, False):
        state = _zeros()
        with pytest.raises(IncompleteCheckpointError, match="replaced or removed") as info:
            _load(_OverwritingReader(path, new=2, when="before_read_data", verify=verify), state)
        assert os.path.join(path, DATA_FILE_TEMPLATE.format(rank=0)) in str(info.value)
        assert torch.count_nonzero(state["w"]) == 0 and state["step"] == -1  # nothing of either version read


@pytest.mark.timeout(60)
def test_no_descriptor_outlives_a_load_finished_or_failed(tmp_path):
    path, plain = str(tmp_path / "ckpt"), str(tmp_path / "plain")
    _save(path, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_state(1), checkpoint_id=plain, no_dist=True)  # plain DCP: no manifest, refused
    _load(StorageReader(path), _zeros())  # warm-up: torch opens what it keeps open on its first load
    before = _open_fds()
    kept = []  # every reader stays alive: a descriptor closed only by garbage collection would count

    def reader(cls=StorageReader, *args, **kwargs) -> StorageReader:
        kept.append(cls(*args, **kwargs))
        return kept[-1]

    state = _zeros()
    _plain_load(reader(StorageReader, path), state)  # torch's own entry point: nobody calls close
    _assert_version(state, 1)
    assert _open_fds() == before, "a finished load"
    _load(reader(StorageReader, path), _zeros())
    assert _open_fds() == before, "a finished load through DistributedCheckpointer"

    _load(reader(_OverwritingReader, path, new=2, when="after_read_metadata"), _zeros())
    assert _open_fds() == before, "a load during an overwrite"

    with pytest.raises(IncompleteCheckpointError, match="plain"):
        _load(reader(StorageReader, plain), _zeros())
    assert _open_fds() == before, "a refused load"

    with pytest.raises(RuntimeError, match="missing"):  # DCP's planner: a key the checkpoint lacks (strict)
        _load(reader(StorageReader, path), {**_zeros(), "missing": torch.zeros(2)})
    assert _open_fds() == before, "a load whose planning failed after read_metadata"

    data_file = os.path.join(path, DATA_FILE_TEMPLATE.format(rank=0))
    with open(data_file, "r+b") as f:
        f.seek(os.path.getsize(data_file) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        _load(reader(StorageReader, path), _zeros())
    with pytest.raises(BaseException, match="checksum mismatch"):  # DCP's CheckpointException
        _plain_load(reader(StorageReader, path), _zeros())
    assert _open_fds() == before, "a load that failed in read_data"

    _plain_dcp_load_failing_in_planning(path)  # torch's own entry point: nobody calls close
    gc.collect()
    assert _open_fds() == before, "an abandoned plain dcp.load, once its reader is garbage"


def _plain_load(reader: StorageReader, state: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=reader, no_dist=True)


def _plain_dcp_load_failing_in_planning(path: str) -> None:
    try:
        _plain_load(StorageReader(path), {**_zeros(), "missing": torch.zeros(2)})
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        assert "missing" in str(e)
    else:
        raise AssertionError("the load of a key the checkpoint lacks did not fail")


@pytest.mark.timeout(60)
def test_reads_in_pieces_are_joined_and_a_truncated_file_is_named(tmp_path, monkeypatch):
    from lightning_ckpt.dcp import pinned

    path = str(tmp_path / "ckpt")
    _save(path, 1)
    real_pread = os.pread
    monkeypatch.setattr(pinned.os, "pread", lambda fd, n, offset: real_pread(fd, min(n, 7), offset))
    state = _zeros()
    _load(StorageReader(path), state)  # as a read over 2 GiB returns: in pieces
    _assert_version(state, 1)
    monkeypatch.undo()
    data_file = os.path.join(path, DATA_FILE_TEMPLATE.format(rank=0))
    os.truncate(data_file, os.path.getsize(data_file) - 10)
    with pytest.raises(CorruptCheckpointError, match="truncated") as info:
        _load(StorageReader(path, verify=False), _zeros())
    assert info.value.path == data_file and info.value.key


# ---------------------------------------------------------------- two gloo ranks


class _OrderedReader(StorageReader):
    """Rank 1 opens version 1; then rank 0 commits version 2 and opens it (ordered by barriers on the default
    group, before DCP's first collective of the load)."""

    def read_metadata(self, *args, **kwargs):
        if dist.get_rank() == 1:
            metadata = super().read_metadata(*args, **kwargs)
            dist.barrier()
            dist.barrier()
            return metadata
        dist.barrier()
        _save(self.path, 2)
        metadata = super().read_metadata(*args, **kwargs)
        dist.barrier()
        return metadata


def _ranks_open_different_versions(rank: int, world: int, path: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if rank == 0:
        _save(path, 1)
    dist.barrier()
    state = _zeros()
    state["w"] = distribute_tensor(state["w"], init_device_mesh("cpu", (world,)), [Shard(0)])  # resharded on load
    w_before = state["w"].to_local().clone()
    before = _open_fds()
    try:
        DistributedCheckpointer(StorageWriter(path), _OrderedReader(path)).load(state)
    except CheckpointError as e:
        raised = {"type": type(e).__name__, "message": str(e)}
    else:
        raised = None
    leaked = sorted(_open_fds() - before)
    return {"raised": raised, "leaked": leaked, "untouched": torch.equal(state["w"].to_local(), w_before)}


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_ranks_that_opened_different_versions_all_fail(ranks2, tmp_path):
    path = str(tmp_path / "ckpt")
    for out in ranks2.run(_ranks_open_different_versions, path):
        assert out["raised"] is not None, "a load whose ranks opened different versions returned"
        assert out["raised"]["type"] == CheckpointError.__name__, out["raised"]
        assert "replaced while the ranks opened it" in out["raised"]["message"] and path in out["raised"]["message"]
        assert out["leaked"] == [] and out["untouched"]
    state = _zeros()
    _load(StorageReader(path), state)
    _assert_version(state, 2)
