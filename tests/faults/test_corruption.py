"""Damage after the commit: every flipped byte, truncation, missing rank file or manifest is refused by name."""

from __future__ import annotations

import json
import os
import random
from datetime import timedelta

import pytest
import torch
from torch.distributed import TCPStore

import lightning_ckpt as lc
from lightning_ckpt.layout import MANIFEST_NAME
from tests._helpers import assert_equal_state
from tests.faults._faults import run_ranks_in_threads

pytestmark = pytest.mark.faults

STATE = {"model": {"w": torch.arange(2048, dtype=torch.float32), "b": torch.ones(7, dtype=torch.float64)},
         "optimizer": {"state": {0: {"exp_avg": torch.full((5,), 0.5)}}, "param_groups": [{"lr": 0.1}]},
         "step": 3, "name": "run"}


def _read(path, rank=0):
    return lc.CheckpointReader(lc.RankInfo(rank, 2) if rank else None).read(path)[0]


def test_every_flipped_byte_is_detected_or_harmless(tmp_path):
    """Bit flips anywhere in a committed file: the load fails with a CheckpointError naming the file, or (flips in
    zip padding and unused header fields) returns exactly what was saved. Never silently different data."""
    path = tmp_path / "a.ckpt"
    with lc.make_sync_checkpointer() as ck:
        ck.save(path, STATE)
    original = path.read_bytes()
    rng = random.Random(5)
    detected = 0
    # Every byte of the first local header and data.pkl, and a sample of the rest (tensor data, directory).
    positions = list(range(256)) + rng.sample(range(256, len(original)), 400)
    for pos in positions:
        damaged = bytearray(original)
        damaged[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        try:
            loaded = _read(str(path))
        except lc.CheckpointError as e:
            assert str(path) in str(e), f"byte {pos}: error does not name the file: {e}"
            detected += 1
            continue
        assert_equal_state(loaded, STATE, f"byte {pos}")
    assert detected > len(positions) // 2  # most bytes matter; the rest provably did not change the result


def test_every_truncation_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "a.ckpt"
    with lc.make_sync_checkpointer() as ck:
        ck.save(path, STATE)
    original = path.read_bytes()
    for length in [0, 1, 21, *random.Random(6).sample(range(22, len(original)), 40), len(original) - 1]:
        path.write_bytes(original[:length])
        with pytest.raises(lc.CorruptCheckpointError, match="a.ckpt") as info:
            _read(str(path))
        assert info.value.path == str(path)


def _write_two_rank_checkpoint(path: str, port: int) -> list[dict]:
    """Two ranks (threads, each with its own TCPStore client) write one directory checkpoint."""
    states = [{"model": {"w": torch.full((1000,), float(r))}, "rank": r, "step": 9} for r in range(2)]
    master = TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        info = lc.RankInfo(rank, 2)
        try:
            barrier = lc.TCPStoreBarrier(rank_info=info, tcpstore_port=port, master_address="127.0.0.1", timeout_secs=30,
                                         is_master=False)
            lc.CheckpointWriter(rank_info=info, barrier=barrier).write(path, states[rank])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    run_ranks_in_threads(rank_main)
    del master
    assert not errors, errors
    return states


@pytest.fixture
def two_rank_ckpt(tmp_path, free_port):
    path = str(tmp_path / "dist.ckpt")
    states = _write_two_rank_checkpoint(path, free_port)
    assert sorted(os.listdir(path)) == [MANIFEST_NAME, "checkpoint_0", "checkpoint_1"]
    for rank in range(2):
        assert_equal_state(_read(path, rank), states[rank])
    return path


def test_flipped_byte_in_a_rank_file_names_file_key_and_checksums(two_rank_ckpt):
    rank_file = os.path.join(two_rank_ckpt, "checkpoint_1")
    data = bytearray(open(rank_file, "rb").read())
    pos = bytes(data).find(torch.full((4,), 1.0).numpy().tobytes())
    data[pos + 1] ^= 0x10
    open(rank_file, "wb").write(bytes(data))
    with pytest.raises(lc.CorruptCheckpointError, match="checksum mismatch") as info:
        _read(two_rank_ckpt, rank=1)
    assert info.value.path == rank_file and info.value.key == "model.w" and rank_file in str(info.value)
    assert info.value.expected in str(info.value) and info.value.actual in str(info.value)
    assert _read(two_rank_ckpt, rank=0)["rank"] == 0  # the other rank's part is unaffected


def test_truncated_rank_file_is_refused_by_its_manifest_size(two_rank_ckpt):
    rank_file = os.path.join(two_rank_ckpt, "checkpoint_0")
    os.truncate(rank_file, os.path.getsize(rank_file) - 100)
    with pytest.raises(lc.CorruptCheckpointError, match="manifest says") as info:
        _read(two_rank_ckpt, rank=0)
    assert info.value.path == rank_file


def test_missing_rank_file_is_an_incomplete_checkpoint(two_rank_ckpt):
    os.remove(os.path.join(two_rank_ckpt, "checkpoint_1"))
    with pytest.raises(lc.IncompleteCheckpointError, match="incomplete checkpoint.*checkpoint_1.*rank 1") as info:
        _read(two_rank_ckpt, rank=1)
    assert two_rank_ckpt in str(info.value)


def test_missing_manifest_is_an_incomplete_checkpoint_for_every_rank(two_rank_ckpt):
    os.remove(os.path.join(two_rank_ckpt, MANIFEST_NAME))
    for rank in range(2):
        with pytest.raises(lc.IncompleteCheckpointError, match=f"incomplete checkpoint: .*{MANIFEST_NAME}") as info:
            _read(two_rank_ckpt, rank=rank)
        assert two_rank_ckpt in str(info.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "not_an_object", "no_sizes"])
def test_damaged_manifest_is_refused_naming_it(two_rank_ckpt, damage):
    manifest = os.path.join(two_rank_ckpt, MANIFEST_NAME)
    text = open(manifest).read()
    replacement = {"garbage": "\x00\xff{", "truncated": text[: len(text) // 2], "empty": "",
                   "not_an_object": "[1, 2]",
                   "no_sizes": json.dumps({**json.loads(text), "files": {"checkpoint_0": {}, "checkpoint_1": {}}})}
    open(manifest, "w", encoding="latin-1").write(replacement[damage])
    with pytest.raises(lc.CheckpointError, match=MANIFEST_NAME) as info:
        _read(two_rank_ckpt, rank=0)
    assert manifest in str(info.value)
