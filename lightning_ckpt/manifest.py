"""The two records we keep beside the bytes: a checkpoint file's checksum record and a directory's manifest.

Each is a small dataclass written by ``to_json`` and read by ``from_json`` only: ``from_json`` checks every field it
reads, so malformed JSON (a flipped byte can leave valid JSON behind) is a ``CorruptCheckpointError`` naming the
path and the field, never a ``KeyError``/``TypeError`` later.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Iterator

from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.layout import FORMAT_VERSION
from lightning_ckpt.tree import path_str

_KEY_TYPES = frozenset({str, int})  # what a key path's elements may be


@dataclass(frozen=True)
class RecordChecksum:
    """One tensor storage record (``data/<key>``) of a checkpoint file: its size and xxh3-64 hex digest."""

    nbytes: int
    xxh3: str


@dataclass
class ChecksumRecord:
    """What ``lightning_ckpt/checksums.json`` inside a checkpoint file holds.

    Args:
        data_pkl_xxh3: digest of the pickle bytes (``data.pkl``).
        records: per storage key, its size and digest.
        key_paths: ``(key path, storage key)`` pairs: which state-dict leaf each storage belongs to.
        metadata: json-able facts the caller attached to the save.
    """

    data_pkl_xxh3: str
    records: dict[str, RecordChecksum]
    key_paths: list[tuple[list, str]] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    format: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        # Built by hand, not with asdict: that deep-copies every key path (20k tensors: tens of milliseconds).
        records = {k: {"nbytes": r.nbytes, "xxh3": r.xxh3} for k, r in self.records.items()}
        return json.dumps({"format": self.format, "data_pkl_xxh3": self.data_pkl_xxh3, "records": records,
                           "key_paths": self.key_paths, "metadata": self.metadata}).encode()

    @cached_property
    def by_key_path(self) -> dict[tuple, str]:
        """Tensor key path -> storage key (built once, on first use)."""
        return {tuple(key_path): key for key_path, key in self.key_paths}

    @cached_property
    def paths_by_key(self) -> dict[str, list[tuple]]:
        """Storage key -> the key paths of the tensors on it, in file order (several: a run of small tensors, or
        tied weights)."""
        out: dict[str, list[tuple]] = {}
        for key_path, key in self.by_key_path.items():
            found = out.get(key)
            if found is None:
                out[key] = [key_path]
            else:
                found.append(key_path)
        return out

    def describe(self, key: str) -> tuple[str, str]:
        """``(label, error key)`` naming storage ``key`` in an error: ``("tensor 'model.w'", "model.w")`` for the
        one tensor on it; the record and its first tensors for a storage that several share (a byte of which of
        them flipped cannot be told: the run has one checksum); the record alone when no key path reaches it."""
        return describe_storage(key, self.paths_by_key.get(key, ()))

    @classmethod
    def from_json(cls, data: bytes | str, path: str) -> "ChecksumRecord":
        """Parse and check a checksum record read from ``path`` (the one parser: writer, reader and finder).

        Raises:
            CorruptCheckpointError: not JSON, or a field is missing or of the wrong type (named in the message).
        """
        raw = _loads(data, path, "checksum record")
        check = _Checker(path, "checksum record")
        records = {}
        for key, entry, prefix in check.entries(raw, "records"):
            records[key] = RecordChecksum(check.int(entry, "nbytes", prefix), check.str(entry, "xxh3", prefix))
        key_paths = []
        for i, pair in enumerate(check.list(raw, "key_paths")):
            # type() rather than isinstance: JSON gives exactly these types, and a bool is not a key (set() of the
            # element types is the cheap check for 100k entries)
            if not (type(pair) is list and len(pair) == 2 and type(pair[0]) is list
                    and set(map(type, pair[0])) <= _KEY_TYPES and type(pair[1]) is str and pair[1] in records):
                check.fail(f"key_paths[{i}]", "a [key path of strings and integers, record key] pair naming a record")
            key_paths.append((pair[0], pair[1]))
        return cls(check.str(raw, "data_pkl_xxh3"), records, key_paths, check.dict(raw, "metadata", {}),
                   check.int(raw, "format"))


@dataclass(frozen=True)
class ManifestFile:
    """One rank file of a checkpoint directory: its size and the digest of its pickle bytes (None: unknown)."""

    nbytes: int
    data_pkl_xxh3: str | None = None


@dataclass
class Manifest:
    """``MANIFEST.json``, the commit marker of a checkpoint directory (written last, by rank 0).

    Args:
        world_size: the ranks that wrote the checkpoint.
        files: per rank file name, its size and pickle digest.
        metadata: json-able facts the caller attached to the save.
    """

    world_size: int
    files: dict[str, ManifestFile]
    metadata: dict = field(default_factory=dict)
    lightning_ckpt_version: str = "unknown"
    torch_version: str = "unknown"
    created_unix: float = field(default_factory=time.time)
    format: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes | str, path: str) -> "Manifest":
        """Parse and check a manifest read from ``path``.

        Raises:
            CorruptCheckpointError: not JSON, or a field is missing or of the wrong type (named in the message).
        """
        raw = _loads(data, path, "manifest")
        check = _Checker(path, "manifest")
        files = {}
        for name, entry, prefix in check.entries(raw, "files"):
            digest = entry.get("data_pkl_xxh3")
            if digest is not None and not isinstance(digest, str):
                check.fail(prefix + "data_pkl_xxh3", "a string or null")
            files[name] = ManifestFile(check.int(entry, "nbytes", prefix), digest)
        created = raw.get("created_unix", 0.0)
        if not isinstance(created, (int, float)) or isinstance(created, bool):
            check.fail("created_unix", "a number")
        return cls(check.int(raw, "world_size"), files, check.dict(raw, "metadata", {}),
                   str(raw.get("lightning_ckpt_version", "unknown")), str(raw.get("torch_version", "unknown")),
                   float(created), check.int(raw, "format"))


def _loads(data: bytes | str, path: str, what: str) -> dict:
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"corrupt checkpoint {path}: unreadable {what} ({e})", path=path) from e
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"corrupt checkpoint {path}: {what} is not a JSON object", path=path)
    return raw


class _Checker:
    """Field checks that raise ``CorruptCheckpointError`` naming the path and the field."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what

    def fail(self, field_name: str, expected: str) -> None:
        raise CorruptCheckpointError(
            f"corrupt checkpoint {self.path}: {self.what} field '{field_name}' must be {expected}",
            path=self.path, key=field_name,
        )

    def _get(self, raw: dict, name: str, prefix: str, default: Any) -> Any:
        if name not in raw:
            if default is not None:
                return default
            self.fail(prefix + name, "present")
        return raw[name]

    def int(self, raw: dict, name: str, prefix: str = "") -> int:
        value = self._get(raw, name, prefix, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            self.fail(prefix + name, "a non-negative integer")
        return value

    def str(self, raw: dict, name: str, prefix: str = "") -> str:
        value = self._get(raw, name, prefix, None)
        if not isinstance(value, str):
            self.fail(prefix + name, "a string")
        return value

    def dict(self, raw: dict, name: str, default: dict | None = None) -> dict:
        value = self._get(raw, name, "", default)
        if not isinstance(value, dict):
            self.fail(name, "an object")
        return value

    def list(self, raw: dict, name: str) -> list:
        value = self._get(raw, name, "", None)
        if not isinstance(value, list):
            self.fail(name, "a list")
        return value

    def entries(self, raw: dict, name: str) -> Iterator[tuple[str, dict, str]]:
        """The ``(key, entry, field prefix)`` triples of an object of objects (each entry checked to be one)."""
        for key, entry in self.dict(raw, name).items():
            if not isinstance(entry, dict):
                self.fail(f"{name}[{key!r}]", "an object")
            yield key, entry, f"{name}[{key!r}]."


def describe_storage(key: str, key_paths: "list[tuple] | tuple") -> tuple[str, str]:
    """``ChecksumRecord.describe`` given the key paths on storage ``key`` (for callers that hold only those)."""
    record = f"data/{key}"
    if len(key_paths) == 1:
        name = path_str(key_paths[0])
        return f"tensor '{name}'", name
    if key_paths:
        shown = ", ".join(f"'{path_str(p)}'" for p in key_paths[:3])
        more = ", ..." if len(key_paths) > 3 else ""
        return f"one of the {len(key_paths)} tensors in record {record} ({shown}{more})", record
    return f"record {record}", record
