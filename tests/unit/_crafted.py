"""Checkpoints made by hand for reader tests: ours with a rewritten checksum record, and one whose pickle runs code."""

from __future__ import annotations

import json
import os
import pickle

import lightning_ckpt as lc
from lightning_ckpt import layout, staging_plan
from lightning_ckpt.serialization import checksum
from lightning_ckpt.torch_zip import ALIGNMENT, TorchZipWriter, record_spans


def write_ours(path, state) -> str:
    """Writes ``state`` at ``path`` with our writer (one rank); returns the path."""
    lc.CheckpointWriter(lc.CheckpointWriterConfig(layout="file"), rank_info=lc.RankInfo(0, 1)).write(str(path), state)
    return str(path)


def write_per_tensor(path, state) -> str:
    """``write_ours`` with small tensors left unpacked: one record (and checksum) per tensor, as a file of an
    earlier version or of another writer has."""
    saved = staging_plan.PACK_LIMIT_BYTES
    staging_plan.PACK_LIMIT_BYTES = 0
    try:
        return write_ours(path, state)
    finally:
        staging_plan.PACK_LIMIT_BYTES = saved


def rewrite_checksum_record(path: str, mutate) -> None:
    """Rewrites the file at ``path`` with its checksum record replaced by ``mutate(record)`` (all else unchanged)."""
    with open(path, "rb") as f:
        records = {}
        for name, (offset, size) in record_spans(f, path).items():
            f.seek(offset)
            records[name] = f.read(size)
    records[layout.CHECKSUM_RECORD] = json.dumps(mutate(json.loads(records[layout.CHECKSUM_RECORD]))).encode()
    _write_records(path, records)


class _MakesADirectory:
    """Unpickling this creates a directory: proof that code from the file ran."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def write_code_checkpoint(path: str, marker: str) -> str:
    """A checkpoint with a valid checksum record whose pickle, once unpickled, creates the directory ``marker``."""
    data_pkl = pickle.dumps({"epoch": 1, "payload": _MakesADirectory(marker)}, protocol=2)
    record = {"format": layout.FORMAT_VERSION, "data_pkl_xxh3": checksum(data_pkl), "records": {},
              "key_paths": [], "metadata": {}}
    _write_records(path, {"data.pkl": data_pkl, ".storage_alignment": str(ALIGNMENT).encode(),
                          layout.CHECKSUM_RECORD: json.dumps(record).encode()})
    return path


def _write_records(path: str, records: dict[str, bytes]) -> None:
    tmp = path + ".rewrite"
    writer = TorchZipWriter(tmp)
    for name, data in records.items():
        writer.write_record(name, data)
    writer.close()
    os.replace(tmp, path)
