"""Checks and describes a checkpoint on disk without unpickling arbitrary objects (``find_latest``, the command line)."""

from __future__ import annotations

import dataclasses
import mmap
import os
import pickle
import stat
from dataclasses import dataclass, field
from typing import Any

from lightning_ckpt import fsspec_read, layout, paths
from lightning_ckpt.checkpoint_reader import (
    open_download, open_rank_file, open_remote_rank_file, open_unmanifested, rank_file_names, read_manifest,
)
from lightning_ckpt.errors import CheckpointError, CorruptCheckpointError, IncompleteCheckpointError
from lightning_ckpt.paths import RemotePath
from lightning_ckpt.verification import OpenedFile, is_temp, read_checksum_record, verify_records

# A DCP directory's manifest says ``"layout": "dcp"`` (``lightning_ckpt.dcp.manifest``, not imported here: it pulls
# in torch.distributed.checkpoint); DCP names its pickled metadata ``.metadata``.
_DCP_LAYOUT, _DCP_METADATA_NAME = "dcp", ".metadata"
# Lightning's non-tensor state in a sharded checkpoint directory (``lightning.fabric.utilities.load``'s
# ``_METADATA_FILENAME``).
_LIGHTNING_META_NAME = "meta.pt"

VERIFIED, COMPLETE, UNVERIFIED = "verified", "complete", "unverified"
INCOMPLETE, CORRUPT, MISSING, UNREADABLE = "incomplete", "corrupt", "missing", "unreadable"


@dataclass
class CheckResult:
    """What ``check_checkpoint`` found.

    ``status`` is one of: ``verified`` (every byte matches its checksum), ``complete`` (committed and well-formed;
    bytes not hashed), ``unverified`` (readable but carries no checksums: a plain ``torch.save`` file or PyTorch's
    writer's directory), ``incomplete`` (never committed), ``corrupt``, ``missing`` or ``unreadable``.
    """

    path: str
    status: str
    detail: str = ""
    files: list[str] = field(default_factory=list)
    hashed_bytes: int = 0
    manifest: dict | None = None
    nbytes: int = 0  # of the files checked

    def add(self, other: CheckResult) -> None:
        """Count the files ``other`` checked as this checkpoint's."""
        self.files += other.files
        self.hashed_bytes += other.hashed_bytes
        self.nbytes += other.nbytes

    @property
    def ok(self) -> bool:
        """Whether this is a committed checkpoint of ours (``verified`` or ``complete``)."""
        return self.status in (VERIFIED, COMPLETE)


def check_checkpoint(path: str | os.PathLike | RemotePath, *, deep: bool = True,
                     storage_options: dict | None = None) -> CheckResult:
    """Checks the checkpoint at ``path`` (a file, or a directory of rank files) from its bytes; never unpickles.

    A remote checkpoint (``s3://``, ``gs://``: a single object, or a directory's manifest and rank objects) is
    downloaded as the reader downloads it and its files checked as local ones are (a quick check, ``deep=False``,
    fetches only each object's zip directory, pickle and checksum record); messages name the URLs.

    Args:
        path: the checkpoint: a local path, a ``file://`` or remote URL, or a ``paths.RemotePath``.
        deep: hash every storage against its checksum (False: check the structure, the manifest and the pickle
            bytes only).
        storage_options: for a remote store (endpoint, credentials; default: the environment's, as the plugins').
    """
    return _check(path, deep, storage_options)[0]


def _check(path: Any, deep: bool, storage_options: dict | None,
           keep_rank: int | None = None) -> tuple[CheckResult, OpenedFile | None]:
    """``check_checkpoint``, and for a remote checkpoint, the download of rank ``keep_rank`` left open (the caller
    closes it): ``describe_checkpoint`` reads it without downloading it twice."""
    shown = path.url if isinstance(path, RemotePath) else os.fsdecode(os.fspath(path))
    if fsspec_read.is_read_only_url(path):
        return _check_read_only(shown, deep, keep_rank)
    try:
        location = paths.resolve(path, storage_options)
    except (ValueError, ImportError) as e:  # memory://, an unknown protocol, no bucket; the client not installed
        return CheckResult(shown, UNREADABLE, str(e)), None
    if not isinstance(location, RemotePath):  # a plain path as given (messages name it so); a file:// URL's path
        return _check_local(shown if location == os.path.abspath(shown) else location, deep), None
    try:
        return _check_remote(location, deep, keep_rank)
    except FileNotFoundError as e:
        return CheckResult(location.url, MISSING, str(e)), None
    except (CheckpointError, OSError) as e:  # CheckpointError: also a store that cannot be read
        return _failed(location.url, e), None


def _check_read_only(url: str, deep: bool, keep_rank: int | None) -> tuple[CheckResult, OpenedFile | None]:
    """A file at a URL we only read (``https://``, ...): copied once through fsspec, as a load reads it, and checked
    as a local file is; messages name the URL. The copy is removed at once (the open file keeps its bytes)."""
    from lightning_ckpt import remote_files

    try:
        local = fsspec_read.download(url, remote_files.LOOKUP_TIMEOUT_SECS)
    except FileNotFoundError:
        return CheckResult(url, MISSING, f"nothing at {url}"), None
    except (CheckpointError, OSError, ImportError) as e:
        return CheckResult(url, UNREADABLE, f"{type(e).__name__}: {e}"), None
    opened = open_download(local, url)
    try:
        result = _check_file(opened, url, deep)
    except (IncompleteCheckpointError, CorruptCheckpointError, OSError) as e:
        opened.close()
        return _failed(url, e), None
    if keep_rank == 0:
        return result, opened
    opened.close()
    return result, None


def _failed(path: str, e: BaseException) -> CheckResult:
    if isinstance(e, IncompleteCheckpointError):
        return CheckResult(path, INCOMPLETE, str(e))
    if isinstance(e, CorruptCheckpointError):
        return CheckResult(path, CORRUPT, str(e))
    return CheckResult(path, UNREADABLE, f"{type(e).__name__}: {e}")


def _check_local(path: str, deep: bool) -> CheckResult:
    try:
        if is_temp(os.path.basename(path.rstrip(os.sep))):
            raise IncompleteCheckpointError(f"{path} is a temp of an uncommitted save")
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            return _check_directory(path, deep)
        with OpenedFile(path) as opened:
            return _check_file(opened, path, deep)
    except FileNotFoundError as e:
        return CheckResult(path, MISSING, str(e) if os.path.lexists(path) else f"nothing at {path}")
    except (IncompleteCheckpointError, CorruptCheckpointError, OSError) as e:
        return _failed(path, e)


def _check_file(opened: OpenedFile, path: str, deep: bool, expected_pkl: str | None = None) -> CheckResult:
    record = read_checksum_record(opened)
    if record is None:
        torch_only = opened.torch_only()  # still a torch file? (CorruptCheckpointError: not one)
        how = f"; {torch_only}, read by torch.load" if torch_only else ""
        return CheckResult(path, UNVERIFIED, f"no checksums (not written by lightning_ckpt{how})", [opened.path],
                           nbytes=opened.size)
    if expected_pkl is not None and expected_pkl != record.data_pkl_xxh3:
        raise CorruptCheckpointError(f"corrupt checkpoint {opened.path}: not the file its manifest lists",
                                     path=opened.path, key="data.pkl")
    hashed = verify_records(opened, record) if deep else 0
    return CheckResult(path, VERIFIED if deep else COMPLETE, "", [opened.path], hashed, nbytes=opened.size)


def _check_directory(path: str, deep: bool) -> CheckResult:
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = set(os.listdir(dir_fd))
        if layout.MANIFEST_NAME not in names:
            return _check_unmanifested(path, dir_fd, names)
        manifest = read_manifest(path, dir_fd)
        if manifest.get("layout") == _DCP_LAYOUT:
            return _check_dcp_directory(path, dir_fd, names, manifest, deep)
        result = CheckResult(path, VERIFIED if deep else COMPLETE, manifest=manifest)
        world = manifest.get("world_size")
        if not isinstance(world, int) or isinstance(world, bool) or world < 1:
            raise CorruptCheckpointError(f"malformed manifest {os.path.join(path, layout.MANIFEST_NAME)}: world_size "
                                         f"must be an integer >= 1, got {world!r}", path=path, key="world_size")
        for rank in range(world):
            name = next((n for n in rank_file_names(rank) if n in manifest["files"]), None)
            if name is None:
                raise IncompleteCheckpointError(f"incomplete checkpoint: {path} has no file for rank {rank}")
        for name, entry in sorted(manifest["files"].items()):
            if name not in names:
                raise IncompleteCheckpointError(f"incomplete checkpoint: {path} lacks {name}, which its manifest lists")
            with open_rank_file(path, dir_fd, name, entry) as opened:
                one = _check_file(opened, path, deep, entry.get("data_pkl_xxh3"))
            if one.status == UNVERIFIED:
                raise CorruptCheckpointError(f"corrupt checkpoint {path}: {name} has no checksum record",
                                             path=os.path.join(path, name))
            result.add(one)
        return result
    finally:
        os.close(dir_fd)


def _check_remote(location: RemotePath, deep: bool, keep_rank: int | None) -> tuple[CheckResult, OpenedFile | None]:
    """A remote checkpoint: a single object, checked as a local file is; or a directory's manifest and the object
    of every rank it names, each downloaded as the reader downloads it (``open_remote_rank_file``) and checked
    as a local directory's rank file is. A quick check (not ``deep``) of an object of ours fetches only its zip
    directory, pickle and checksum record (``remote_partial.fetch_structure``), never its tensors."""
    from lightning_ckpt import remote_dirs, remote_files
    from lightning_ckpt.remote import RemoteConfig
    from lightning_ckpt.remote_partial import fetch_structure

    if is_temp(location.name):
        raise IncompleteCheckpointError(f"{location.url} is a temp of an uncommitted save")
    manifest = remote_dirs.read_manifest(location, RemoteConfig(), remote_files.LOOKUP_TIMEOUT_SECS)
    result = CheckResult(location.url, VERIFIED if deep else COMPLETE,
                         manifest=None if manifest is None else dataclasses.asdict(manifest))
    kept, checked = None, set()
    try:
        for rank in range(1 if manifest is None else manifest.world_size):
            quick = None if deep or rank == keep_rank else fetch_structure(location, rank)
            opened, url, entry = quick or open_remote_rank_file(location, rank)
            try:
                one = _check_file(opened, location.url, deep, entry and entry["data_pkl_xxh3"])
            finally:
                if rank == keep_rank:
                    kept = opened
                else:
                    opened.close()
            if manifest is None:
                return one, kept
            if one.status == UNVERIFIED:
                raise CorruptCheckpointError(f"corrupt checkpoint {location.url}: {url} has no checksum record",
                                             path=url)
            result.add(one)
            checked.add(url[len(location.url) + 1:])
        unchecked = sorted(set(manifest.files) - checked)
        if unchecked and checked <= set(manifest.files):  # (names of another manifest: re-saved meanwhile)
            raise CorruptCheckpointError(f"corrupt checkpoint {location.url}: its manifest lists {unchecked}, "
                                         f"objects of no rank below its world size {manifest.world_size}",
                                         path=location.child(layout.MANIFEST_NAME).url, key="files")
    except BaseException:
        if kept is not None:
            kept.close()
        raise
    return result, kept


def _check_dcp_directory(path: str, dir_fd: int, names: set[str], manifest: dict, deep: bool) -> CheckResult:
    """A committed DCP directory (``lightning_ckpt.dcp.StorageWriter``): every file it lists with its size, the
    whole-file checksums (DCP's pickled ``.metadata``, Lightning's ``meta.pt``: hashed, never unpickled), every
    chunk inside its file, and with ``deep`` every chunk's bytes against its xxh3."""
    from lightning_ckpt.dcp.manifest import METADATA_NAME

    files, chunks = manifest["files"], _dcp_chunks(path, manifest)
    if METADATA_NAME not in files:
        raise CorruptCheckpointError(f"corrupt checkpoint {path}: its manifest lists no {METADATA_NAME}",
                                     path=os.path.join(path, layout.MANIFEST_NAME), key="files")
    result = CheckResult(path, VERIFIED if deep else COMPLETE, manifest=manifest)
    for name, entry in sorted(files.items()):
        if name not in names:
            raise IncompleteCheckpointError(f"incomplete checkpoint: {path} lacks {name}, which its manifest lists")
        with open_rank_file(path, dir_fd, name, entry) as opened:
            result.hashed_bytes += _check_dcp_file(opened, name, entry, chunks.get(name, []), deep)
        result.files.append(opened.path)
        result.nbytes += opened.size
    unlisted = sorted(set(chunks) - set(files))
    if unlisted:
        raise CorruptCheckpointError(f"corrupt checkpoint {path}: chunks in {unlisted}, which its manifest does not "
                                     "list as files", path=os.path.join(path, layout.MANIFEST_NAME), key=unlisted[0])
    return result


def _dcp_chunks(path: str, manifest: dict) -> dict[str, list[tuple[int, int, dict]]]:
    """``{file name: [(offset, nbytes, entry)]}`` from a DCP manifest's chunk records (keys ``<file>@<offset>``);
    an entry holds the chunk's xxh3, or (a chunk the writer process wrote as a torch zip) each record's."""
    chunks: dict[str, list[tuple[int, int, dict]]] = {}
    raw = manifest.get("chunks")
    for key, entry in (raw.items() if isinstance(raw, dict) else [(None, None)]):
        name, _, offset = str(key).rpartition("@")
        if not (name and offset.isdigit() and isinstance(entry, dict) and isinstance(entry.get("nbytes"), int)
                and (isinstance(entry.get("xxh3"), str) or _is_record_map(entry.get("records")))):
            raise CorruptCheckpointError(f"malformed manifest {os.path.join(path, layout.MANIFEST_NAME)}: chunk "
                                         f"record {key!r}: {entry!r}", path=path, key="chunks")
        chunks.setdefault(name, []).append((int(offset), entry["nbytes"], entry))
    return chunks


def _is_record_map(records: Any) -> bool:
    return isinstance(records, dict) and bool(records) and all(isinstance(v, str) for v in records.values())


def _check_dcp_file(opened: OpenedFile, name: str, entry: dict, chunks: list[tuple[int, int, dict]],
                    deep: bool) -> int:
    """Checks one file of a DCP directory (its size was checked on opening); returns the bytes hashed."""
    from lightning_ckpt.dcp.manifest import chunk_key, verify_bytes, verify_chunk

    if "xxh3" in entry:  # a small whole file (.metadata, meta.pt): always hashed, as a file's data.pkl is
        verify_bytes(opened.path, name, opened.read_span((0, opened.size)), entry["xxh3"])
    for offset, nbytes, _ in chunks:
        if offset + nbytes > opened.size:
            raise CorruptCheckpointError(f"corrupt checkpoint {opened.path}: chunk at {offset} ({nbytes} bytes) "
                                         f"ends past the file's {opened.size} bytes", path=opened.path,
                                         key=chunk_key(name, offset))
    if not deep or not chunks or opened.size == 0:
        return opened.size if "xxh3" in entry else 0
    with mmap.mmap(opened.fd, 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
        for offset, nbytes, chunk_entry in sorted(chunks, key=lambda c: c[0]):
            with view[offset:offset + nbytes] as chunk:
                verify_chunk(opened.path, chunk_key(name, offset), chunk, chunk_entry)
    return sum(n for _, n, _ in chunks) + (opened.size if "xxh3" in entry else 0)


def _check_unmanifested(path: str, dir_fd: int, names: set[str]) -> CheckResult:
    if _DCP_METADATA_NAME in names or any(n.endswith(".distcp") for n in names):
        raise IncompleteCheckpointError(
            f"incomplete checkpoint: {path} is a DCP directory without {layout.MANIFEST_NAME} (a sharded save that "
            "never committed, or one by plain torch.distributed.checkpoint or a stock Lightning strategy)")
    files, nbytes = [], 0
    rank = 0
    while rank == 0 or f"checkpoint_{rank}.pt" in names:
        with open_unmanifested(path, dir_fd, names, rank) as opened:
            opened.torch_only()  # a torn file is neither a readable zip nor one of torch's legacy files
            files.append(opened.path)
            nbytes += opened.size
        rank += 1
    return CheckResult(path, UNVERIFIED, "no manifest and no checksums (written by PyTorch's checkpoint writer)", files,
                       nbytes=nbytes)


def describe_checkpoint(path: str | os.PathLike | RemotePath, rank: int = 0, *,
                        storage_options: dict | None = None) -> dict[str, Any]:
    """Keys, shapes, dtypes and bytes of one rank's state, epoch/step, versions and checksum status, as JSON-able data.

    The structure is loaded with ``torch.load(weights_only=True)``, which never runs code from the file; when that
    refuses (objects other than tensors and containers), the tensors are listed from the checksum record instead.
    A remote checkpoint is checked as ``check_checkpoint`` checks it, and the rank's download described.

    Args:
        path: as for ``check_checkpoint``.
        rank: which rank's file of a directory (a single file is rank 0; a sharded DCP directory is described
            whole, for any of its ranks).
        storage_options: as for ``check_checkpoint``.

    Raises:
        ValueError: the checkpoint checks but has no rank ``rank`` (the message names the path, the rank and the
            ranks it has).
    """
    shown = path.url if isinstance(path, RemotePath) else os.fsdecode(os.fspath(path))
    check, opened = _check(path, True, storage_options, keep_rank=rank)
    try:
        out: dict[str, Any] = {"path": shown, "status": check.status, "detail": check.detail, "files": check.files,
                               "bytes": check.nbytes}
        if check.manifest is not None:
            out["world_size"] = check.manifest.get("world_size")
            out["versions"] = {k: check.manifest.get(k) for k in ("format", "lightning_ckpt_version", "torch_version")}
        if not check.files:  # nothing that checks: nothing to describe
            return out
        ranks = _ranks(check)
        if rank not in ranks:
            raise ValueError(f"{shown} has no rank {rank} (its ranks: {_span(ranks)})")
        if check.manifest is not None and check.manifest.get("layout") == _DCP_LAYOUT:
            return _describe_dcp(check.path, check.manifest, out)
        if opened is None:
            file_path = _rank_file(check.path, check, rank)
            if file_path is None:
                return out
            opened = OpenedFile(file_path)
        _describe_file(opened, out)
        return out
    finally:
        if opened is not None:
            opened.close()


def _describe_file(opened: OpenedFile, out: dict[str, Any]) -> None:
    import torch

    record = _record_or_none(opened)
    if record is not None:
        out["metadata"] = record.metadata
    try:
        state = torch.load(opened.source, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError) as e:
        out["structure"] = f"not loaded: {str(e).splitlines()[0][:300]}"
        state = None
    out["tensors"] = _tensors(state, record)
    _add_state_fields(state, out)


def _ranks(check: CheckResult) -> range:
    """The ranks of a checkpoint that checked: a manifest's world size (every rank below it has a file), PyTorch's
    directory's ``checkpoint_<r>.pt`` files, or a single file's rank 0."""
    world = (check.manifest or {}).get("world_size")
    if isinstance(world, int):
        return range(world)
    return range(len(check.files)) if os.path.isdir(check.path) else range(1)


def _span(ranks: range) -> str:
    return "none" if not ranks else str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def _add_state_fields(state: Any, out: dict[str, Any]) -> None:
    if isinstance(state, dict):
        for key in ("epoch", "global_step", "step"):
            if isinstance(state.get(key), (int, float)):
                out[key] = state[key]
        if "pytorch-lightning_version" in state:
            out.setdefault("versions", {})["lightning"] = str(state["pytorch-lightning_version"])
        out["top_level_keys"] = [str(k) for k in state]


def _describe_dcp(path: str, manifest: dict, out: dict[str, Any]) -> dict[str, Any]:
    """A DCP directory: its chunks, and epoch/step from Lightning's ``meta.pt`` (``weights_only``) when it has one."""
    import torch

    chunks = manifest.get("chunks") or {}
    out["chunks"] = len(chunks)
    out["chunk_bytes"] = sum(c.get("nbytes", 0) for c in chunks.values() if isinstance(c, dict))
    if _LIGHTNING_META_NAME not in manifest.get("files", {}):
        return out
    try:
        state = torch.load(os.path.join(path, _LIGHTNING_META_NAME), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError) as e:
        out["structure"] = f"{_LIGHTNING_META_NAME} not loaded: {str(e).splitlines()[0][:300]}"
        return out
    _add_state_fields(state, out)
    return out


def _rank_file(path: str, check: CheckResult, rank: int) -> str | None:
    if not check.files:
        return None
    if not os.path.isdir(path):
        return check.files[0]
    wanted = {os.path.join(path, n) for n in rank_file_names(rank)}
    return next((f for f in check.files if f in wanted), None)


def _record_or_none(opened: OpenedFile) -> Any:
    try:
        return read_checksum_record(opened)
    except CorruptCheckpointError:
        return None


def _tensors(state: Any, record: Any) -> list[dict[str, Any]]:
    import torch

    from lightning_ckpt.tree import iter_leaves, path_str

    if state is not None:
        return [{"key": path_str(kp), "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                 "bytes": t.numel() * t.element_size()}
                for kp, t in iter_leaves(state) if isinstance(t, torch.Tensor)]
    if record is None:
        return []
    return [{"key": path_str(kp), "storage_bytes": record.records[key].nbytes}
            for kp, key in record.by_key_path.items()]
