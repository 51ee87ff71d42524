"""Reads checkpoints back, verifying checksums; a partial read loads only the requested tensors' bytes."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import stat
import threading
from dataclasses import dataclass
from typing import Any

import torch

from lightning_ckpt import layout, paths
from lightning_ckpt.errors import CorruptCheckpointError, IncompleteCheckpointError
from lightning_ckpt.partial_read import fill_targets, make_materializer
from lightning_ckpt.read_engine import DEFAULT_READ_THREADS, ReadStats
from lightning_ckpt.storage_load import load_storages, resolve_weights_only
from lightning_ckpt.types import STATE_DICT, RankInfo
from lightning_ckpt.verification import (
    ChecksumRecord, OpenedFile, copy_and_verify, is_temp, read_checksum_record, verify_records, verify_tree,
)

log = logging.getLogger(__name__)

_DIRECTORY_ATTEMPTS = 3  # a directory replaced while it is opened is opened again (the new one is complete)
_logged_once: set[str] = set()
_logged_lock = threading.Lock()


def _log_once(tag: str, level: int, message: str, *args: Any) -> None:
    with _logged_lock:
        if tag in _logged_once:
            return
        _logged_once.add(tag)
    log.log(level, message, *args)


class CheckpointReader:
    """Reads what ``CheckpointWriter`` wrote, what PyTorch's ``_experimental`` writer wrote, and ``torch.save`` files.

    Layouts: a directory ``<path>/checkpoint_<rank>.pt`` (PyTorch's; ours adds ``MANIFEST.json``), or one file at
    ``path`` (Lightning's). Better than the PyTorch original: every tensor of our files is checked against the xxh3
    checksum written with it (``verify=False`` opts out); the file is opened once and everything is read from that
    descriptor, so a reader racing an overwrite of the path reads the old or the new checkpoint, never a mix; a
    directory of ours without its manifest, or one holding a temp of ours, is refused as incomplete; a damaged
    file raises ``CorruptCheckpointError`` naming the path, the key and both checksums. PyTorch's own directories
    (no manifest, no checksums) are read unverified, which is logged once. CPU loads read at disk speed: every
    storage is allocated once and filled by ``read_threads`` parallel reads, each range hashed as it lands while
    the pickle is loaded (``read_engine``); a partial read reads only the requested tensors' bytes.

    Args:
        rank_info: which rank's file to read from a checkpoint directory.
        verify: check checksums by default.
        read_threads: ours: reads in flight per load.
    """

    def __init__(self, rank_info: RankInfo | None = None, verify: bool = True, *,
                 read_threads: int = DEFAULT_READ_THREADS) -> None:
        if not isinstance(read_threads, int) or read_threads < 1:
            raise ValueError(f"read_threads must be an int >= 1, got {read_threads!r}")
        self.rank_info = rank_info or RankInfo()
        self.verify = verify
        self.read_threads = read_threads
        self.last_read_stats: ReadStats | None = None  # what the latest read read (None: it went through torch.load)

    def read(self, path: str | os.PathLike, state_dict: STATE_DICT | None = None, *, map_location: Any = None,
             weights_only: bool | None = True, verify: bool | None = None,
             **kwargs: Any) -> tuple[STATE_DICT, list[str]]:
        """Read a checkpoint.

        Args:
            path: a checkpoint directory (``checkpoint_<rank>.pt`` inside) or a checkpoint file; or a remote URL
                (``s3://``; endpoint from ``AWS_ENDPOINT_URL`` and the like, or a ``paths.RemotePath`` with its
                storage options): a directory's manifest names this rank's object, which is downloaded and read
                like a local file; a verified partial read onto the CPU of an object of ours fetches only the
                ranges the local partial read reads (ranged GETs of one version; ``last_read_stats`` is then a
                ``remote_partial.RemoteReadStats`` with ``fetched_bytes``).
            state_dict: for a partial read, the keys to load, as torch's reader takes them: its tensors are
                filled in place (dicts key by key, lists item by item), other leaves replaced; only those tensors'
                bytes are read. None reads everything.
            map_location: as in ``torch.load``.
            weights_only: ours: as in ``torch.load`` (None: torch's default).
            verify: ours: check checksums (default: the reader's ``verify``).
            **kwargs: accepted for PyTorch's signature; unknown keywords are ignored (logged once).

        Returns:
            ``(state_dict, missing_keys)``: the loaded state and the requested keys the checkpoint lacks.

        Raises:
            FileNotFoundError: nothing at ``path``, or no file for this rank in a directory of PyTorch's.
            IncompleteCheckpointError: a directory that was never committed (no manifest on a file of ours, a temp
                of ours inside, no file for this rank).
            CorruptCheckpointError: truncated, unreadable, malformed checksum record, checksum mismatch, or not
                a regular file (a FIFO, a device).
            RuntimeError: a partial read's target tensor of another size or dtype than the file's (naming the
                key and both; no target is written), as torch's reader raises.
        """
        if kwargs:
            _log_once(f"kwargs:{sorted(kwargs)}", logging.WARNING,
                      "CheckpointReader.read ignores unknown keyword arguments %s", sorted(kwargs))
        verify = self.verify if verify is None else verify
        if paths.is_remote(path):
            return self._read_remote(paths.resolve(path), state_dict, map_location, weights_only, verify)
        path = os.fspath(path)
        for attempt in range(_DIRECTORY_ATTEMPTS):
            before = _identity(path)
            source = None
            try:
                source = _open_source(path, self.rank_info.global_rank)
                return self._read_source(source, state_dict, map_location, weights_only, verify)
            except (CorruptCheckpointError, IncompleteCheckpointError, FileNotFoundError):
                if attempt + 1 == _DIRECTORY_ATTEMPTS or before is None or _identity(path) == before:
                    raise
                log.info("%s was replaced while it was read; reading the new checkpoint", path)
            finally:
                if source is not None:
                    source.opened.close()
        raise AssertionError("unreachable")

    def _read_source(self, source: _Source, state_dict: STATE_DICT | None, map_location: Any,
                     weights_only: bool | None, verify: bool) -> tuple[STATE_DICT, list[str]]:
        weights_only = resolve_weights_only(weights_only)  # once, as torch.load would: every path below agrees
        record = _checked_record(source, verify)
        self.last_read_stats = None
        if _is_cpu(map_location):
            fast = self._read_storages(source, record, state_dict, weights_only)
            if fast is not None:
                return fast
        return _read_with_torch_load(source.opened, record, state_dict, map_location, weights_only, verify)

    def _read_storages(self, source: _Source, record: ChecksumRecord | None, state_dict: STATE_DICT | None,
                       weights_only: bool) -> tuple[STATE_DICT, list[str]] | None:
        """The CPU load of stored bytes (``load_storages``); None (nothing read, no target written) where
        ``torch.load`` must read the file instead."""
        fast = load_storages(source.opened, record, state_dict, weights_only, self.read_threads)
        if fast is None:
            return None
        loaded, self.last_read_stats = fast
        if state_dict is None:
            return loaded, []
        return state_dict, fill_targets(state_dict, loaded, source.opened.path, None)

    def _read_remote(self, location: Any, state_dict: STATE_DICT | None, map_location: Any,
                     weights_only: bool | None, verify: bool) -> tuple[STATE_DICT, list[str]]:
        """A remote checkpoint: download this rank's object (a directory's requires its manifest), then read the
        download like a local file, checked against the manifest's size and digest. A verified partial read onto
        the CPU of an object of ours fetches only what the local partial read would read (``remote_partial``)."""
        if state_dict is not None and verify and _is_cpu(map_location):
            partial = self._read_remote_partial(location, state_dict, weights_only)
            if partial is not None:
                return partial
        opened, url, entry = open_remote_rank_file(location, self.rank_info.global_rank)
        try:
            return self._read_source(_Source(url, opened, entry), state_dict, map_location, weights_only, verify)
        finally:
            opened.close()

    def _read_remote_partial(self, location: Any, state_dict: STATE_DICT, weights_only: bool | None,
                             ) -> tuple[STATE_DICT, list[str]] | None:
        """A partial read from a sparse copy of this rank's object (``remote_partial.fetch_partial``), read as a
        local file is; ``last_read_stats`` is a ``RemoteReadStats``. None (no target written): the object is not
        ours, or ``torch.load`` must read it: the caller downloads it whole."""
        from lightning_ckpt import remote_dirs
        from lightning_ckpt.remote_partial import RemoteReadStats, fetch_partial

        copy, url, entry = remote_dirs.fetch_for_read(
            location, self.rank_info.global_rank,
            fetch=lambda target, config, timeout_secs: fetch_partial(target, state_dict, config, timeout_secs))
        if copy is None:
            return None
        try:
            if entry is not None:
                check_size(copy, entry)
            source = _Source(url, copy, entry)
            weights_only = resolve_weights_only(weights_only)
            read = self._read_storages(source, _checked_record(source, True), state_dict, weights_only)
        finally:
            copy.close()
        if read is not None:
            fetched_bytes, fetch_requests = copy.fetched
            self.last_read_stats = RemoteReadStats(**dataclasses.asdict(self.last_read_stats),
                                                   fetched_bytes=fetched_bytes, fetch_requests=fetch_requests)
        return read


def _identity(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the directory at ``path``; None for a file (a file is read from its descriptor)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


@dataclass
class _Source:
    """The opened file of one read, and what its directory (if any) promised about it."""

    path: str
    opened: OpenedFile
    manifest_entry: dict | None = None
    unverified_layout: bool = False  # PyTorch's directory: no manifest, no checksums


def _open_source(path: str, rank: int) -> _Source:
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint not found: {path}") from e
    if not stat.S_ISDIR(st.st_mode):
        return _Source(path, OpenedFile(path))
    if is_temp(os.path.basename(path.rstrip(os.sep))):
        raise IncompleteCheckpointError(f"incomplete checkpoint: {path} is a temp of an uncommitted save")
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = set(os.listdir(dir_fd))
        if layout.MANIFEST_NAME in names:
            entry, name = _manifest_entry(path, dir_fd, names, rank)
            return _Source(path, open_rank_file(path, dir_fd, name, entry), entry)
        return _Source(path, open_unmanifested(path, dir_fd, names, rank), unverified_layout=True)
    finally:
        os.close(dir_fd)


def open_remote_rank_file(location: Any, rank: int) -> tuple[OpenedFile, str, dict | None]:
    """Download what rank ``rank`` reads of the remote checkpoint at ``location`` (``remote_dirs.fetch_for_read``:
    a directory's rank object, named by its manifest, or a single object) and open the download, checked against
    its manifest entry's size. The download is removed at once: the descriptor keeps its bytes. Errors name the
    object's URL.

    Returns:
        ``(opened file, URL of the object, manifest entry or None)``; the caller closes the file.

    Raises:
        As ``remote_dirs.fetch_for_read``; CorruptCheckpointError: not the size its manifest says.
    """
    from lightning_ckpt import remote_dirs

    local, url, entry = remote_dirs.fetch_for_read(location, rank)
    opened = open_download(local, url)
    if entry:
        try:
            check_size(opened, entry)
        except CorruptCheckpointError:
            opened.close()
            raise
    return opened, url, entry


def open_download(local: str, url: str) -> OpenedFile:
    """Open the download ``local`` of the object at ``url``, named by its URL in errors, and remove the download
    (the descriptor keeps its bytes)."""
    from lightning_ckpt.commit import remove_path

    try:
        dir_fd = os.open(os.path.dirname(local), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return OpenedFile(url, dir_fd=dir_fd, name=os.path.basename(local))
        finally:
            os.close(dir_fd)
    finally:
        remove_path(local)


def rank_file_names(rank: int) -> list[str]:
    """This rank's file names, preferred first: PyTorch's ``checkpoint_<rank>.pt``, then ours before it."""
    names = [f"checkpoint_{rank}.pt", layout.rank_file_name(rank), f"checkpoint_{rank}"]
    return list(dict.fromkeys(names))


def read_manifest(path: str, dir_fd: int) -> dict:
    """The manifest of the checkpoint directory ``path`` (open as ``dir_fd``), with every file's size checked to be an int.

    Raises:
        CorruptCheckpointError: unreadable JSON or no file sizes.
    """
    manifest_path = os.path.join(path, layout.MANIFEST_NAME)
    try:
        fd = os.open(layout.MANIFEST_NAME, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as f:
            manifest = json.loads(f.read())
    except ValueError as e:
        raise CorruptCheckpointError(f"unreadable manifest {manifest_path}: {e}", path=manifest_path) from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("nbytes"), int) for v in files.values()):
        raise CorruptCheckpointError(f"malformed manifest {manifest_path}: no file sizes", path=manifest_path,
                                     key="files")
    return manifest


def _manifest_entry(path: str, dir_fd: int, names: set[str], rank: int) -> tuple[dict, str]:
    files = read_manifest(path, dir_fd)["files"]
    for name in rank_file_names(rank):
        if name in files:
            if name not in names:
                raise IncompleteCheckpointError(
                    f"incomplete checkpoint: {path} lacks {name} for rank {rank}, which its manifest lists")
            return files[name], name
    raise IncompleteCheckpointError(
        f"incomplete checkpoint: {path} has no file for rank {rank} (manifest lists {sorted(files)})")


def open_rank_file(path: str, dir_fd: int, name: str, entry: dict) -> OpenedFile:
    opened = OpenedFile(os.path.join(path, name), dir_fd=dir_fd, name=name)
    try:
        check_size(opened, entry)
    except CorruptCheckpointError:
        opened.close()
        raise
    return opened


def check_size(opened: OpenedFile, entry: dict) -> None:
    """Raise CorruptCheckpointError unless ``opened`` is as large as its manifest ``entry`` says."""
    if opened.size != entry["nbytes"]:
        raise CorruptCheckpointError(
            f"corrupt checkpoint {opened.path}: size {opened.size} bytes, manifest says {entry['nbytes']}",
            path=opened.path, expected=str(entry["nbytes"]), actual=str(opened.size),
        )


def open_unmanifested(path: str, dir_fd: int, names: set[str], rank: int) -> OpenedFile:
    """A directory without a manifest: PyTorch's writer's (read unverified) unless it shows a save of ours."""
    temps = sorted(n for n in names if is_temp(n))
    if temps:
        raise IncompleteCheckpointError(f"incomplete checkpoint: {path} holds temps of an uncommitted save: {temps}")
    name = next((n for n in rank_file_names(rank) if n in names), None)
    if name is None or not name.endswith(".pt"):
        hint = "" if name is None else f" ({name} is ours: the save never committed)"
        raise IncompleteCheckpointError(
            f"incomplete checkpoint: {path} has no {layout.MANIFEST_NAME} and no checkpoint_{rank}.pt{hint}")
    opened = OpenedFile(os.path.join(path, name), dir_fd=dir_fd, name=name)
    try:
        if opened.torch_only() is None and layout.CHECKSUM_RECORD in opened.spans():
            raise IncompleteCheckpointError(
                f"incomplete checkpoint: {path} has no {layout.MANIFEST_NAME} but {name} is ours: the save never "
                "committed")
    except BaseException:
        opened.close()
        raise
    return opened


def _checked_record(source: _Source, verify: bool) -> ChecksumRecord | None:
    """The file's checksum record (None: unverified), checked against the manifest; logs an unverified read."""
    opened = source.opened
    record = read_checksum_record(opened) if verify else None
    if source.unverified_layout:
        _log_once(f"unverified:{source.path}", logging.WARNING,
                  "%s has no %s and no checksums (written by PyTorch's checkpoint writer): read unverified",
                  source.path, layout.MANIFEST_NAME)
    elif verify and record is None:
        log.debug("%s has no checksum record (plain torch.save file); read unverified", opened.path)
    if record is not None and source.manifest_entry is not None:
        expected = source.manifest_entry.get("data_pkl_xxh3")
        if isinstance(expected, str) and expected != record.data_pkl_xxh3:
            raise CorruptCheckpointError(
                f"corrupt checkpoint {opened.path}: not the file its manifest lists (data.pkl {record.data_pkl_xxh3},"
                f" manifest {expected})", path=opened.path, key="data.pkl", expected=expected,
                actual=record.data_pkl_xxh3)
    return record


def _read_with_torch_load(opened: OpenedFile, record: ChecksumRecord | None, state_dict: STATE_DICT | None,
                          map_location: Any, weights_only: bool, verify: bool) -> tuple[STATE_DICT, list[str]]:
    """What ``load_storages`` leaves to ``torch.load``: other map locations, legacy files, non-allowlisted globals.

    A partial read maps the file (reads nothing yet), fills the requested leaves and relocates only those
    (``map_location`` as ``torch.load`` applies it, per storage and its saved location).
    """
    mappable = _mappable(opened)
    if state_dict is None:
        opened.advise_sequential()  # the kernel starts reading the whole file now
        ours = record is not None or (not verify and mappable and layout.CHECKSUM_RECORD in opened.spans())
        if _is_cpu(map_location) and ours and mappable:
            # Our files hold CPU tensors: map the file, copy each storage out once while the kernel reads
            # ahead, and hash each copy on a second thread while the next one is copied.
            mapped = _load(opened, map_location="cpu", weights_only=weights_only, mmap=True)
            return copy_and_verify(opened, mapped, record), []
        loaded = _load(opened, map_location=map_location, weights_only=weights_only, mmap=False)
        if record is not None:
            verify_tree(opened, loaded, record)
        return loaded, []
    locations: dict[int, str] = {}  # saved location of each storage, for map_location

    def keep_on_cpu(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        locations[storage._cdata] = location
        return storage

    loaded = _load(opened, map_location=keep_on_cpu, weights_only=weights_only, mmap=mappable)
    materialize = make_materializer(map_location, locations, mappable)
    missing = fill_targets(state_dict, loaded, opened.path, record, materialize)
    if record is not None:  # tensors no key path reaches (inside other objects) were returned as well
        reached = set(record.by_key_path.values())
        verify_records(opened, record, [k for k in record.records if k not in reached])
    return state_dict, missing


def _mappable(opened: OpenedFile) -> bool:
    """Whether ``torch.load(mmap=True)`` maps this file's records where they are (CorruptCheckpointError: junk).

    Not for files only torch.load reads (legacy format; compressed records, which torch maps as if stored), nor,
    where ``torch.utils.serialization.config.load.calculate_storage_offsets`` is on, for a file with a
    ``.format_version`` record (earlier versions of ours wrote one): torch then computes the offsets itself,
    assuming ``torch.save``'s record order.
    """
    if opened.torch_only() is not None:
        return False
    from torch.utils.serialization import config

    return not (config.load.calculate_storage_offsets and ".format_version" in opened.spans())


def _load(opened: OpenedFile, *, map_location: Any, weights_only: bool, mmap: bool) -> Any:
    try:
        return torch.load(opened.source, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError:
        raise  # weights_only refusals are not corruption: torch's own message says what to do
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # ValueError: a damaged .storage_alignment
        reason = str(e) or type(e).__name__
        raise CorruptCheckpointError(f"corrupt checkpoint {opened.path}: {reason}", path=opened.path) from e


def _is_cpu(map_location: Any) -> bool:
    return map_location is None or (isinstance(map_location, (str, torch.device))
                                    and torch.device(map_location).type == "cpu")
