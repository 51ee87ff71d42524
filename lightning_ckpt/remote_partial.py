"""Partial reads of remote objects of ours: only the zip directory, checksum record, pickle and requested records are
fetched (ranged GETs of one version), into a sparse local copy that the local reader reads as it reads a file."""

from __future__ import annotations

import logging
import os
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any

from lightning_ckpt import layout, remote_files
from lightning_ckpt.commit import Commit
from lightning_ckpt.manifest import ChecksumRecord
from lightning_ckpt.paths import RemotePath
from lightning_ckpt.read_engine import ReadStats
from lightning_ckpt.remote import RemoteConfig
from lightning_ckpt.storage_load import wanted_storages
from lightning_ckpt.torch_zip import central_entries, read_record
from lightning_ckpt.verification import OpenedFile

log = logging.getLogger(__name__)

_LOCAL_HEADER = 30  # bytes of a zip local header before its name and extra field
_ALWAYS_READ = ("data.pkl", "byteorder", layout.CHECKSUM_RECORD)  # what the local reader reads besides storages


@dataclass
class RemoteReadStats(ReadStats):
    """``ReadStats`` of a remote read, plus what came over the network: ``fetched_bytes`` in ``fetch_requests``
    GETs (the tail read and the HEAD included; a full download fetches the whole object)."""

    fetched_bytes: int = 0
    fetch_requests: int = 0


class SparseCopy(OpenedFile):
    """The local copy of a partial read: as long as the object, holding only the fetched ranges (the rest reads as
    zeros). Its record spans come from the object's zip directory, since the local headers of the records that
    were not fetched are not in it.

    Args:
        path: the object's URL (named in errors).
        dir_fd, name: where the copy lies.
        spans: ``{record name: (data offset, size)}``.
        fetched: the network side of the read (``RemoteReadStats`` fields ``fetched_bytes``, ``fetch_requests``).
    """

    def __init__(self, path: str, dir_fd: int, name: str, spans: dict[str, tuple[int, int]],
                 fetched: tuple[int, int]) -> None:
        super().__init__(path, dir_fd=dir_fd, name=name)
        self._known_spans = spans
        self.fetched = fetched

    def spans(self) -> dict[str, tuple[int, int]]:
        return self._known_spans

    def torch_only(self) -> str | None:
        return None  # a zip of stored records with our checksum record: fetch_partial checked it


@dataclass
class _Plan:
    """What a partial read fetches: the object's record spans, and the records whose local headers and bytes are
    fetched (``header_at``: their header offsets, to check each fetched header against the directory)."""

    spans: dict[str, tuple[int, int]]
    header_at: dict[str, int] = field(default_factory=dict)


def fetch_partial(target: RemotePath, state_dict: dict, config: RemoteConfig, timeout_secs: float) -> SparseCopy | None:
    """The sparse copy of ``target`` that a partial read of ``state_dict``'s keys needs, or None where a full
    download must do instead: not an object of ours (no checksum record, compressed records, a zip whose records
    are not where its directory implies). The records are chosen as the local partial read chooses them
    (``storage_load.wanted_storages``); their checksums are checked when the copy is read, as for a local file.

    Raises:
        FileNotFoundError: no such object. CheckpointError: the object kept changing, or the store refused.
    """
    def plan(tail: Any) -> tuple[_Plan | None, list[tuple[int, int]] | None]:
        found = _plan(tail, state_dict, target.url)
        if found is None:
            return None, None
        return found, [(at, found.spans[name][0] + found.spans[name][1] - at) for name, at in found.header_at.items()]

    scratch_path = target.cache_path("partial")
    os.makedirs(os.path.dirname(scratch_path), exist_ok=True)
    with Commit.create(scratch_path, fsync=False) as scratch:  # never published: removed on exit
        fd = scratch.opener()(os.O_RDWR | os.O_CREAT)
        try:
            read = remote_files.read_ranges(target, plan, fd, config, timeout_secs)
            if read.planned is None or not _headers_match(fd, read.planned):
                return None
        finally:
            os.close(fd)
        return SparseCopy(target.url, scratch.dir_fd, scratch.entry(), read.planned.spans,
                          (read.fetched_bytes, read.requests))


def fetch_structure(location: RemotePath, rank: int) -> tuple[SparseCopy, str, dict | None] | None:
    """What a quick check of rank ``rank``'s object of the remote checkpoint at ``location`` reads, without its
    tensors: the zip directory, the pickle and the checksum record (a partial read of no keys), checked against
    the manifest entry's size. None: not an object of ours (the caller downloads it to say what it is).

    Returns:
        ``(sparse copy, URL of the object, manifest entry or None)``; the caller closes the copy.

    Raises:
        As ``remote_dirs.fetch_for_read``; CorruptCheckpointError: not the size its manifest says.
    """
    from lightning_ckpt import remote_dirs
    from lightning_ckpt.checkpoint_reader import check_size

    copy, url, entry = remote_dirs.fetch_for_read(
        location, rank, fetch=lambda target, config, timeout_secs: fetch_partial(target, {}, config, timeout_secs))
    if copy is not None and entry is not None:
        try:
            check_size(copy, entry)
        except BaseException:
            copy.close()
            raise
    return None if copy is None else (copy, url, entry)


def _plan(tail: Any, state_dict: dict, url: str) -> _Plan | None:
    """From the object's tail (``remote_files.read_ranges``'s ``plan`` file; ``tail.start``: where its bytes
    begin): the records to fetch, or None when the object is not ours."""
    try:
        entries = central_entries(tail)
        payload = None if entries is None else read_record(tail, layout.CHECKSUM_RECORD)
        if payload is None:
            return None
        record = ChecksumRecord.from_json(payload, url)
    except (zipfile.BadZipFile, *remote_files.NOT_A_CHECKPOINT) as e:  # a full download reads it and says what is wrong
        log.debug("%s: no partial read (%s)", url, e)
        return None
    located = _locate(tail, entries)
    if located is None:
        return None
    spans, header_at = located
    storage_spans = {name[len("data/"):]: span for name, span in spans.items() if name.startswith("data/")}
    needed = [f"data/{key}" for key in wanted_storages(state_dict, record, storage_spans)]
    needed += [name for name in _ALWAYS_READ if name in spans]
    return _Plan(spans, {name: header_at[name] for name in needed})


def _locate(tail: Any, entries: list[tuple[str, int, int]]) -> tuple[dict, dict] | None:
    """``({record name: (data offset, size)}, {record name: header offset})``, folder stripped. A header in the
    tail is read; any other record's bytes end where the next record's header begins (our writer writes records
    back to back; ``_headers_match`` checks that for every header fetched), so no header need be fetched for a
    record that is not read. None: a zip laid out otherwise."""
    spans, header_at = {}, {}
    order = sorted(entries, key=lambda e: e[1])
    for i, (full, offset, size) in enumerate(order):
        name = full.split("/", 1)[-1]
        if offset >= tail.start:
            tail.seek(offset)
            data_at = _data_offset(offset, tail.read(_LOCAL_HEADER))
        elif i + 1 < len(order):
            data_at = order[i + 1][1] - size
            if data_at < offset + _LOCAL_HEADER + len(full.encode()):
                return None
        else:
            return None
        if data_at is None:
            return None
        spans[name], header_at[name] = (data_at, size), offset
    return spans, header_at


def _data_offset(offset: int, header: bytes) -> int | None:
    """Where the bytes of the record whose local header (at ``offset``) is ``header`` begin; None: no header."""
    if len(header) != _LOCAL_HEADER or header[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack_from("<HH", header, 26)
    return offset + _LOCAL_HEADER + name_len + extra_len


def _headers_match(fd: int, plan: _Plan) -> bool:
    """Whether every fetched record's local header puts its bytes where ``_locate`` put them."""
    for name, at in plan.header_at.items():
        if _data_offset(at, os.pread(fd, _LOCAL_HEADER, at)) != plan.spans[name][0]:
            log.debug("record %s is not where the zip directory implies: no partial read", name)
            return False
    return True
