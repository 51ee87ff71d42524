"""Writes one rank's part of a checkpoint and commits it atomically (single file, or a directory of rank files)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from lightning_ckpt import layout, paths
from lightning_ckpt.barriers import Barrier, barrier_report_error, barrier_wait
from lightning_ckpt.errors import IncompleteCheckpointError
from lightning_ckpt.checkpoint_file import PreparedCheckpoint, read_checksum_record, write_file
from lightning_ckpt.types import STATE_DICT, RankInfo

log = logging.getLogger(__name__)


class WriterHook:
    """Called around the commit: ``pre_commit`` once this rank's data is durable, ``post_commit`` once the
    checkpoint is visible at its final path. A hook that raises fails the save and nothing is committed
    (``pre_commit``) or the save is reported failed after the commit (``post_commit``)."""

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        pass

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


@dataclass
class CheckpointWriterConfig:
    """How checkpoint bytes reach the disk.

    Args:
        enable_fsync: fsync files and directories before the commit rename (turning it off gives up durability
            across power loss, not atomicity).
        remove_stale_tmps: remove temp leftovers of crashed runs from a directory on the first write into it.
        use_direct_io: write large staged tensors with O_DIRECT (no copy into the page cache, so less CPU taken
            from training); ignored where the filesystem refuses it, and for live tensors of a synchronous write.
    """

    enable_fsync: bool = True
    remove_stale_tmps: bool = True
    use_direct_io: bool = True


@dataclass
class WriteStats:
    """What one write did: the final path, bytes written, seconds spent writing and committing."""

    path: str
    nbytes: int
    write_secs: float
    commit_secs: float = 0.0
    extra: dict = field(default_factory=dict)


class CheckpointWriter:
    """Writes checkpoints with the commit rule: nothing is visible at a final path until it is complete.

    With one rank the checkpoint is one file that plain ``torch.load`` reads. With several ranks it is a
    directory: each rank writes ``checkpoint_<rank>`` into a shared temp directory, all meet at the barrier, rank 0
    writes ``MANIFEST.json`` and renames the directory into place, and a second barrier releases the others.

    Args:
        config: fsync and cleanup options.
        rank_info: this rank and the number of ranks writing each checkpoint.
        barrier: where ranks meet before and after the commit (required with several ranks).
        commit_hook: called before and after the commit.
    """

    def __init__(self, config: CheckpointWriterConfig | None = None, rank_info: RankInfo | None = None,
                 barrier: Barrier | None = None, commit_hook: WriterHook | None = None) -> None:
        self.config = config or CheckpointWriterConfig()
        self.rank_info = rank_info or RankInfo()
        self.barrier = barrier
        self.commit_hook = commit_hook
        if self.rank_info.global_world_size > 1 and barrier is None:
            raise ValueError(
                f"CheckpointWriter with global_world_size={self.rank_info.global_world_size} needs a barrier"
            )
        self._cleaned_dirs: set[str] = set()
        self._replaced: list[str] = []
        self._seq = 0

    def write(self, path: str | os.PathLike, state_dict: STATE_DICT, **kwargs: Any) -> WriteStats:
        """Write ``state_dict`` from its live tensors (in this process) and commit it.

        Raises:
            TypeError: the state dict holds an object that cannot be pickled.
            OSError: the disk refused the write; nothing is left at ``path`` and earlier checkpoints stay.
        """
        from lightning_ckpt.serialization import prepare, resolve_storages  # torch: not in the writer process

        prepared = resolve_storages(prepare(state_dict, metadata=kwargs.get("metadata")))
        return self.write_prepared(path, prepared, save_key=kwargs.get("save_key"),
                                   after_commit=kwargs.get("after_commit"))

    def write_prepared(self, path: str | os.PathLike, prepared: PreparedCheckpoint, buffer: memoryview | None = None,
                       save_key: str | None = None, defer_cleanup: bool = False,
                       after_commit: Callable[[str], dict | None] | None = None) -> WriteStats:
        """Write an already pickled checkpoint whose records live in ``buffer`` or in storages, and commit it.

        Args:
            defer_cleanup: leave freeing a replaced file to ``remove_replaced`` (the writer process calls it after
                reporting the commit, so the caller does not wait for it).
            after_commit: called with the committed path (e.g. ``remote.RemoteUpload``); what it returns goes into
                ``WriteStats.extra`` (its ``"path"``, where the checkpoint now is, replaces ``WriteStats.path``),
                and when it raises the write fails.
        """
        path = paths.local_path(path)
        self._seq += 1
        key = save_key or f"{os.path.basename(path)}-{self._seq}"
        try:
            if self.rank_info.global_world_size == 1:
                stats = self._write_single(path, prepared, buffer)
            else:
                stats = self._write_ranked(path, prepared, buffer, key)
        finally:
            if not defer_cleanup:
                self.remove_replaced()
        if after_commit is not None:
            stats.extra.update(after_commit(stats.path) or {})
            stats.path = stats.extra.get("path", stats.path)
        return stats

    def _prepare_dir(self, directory: str, in_use: str | None = None) -> None:
        os.makedirs(directory, exist_ok=True)
        if self.config.remove_stale_tmps and directory not in self._cleaned_dirs:
            removed = layout.remove_stale_tmps(directory, in_use=lambda n: in_use is not None and n == in_use)
            if removed:
                log.info("removed stale temp files of a crashed run from %s: %s", directory, removed)
            self._cleaned_dirs.add(directory)

    def _write_tmp(self, final_path: str, prepared: PreparedCheckpoint, buffer: memoryview | None) -> tuple[str, int]:
        """Write (and fsync) the file under a temp name beside ``final_path``; returns the temp path and its size."""
        tmp = layout.tmp_file_path(final_path)
        try:
            write_file(tmp, prepared, buffer, direct_io=self.config.use_direct_io)
            if self.config.enable_fsync:
                layout.fsync_path(tmp)
            return tmp, os.path.getsize(tmp)
        except BaseException:
            layout.remove_tree(tmp)
            raise

    def _write_file(self, final_path: str, prepared: PreparedCheckpoint, buffer: memoryview | None) -> int:
        tmp, nbytes = self._write_tmp(final_path, prepared, buffer)
        try:
            layout.commit_file(tmp, final_path) if self.config.enable_fsync else os.replace(tmp, final_path)
        except BaseException:
            layout.remove_tree(tmp)
            raise
        return nbytes

    def _write_single(self, path: str, prepared: PreparedCheckpoint, buffer: memoryview | None) -> WriteStats:
        if os.path.isdir(path):
            raise IsADirectoryError(f"checkpoint path is a directory, expected a file path: {path}")
        self._prepare_dir(os.path.dirname(path))
        start = time.perf_counter()
        tmp, nbytes = self._write_tmp(path, prepared, buffer)
        try:
            written = time.perf_counter()
            self._pre_commit(path)
            if self.barrier is not None:
                barrier_wait(self.barrier, f"{os.path.basename(path)}-{self._seq}/written")
            kept = self._keep_replaced(path)
            try:
                os.replace(tmp, path)
            except BaseException:
                if kept is not None:
                    self._replaced.remove(kept)
                    layout.remove_tree(kept)
                raise
        except BaseException:
            layout.remove_tree(tmp)
            raise
        if self.config.enable_fsync:
            layout.fsync_dir(os.path.dirname(path))
        self._post_commit(path)
        return WriteStats(path, nbytes, written - start, time.perf_counter() - written)

    def _keep_replaced(self, path: str) -> str | None:
        """Hard-link a file about to be replaced to a temp name, so the rename does not free its blocks.

        Freeing a large file's blocks can take longer than writing a checkpoint; ``remove_replaced`` does it
        after the commit is reported (a crash in between leaves a stale temp name the next writer removes).
        """
        if not os.path.isfile(path) or os.path.islink(path):
            return None
        kept = layout.tmp_file_path(path)
        try:
            os.link(path, kept)
        except OSError:
            return None  # no hard links here: the rename frees the old blocks itself
        self._replaced.append(kept)
        return kept

    def remove_replaced(self) -> None:
        """Free the files that commits replaced (see ``write_prepared``'s ``defer_cleanup``)."""
        replaced, self._replaced = self._replaced, []
        for kept in replaced:
            layout.remove_tree(kept)

    def _write_ranked(self, path: str, prepared: PreparedCheckpoint, buffer: memoryview | None,
                      key: str) -> WriteStats:
        rank, world = self.rank_info.global_rank, self.rank_info.global_world_size
        tmp_dir = layout.tmp_dir_path(path)
        start = time.perf_counter()
        try:
            if os.path.exists(path) and not os.path.isdir(path):
                raise NotADirectoryError(f"multi-rank checkpoint path exists and is not a directory: {path}")
            self._prepare_dir(os.path.dirname(path), in_use=os.path.basename(tmp_dir))
            os.makedirs(tmp_dir, exist_ok=True)
            nbytes = self._write_file(os.path.join(tmp_dir, layout.rank_file_name(rank)), prepared, buffer)
            self._pre_commit(path)
        except BaseException as e:
            barrier_report_error(self.barrier, f"{key}/written", f"{type(e).__name__}: {e}")
            raise
        written = time.perf_counter()
        barrier_wait(self.barrier, f"{key}/written")
        if rank == 0:
            try:
                self._commit_dir(tmp_dir, path, world, prepared.metadata)
            except BaseException as e:
                barrier_report_error(self.barrier, f"{key}/committed", f"commit failed: {type(e).__name__}: {e}")
                raise
        barrier_wait(self.barrier, f"{key}/committed")
        self._post_commit(path)
        return WriteStats(path, nbytes, written - start, time.perf_counter() - written)

    def _commit_dir(self, tmp_dir: str, path: str, world: int, metadata: dict) -> None:
        expected = {layout.rank_file_name(r) for r in range(world)}
        present = set(os.listdir(tmp_dir))
        missing = sorted(expected - present)
        if missing:
            raise IncompleteCheckpointError(f"rank files {missing} missing from {tmp_dir} after the barrier")
        for extra in present - expected:
            layout.remove_tree(os.path.join(tmp_dir, extra))
        files = {}
        for name in sorted(expected):
            file_path = os.path.join(tmp_dir, name)
            record = read_checksum_record(file_path) or {}
            files[name] = {"nbytes": os.path.getsize(file_path), "data_pkl_xxh3": record.get("data_pkl_xxh3")}
        manifest = {
            "format": layout.FORMAT_VERSION,
            "world_size": world,
            "files": files,
            "metadata": metadata,
            "lightning_ckpt_version": _version(),
            "torch_version": _torch_version(),
            "created_unix": time.time(),
        }
        self._write_small_file(os.path.join(tmp_dir, layout.MANIFEST_NAME), json.dumps(manifest, indent=1).encode())
        if self.config.enable_fsync:
            layout.fsync_dir(tmp_dir)
        layout.commit_dir(tmp_dir, path)

    def _write_small_file(self, final_path: str, data: bytes) -> None:
        tmp = layout.tmp_file_path(final_path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if self.config.enable_fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, final_path)
        except BaseException:
            layout.remove_tree(tmp)
            raise

    def _pre_commit(self, path: str) -> None:
        if self.commit_hook is not None:
            self.commit_hook.pre_commit(path, rank_info=self.rank_info)

    def _post_commit(self, path: str) -> None:
        if self.commit_hook is not None:
            self.commit_hook.post_commit(path, rank_info=self.rank_info)

    def close(self) -> None:
        """Nothing is held between writes; kept for symmetry with the other components."""


def _torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "unknown"


def _version() -> str:
    from lightning_ckpt import __version__

    return __version__
