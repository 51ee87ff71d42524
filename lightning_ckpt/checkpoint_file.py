"""One checkpoint file: prepared records written as a torch zip plus the checksum record (no torch needed).

The writer subprocess imports this and not torch, so it starts in a fraction of a second and stays small.
"""

from __future__ import annotations

import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from lightning_ckpt.layout import CHECKSUM_RECORD
from lightning_ckpt.manifest import ChecksumRecord, RecordChecksum
from lightning_ckpt.torch_zip import ALIGNMENT, TorchZipWriter, checksum, read_record

_HASH_IN_THREAD_BYTES = 1 << 20


@dataclass
class Record:
    """One tensor storage to write as ``data/<key>``: at ``offset`` in a staging buffer, or ``inline`` bytes."""

    key: str
    nbytes: int
    location: str
    offset: int | None = None
    storage: Any = None  # torch.UntypedStorage when written in-process (never sent to the writer process)
    inline: Any = None  # bytes (or, in-process, a memoryview of ``storage``)


@dataclass
class PreparedCheckpoint:
    """Everything the writer needs: the pickle bytes, the records, and which key path names each record."""

    data_pkl: bytes
    records: list[Record]
    # (json-able key path, record key) pairs; pickled (to cross to the writer) as one JSON array in bytes
    key_paths: list[tuple[Any, str]] | bytes = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def __getstate__(self) -> dict:
        # A state of 100k tensors has 100k key paths: as Python objects in the writer they would cost more memory
        # than the file's bytes; as JSON they cost a few bytes each and are written as they are. Encoded here,
        # when the request is sent (after staging returned), not in ``stage``.
        state = dict(self.__dict__)
        if not isinstance(self.key_paths, bytes):
            state["key_paths"] = json.dumps(self.key_paths, separators=(",", ":")).encode()
        return state

    @property
    def nbytes(self) -> int:
        return len(self.data_pkl) + sum(r.nbytes for r in self.records)


def write_file(path: str, prepared: PreparedCheckpoint, buffer: memoryview | None = None, direct_io: bool = False,
               opener: Callable[[int], int] | None = None, fsync: bool = False) -> ChecksumRecord:
    """Write ``prepared`` as a torch zip at ``path``, with its checksum record, and return that record (its
    ``key_paths`` are empty when they came encoded: they were spliced into the file as they were).

    Records with an ``offset`` are read from ``buffer`` (a staging buffer mapping), others from ``inline``. Each
    record is hashed from the same memory it is written from.

    Args:
        opener: ``flags -> fd`` that creates the file (``Commit.opener``); by default ``path`` is opened.
        fsync: fsync the file before closing it.

    Raises:
        OSError: the disk refused (ENOSPC, EFBIG, ...), with its errno and ``path``.
    """
    writer = TorchZipWriter(path, direct_io=direct_io, opener=opener)
    try:
        writer.write_record("data.pkl", prepared.data_pkl)
        writer.write_record(".storage_alignment", str(ALIGNMENT).encode())
        sums = _write_tensor_records(writer, prepared, buffer)
        record, payload = _checksum_json(prepared, sums)
        writer.write_record(CHECKSUM_RECORD, payload)
        writer.close(fsync=fsync)
        return record
    except OSError as e:
        writer.abort()
        if e.filename is None:
            raise OSError(e.errno, e.strerror, path) from e
        raise
    except BaseException:
        writer.abort()
        raise


def _checksum_json(prepared: PreparedCheckpoint, sums: dict[str, RecordChecksum]) -> tuple[ChecksumRecord, bytes]:
    """The checksum record's JSON; key paths that came encoded (``PreparedCheckpoint.__getstate__``) are spliced
    in as they are (the only ``"key_paths": []`` in it comes before any caller-supplied text)."""
    encoded = prepared.key_paths if isinstance(prepared.key_paths, bytes) else None
    record = ChecksumRecord(checksum(prepared.data_pkl), sums, [] if encoded is not None else prepared.key_paths,
                            prepared.metadata)
    payload = record.to_json()
    if encoded is None:
        return record, payload
    head, found, tail = payload.partition(b'"key_paths": []')
    if not found:
        raise ValueError("checksum record JSON without its key_paths field")
    return record, b"".join((head, b'"key_paths": ', encoded, tail))  # one copy of the (large) key paths


def _write_tensor_records(writer: TorchZipWriter, prepared: PreparedCheckpoint,
                          buffer: memoryview | None) -> dict[str, RecordChecksum]:
    """Write every record; large ones are hashed on a worker thread while they are written (both release the GIL)."""
    sums = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_ckpt-hash") as pool:
        for rec in prepared.records:
            data = _record_bytes(rec, buffer)
            digest = pool.submit(checksum, data) if rec.nbytes >= _HASH_IN_THREAD_BYTES else None
            writer.write_record(f"data/{rec.key}", data)
            sums[rec.key] = RecordChecksum(rec.nbytes, digest.result() if digest else checksum(data))
    return sums


def _record_bytes(rec: Record, buffer: memoryview | None) -> Any:
    if rec.offset is None:
        if rec.inline is None:
            raise ValueError(f"record {rec.key} has no bytes: resolve live storages before writing")
        return rec.inline
    if buffer is None:
        raise ValueError(f"record {rec.key} points into a staging buffer but none was given")
    return buffer[rec.offset:rec.offset + rec.nbytes]


def read_checksum_record(path: str, opener: Callable[[int], int] | None = None) -> ChecksumRecord | None:
    """The checksum record of a checkpoint file, or None for a plain ``torch.save`` file without one.

    Args:
        opener: ``flags -> fd`` that opens the file (e.g. relative to a directory descriptor).

    Raises:
        ValueError: not a zip file (``zipfile.BadZipFile`` is a ``ValueError`` here).
        CorruptCheckpointError: the record is malformed (names the path and the field).
        OSError: the file cannot be read.
    """
    try:
        payload = read_record(path, CHECKSUM_RECORD, opener)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a readable torch zip: {e}") from e
    return None if payload is None else ChecksumRecord.from_json(payload, path)
