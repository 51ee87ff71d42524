"""Writes one rank's part of a checkpoint and commits it atomically through ``commit.Commit``."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from lightning_ckpt import commit, layout, paths, remote_dirs
from lightning_ckpt.barriers import Barrier, KeyedBarrier, barrier_report_error, barrier_wait
from lightning_ckpt.checkpoint_file import PreparedCheckpoint, read_checksum_record, write_file
from lightning_ckpt.commit import Commit
from lightning_ckpt.config_fields import TIMEOUT, Range, check_fields
from lightning_ckpt.errors import IncompleteCheckpointError
from lightning_ckpt.manifest import ChecksumRecord, Manifest, ManifestFile
from lightning_ckpt.remote import RemoteUpload
from lightning_ckpt.types import STATE_DICT, RankInfo

log = logging.getLogger(__name__)


class WriterHook:
    """Called around the commit: ``pre_commit`` once this rank's data is durable, ``post_commit`` once the
    checkpoint is visible at its final path. Both get the keyword arguments given to ``CheckpointWriter.write``
    plus ``rank_info``. A hook that raises fails the save and nothing is committed (``pre_commit``) or the save is
    reported failed after the commit (``post_commit``)."""

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        pass

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


@dataclass
class CheckpointWriterConfig:
    """How checkpoint bytes reach the disk.

    Args:
        write_barrier_timeout_secs: the seed's field: the longest the ranks are expected to wait for each other at
            the write barrier (logged with each wait; the wait itself is bounded by the barrier's ``timeout_secs``).
        enable_fsync: fsync files and directories around the commit rename (turning it off gives up durability
            across power loss, not atomicity).
        remove_stale_tmps: remove temps of writers that died (see ``commit.remove_stale_temps``) from a directory
            on the first write into it.
        use_direct_io: write large staged tensors with O_DIRECT (no copy into the page cache, so less CPU taken
            from training); ignored where the filesystem refuses it, and for live tensors of a synchronous write.
        layout: ``"dir"`` (torch's layout): ``<path>/checkpoint_<rank>.pt`` plus ``MANIFEST.json``, any number
            of ranks; ``"file"``: one file at ``path`` that plain ``torch.load`` reads (one rank; Lightning's).
    """

    write_barrier_timeout_secs: int = 600
    enable_fsync: bool = True
    remove_stale_tmps: bool = True
    use_direct_io: bool = True
    layout: str = layout.LAYOUT_DIR

    FIELD_RANGES: ClassVar[dict[str, Range]] = {"write_barrier_timeout_secs": TIMEOUT}

    def __post_init__(self) -> None:
        check_fields(self)
        if self.layout not in (layout.LAYOUT_DIR, layout.LAYOUT_FILE):
            raise ValueError(f"CheckpointWriterConfig.layout must be 'dir' or 'file', got {self.layout!r}")


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

    Layout ``"dir"`` (the default, torch's): every rank writes ``checkpoint_<rank>.pt`` into one temp directory
    (rank 0 creates it under an unguessable name and shares the name at a barrier), all meet at the barrier,
    rank 0 writes ``MANIFEST.json`` and publishes the directory (an existing one is swapped out in one step), and
    a second barrier releases the others. Layout ``"file"``: one rank writes one file that plain ``torch.load``
    reads. Better than the PyTorch original: atomic, checksummed, fsynced, and a failing rank releases its peers.

    Args:
        config: layout, fsync and cleanup options.
        rank_info: this rank and the number of ranks writing each checkpoint.
        barrier: where ranks meet before and after the commit (required with several ranks).
        commit_hook: called before and after the commit.
        trainer_gone: ours: tells (in the writer process) whether the training process that asked for the writes
            is gone. Such an orphaned write still commits (a job-wide SIGTERM must not lose it), but only where
            nobody wrote its final path since it started: it never puts an older checkpoint over the one a newer
            run committed meanwhile (it removes its temp and logs a warning naming the path instead).
    """

    def __init__(self, config: CheckpointWriterConfig | None = None, rank_info: RankInfo | None = None,
                 barrier: Barrier | None = None, commit_hook: WriterHook | None = None, *,
                 trainer_gone: Callable[[], bool] | None = None) -> None:
        self.config = config or CheckpointWriterConfig()
        self.rank_info = rank_info or RankInfo()
        self.barrier = barrier
        self.commit_hook = commit_hook
        self.trainer_gone = trainer_gone
        world = self.rank_info.global_world_size
        if world > 1 and barrier is None:
            raise ValueError(f"CheckpointWriter with global_world_size={world} needs a barrier")
        if world > 1 and self.config.layout == layout.LAYOUT_FILE:
            raise ValueError(f"CheckpointWriterConfig.layout='file' is one rank's file; global_world_size={world} "
                             "needs layout='dir'")
        self.last_write_stats: WriteStats | None = None
        self._cleaned_dirs: set[str] = set()
        self._published: list[Commit] = []  # commits whose replaced checkpoint is freed by remove_replaced
        self._seq = 0

    def write(self, path: str | os.PathLike, state_dict: STATE_DICT, **kwargs: Any) -> None:
        """Write ``state_dict`` from its live tensors (in this process) and commit it. Its small tensors are first
        copied into runs (``staging_plan.pack_small_tensors``), which keeps a state of many small tensors fast.

        Args:
            path: the checkpoint directory (layout ``"dir"``) or file (layout ``"file"``).
            state_dict: what to write.
            **kwargs: passed to the commit hook; ``metadata`` (json-able) is also kept with the checksums.

        Returns:
            None, as torch's writer (the statistics are in ``last_write_stats``).

        Raises:
            TypeError: the state dict holds an object that cannot be pickled.
            OSError: the disk refused the write; nothing is left at ``path`` and earlier checkpoints stay.
        """
        from lightning_ckpt.serialization import prepare, resolve_storages  # torch: not in the writer process
        from lightning_ckpt.staging_plan import pack_small_tensors

        storage_layout, tree = pack_small_tensors(state_dict)
        prepared = resolve_storages(prepare(state_dict, metadata=kwargs.get("metadata"), layout=storage_layout,
                                            tree=tree))
        self.write_prepared(path, prepared, save_key=kwargs.get("save_key"), after_commit=kwargs.get("after_commit"),
                            hook_kwargs=kwargs)
        return None

    def write_prepared(self, path: str | os.PathLike, prepared: PreparedCheckpoint, buffer: memoryview | None = None,
                       save_key: str | None = None, defer_cleanup: bool = False,
                       after_commit: Callable[[str], dict | None] | None = None,
                       hook_kwargs: dict | None = None) -> WriteStats:
        """Write an already pickled checkpoint whose records live in ``buffer`` or in storages, and commit it.

        Args:
            save_key: names this save's barrier points (the same on every rank); default: path and a counter.
            defer_cleanup: leave freeing a replaced checkpoint to ``remove_replaced`` (the writer process calls it
                after reporting the commit, so the caller does not wait for it).
            after_commit: called with the committed path (e.g. ``remote.RemoteUpload``); what it returns goes into
                ``WriteStats.extra`` (its ``"path"``, where the checkpoint now is, replaces ``WriteStats.path``),
                and when it raises the write fails. A ``RemoteUpload`` names the checkpoint's real place: with
                layout ``"dir"`` each rank uploads its object into a fresh generation and rank 0 writes the
                manifest last (``remote_dirs``); with ``stream_from_staging`` the parts are serialized from
                ``buffer`` straight into the upload and nothing is written locally.
            hook_kwargs: keyword arguments for the commit hook.
        """
        path = paths.local_path(path)
        self._seq += 1
        key = save_key or f"{os.path.basename(path)}-{self._seq}"
        hook_kwargs = {k: v for k, v in (hook_kwargs or {}).items() if k not in ("save_key", "after_commit")}
        hook_kwargs["rank_info"] = self.rank_info
        upload = after_commit if isinstance(after_commit, RemoteUpload) else None
        if upload is not None and not (self.config.layout == layout.LAYOUT_DIR or upload.config.stream_from_staging):
            upload = None  # committed locally first, then uploaded by after_commit
        try:
            if upload is not None:
                stats = self._write_remote(upload, prepared, buffer, key, hook_kwargs)
            elif self.config.layout == layout.LAYOUT_FILE:
                stats = self._write_single(path, prepared, buffer, key, hook_kwargs)
            else:
                stats = self._write_dir(path, prepared, buffer, key, hook_kwargs)
        except OSError as e:
            if e.errno is None or path in str(e):
                raise
            raise OSError(e.errno, f"{e.strerror} (writing checkpoint {path})", path) from e
        finally:
            if not defer_cleanup:
                self.remove_replaced()
        if after_commit is not None and upload is None:
            stats.extra.update(after_commit(stats.path) or {})
            stats.path = stats.extra.get("path", stats.path)
        self.last_write_stats = stats
        return stats

    def remove_replaced(self) -> None:
        """Free what earlier commits replaced (see ``write_prepared``'s ``defer_cleanup``)."""
        published, self._published = self._published, []
        for c in published:
            try:
                c.close()
            except OSError as e:  # the next writer's stale-temp cleanup removes what is left
                log.warning("could not remove the checkpoint that %s replaced: %s", c.final_path, e)

    def close(self) -> None:
        """Free what earlier commits replaced; nothing else is held between writes."""
        self.remove_replaced()

    def _done(self, c: Commit) -> None:
        """Remove a finished commit's temp now, or at ``remove_replaced`` when it holds a replaced checkpoint."""
        if c.replaced:
            self._published.append(c)
        else:
            c.close()

    # ------------------------------------------------------------------ one file

    def _write_single(self, path: str, prepared: PreparedCheckpoint, buffer: memoryview | None, key: str,
                      hook_kwargs: dict) -> WriteStats:
        if os.path.isdir(path):
            raise IsADirectoryError(f"checkpoint path is a directory, expected a file path: {path}")
        self._prepare_dir(os.path.dirname(path))
        start = time.perf_counter()
        c = Commit.create(path, fsync=self.config.enable_fsync)
        try:
            nbytes, _ = self._write_rank_file(c, None, prepared, buffer)
            written = time.perf_counter()
            self._hook("pre_commit", path, hook_kwargs)
            if self.barrier is not None:
                self._barrier_wait(f"{key}/written")
            self._publish(c)
        except BaseException:
            c.abort()
            raise
        self._done(c)
        self._hook("post_commit", path, hook_kwargs)
        return WriteStats(path, nbytes, written - start, time.perf_counter() - written)

    # ------------------------------------------------------------------ a directory of rank files

    def _write_dir(self, path: str, prepared: PreparedCheckpoint, buffer: memoryview | None, key: str,
                   hook_kwargs: dict) -> WriteStats:
        rank, world = self.rank_info.global_rank, self.rank_info.global_world_size
        start = time.perf_counter()
        c = self._report_failure(f"{key}/temp", lambda: self._create_dir_temp(path))
        try:
            token = self._share_temp_name(c, key)
        except BaseException:
            if c is not None:
                c.abort()
            raise

        def write_part() -> tuple[int, ChecksumRecord]:
            nonlocal c
            if c is None:
                c = Commit.join(path, token, fsync=self.config.enable_fsync)
            written = self._write_rank_file(c, layout.rank_file_name(rank), prepared, buffer)
            self._hook("pre_commit", path, hook_kwargs)
            return written

        try:
            nbytes, own_record = self._report_failure(f"{key}/written", write_part)
            written = time.perf_counter()
            if self.barrier is not None:
                self._barrier_wait(f"{key}/written")
            if rank == 0:
                self._commit_dir(c, path, world, prepared.metadata, key, own_record)
        except BaseException:
            if c is not None:
                c.abort()
            raise
        self._done(c)
        if world > 1:
            barrier_wait(self.barrier, f"{key}/committed")
        self._hook("post_commit", path, hook_kwargs)
        return WriteStats(path, nbytes, written - start, time.perf_counter() - written)

    # ------------------------------------------------------------------ remote (no local commit of the checkpoint)

    def _write_remote(self, upload: RemoteUpload, prepared: PreparedCheckpoint, buffer: memoryview | None,
                      key: str, hook_kwargs: dict) -> WriteStats:
        """Layout file: one object streamed from ``buffer``. Layout dir: this rank's object in a fresh generation
        (named by rank 0 at barrier point temp), then rank 0 writes the manifest, the commit, after every rank's
        upload completed (barrier point written); a failure on any rank leaves the manifest as it was."""
        url, rank, world = upload.target.url, self.rank_info.global_rank, self.rank_info.global_world_size
        start = time.perf_counter()
        if self.config.layout == layout.LAYOUT_FILE:
            nbytes = remote_dirs.stream_prepared(upload, prepared, buffer,
                                                 before_complete=lambda: self._hook("pre_commit", url, hook_kwargs))
            self._hook("post_commit", url, hook_kwargs)
            elapsed = time.perf_counter() - start
            return WriteStats(url, nbytes, elapsed, 0.0, {"path": url, "upload_secs": elapsed})
        generation = remote_dirs.new_generation() if rank == 0 else None
        if world > 1:
            self._check_keyed_barrier()
            generation = self.barrier.share(generation, key=f"{key}/temp")

        def put_rank_object() -> int:
            nbytes = self._put_rank_object(remote_dirs.rank_upload(upload, generation, rank), prepared, buffer)
            self._hook("pre_commit", url, hook_kwargs)
            return nbytes

        nbytes = self._report_failure(f"{key}/written", put_rank_object)
        written = time.perf_counter()
        if world > 1:
            self._barrier_wait(f"{key}/written")
        if rank == 0:
            self._commit_remote_dir(upload, generation, prepared.metadata, key)
        if world > 1:
            barrier_wait(self.barrier, f"{key}/committed")
        self._hook("post_commit", url, hook_kwargs)
        return WriteStats(url, nbytes, written - start, time.perf_counter() - written,
                          {"path": url, "generation": generation})

    def _put_rank_object(self, upload: RemoteUpload, prepared: PreparedCheckpoint, buffer: memoryview | None) -> int:
        """Upload this rank's object: streamed from ``buffer``, or committed in the local cache, uploaded, freed."""
        if upload.config.stream_from_staging:
            return remote_dirs.stream_prepared(upload, prepared, buffer)
        local = upload.target.cache_path()
        self._prepare_dir(os.path.dirname(local))
        c = Commit.create(local, fsync=self.config.enable_fsync)
        try:
            nbytes, _ = self._write_rank_file(c, None, prepared, buffer)
            c.publish()
        except BaseException:
            c.abort()
            raise
        self._done(c)
        try:
            upload(local)  # removes the local copy once the object is complete
        except BaseException:
            commit.remove_path(local)  # a failed generation's copy is never uploaded again
            raise
        return nbytes

    def _commit_remote_dir(self, upload: RemoteUpload, generation: str, metadata: dict, key: str) -> None:
        """Rank 0: every rank's object is there; the manifest naming them goes up in one PUT (the commit)."""
        world = self.rank_info.global_world_size
        try:
            files = remote_dirs.collect_files(upload, generation, world)
            remote_dirs.publish_manifest(upload, Manifest(world, files, metadata, _version(), _torch_version()))
        except BaseException as e:
            if world > 1:
                barrier_report_error(self.barrier, f"{key}/committed", f"commit failed: {type(e).__name__}: {e}")
            raise
        self._published.append(remote_dirs.ReplacedGenerations(upload, generation))

    def _check_keyed_barrier(self) -> None:
        if not isinstance(self.barrier, KeyedBarrier):
            raise ValueError(
                f"a {self.rank_info.global_world_size}-rank checkpoint needs a barrier that can share the temp "
                f"directory's name ('dist' or 'tcp_store', or a KeyedBarrier), got {type(self.barrier).__name__}"
            )

    def _report_failure(self, point: str, step: Any) -> Any:
        """Run ``step``; if it raises, tell the other ranks waiting at barrier ``point`` before re-raising."""
        try:
            return step()
        except BaseException as e:
            if self.rank_info.global_world_size > 1:
                barrier_report_error(self.barrier, point, f"{type(e).__name__}: {e}")
            raise

    def _create_dir_temp(self, path: str) -> Commit | None:
        """Rank 0 (or a single rank) creates the temp directory; the other ranks join it once it is shared."""
        if os.path.lexists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"checkpoint directory path exists and is not a directory: {path}")
        self._prepare_dir(os.path.dirname(path))
        if self.rank_info.global_world_size > 1:
            self._check_keyed_barrier()
        if self.rank_info.global_rank != 0:
            return None
        return Commit.create(path, directory=True, fsync=self.config.enable_fsync)

    def _share_temp_name(self, c: Commit | None, key: str) -> str | None:
        """With several ranks: rank 0's unguessable temp name, passed to every rank at barrier point temp."""
        if self.rank_info.global_world_size == 1:
            return None
        return self.barrier.share(c.token if c is not None else None, key=f"{key}/temp")

    def _commit_dir(self, c: Commit, path: str, world: int, metadata: dict, key: str,
                    own_record: ChecksumRecord) -> None:
        """Rank 0: check every rank file is there, write the manifest, publish (a failure releases the peers).

        Rank 0's own checksum record is the one it just wrote (``own_record``); parsing it back from the file would
        hold every key path as Python objects, several times the file's bytes for a state of many small tensors.
        """
        try:
            expected = {layout.rank_file_name(r) for r in range(world)}
            present = set(c.listdir())
            missing = sorted(expected - present)
            if missing:
                raise IncompleteCheckpointError(f"rank files {missing} missing from the temp of {path} after the "
                                                "barrier")
            for extra in present - expected:
                c.remove(extra)
            files = {}
            own = layout.rank_file_name(0)
            for name in sorted(expected):
                record = own_record if name == own else read_checksum_record(name, c.opener(name))
                files[name] = ManifestFile(c.size(name), record.data_pkl_xxh3 if record is not None else None)
            manifest = Manifest(world, files, metadata, _version(), _torch_version())
            c.write_bytes(layout.MANIFEST_NAME, manifest.to_json())
            self._publish(c)
        except BaseException as e:
            if world > 1:
                barrier_report_error(self.barrier, f"{key}/committed", f"commit failed: {type(e).__name__}: {e}")
            raise

    # ------------------------------------------------------------------ shared steps

    def _publish(self, c: Commit) -> None:
        """Publish ``c``; once the trainer is gone, only over what was at its final path when the save started."""
        if self.trainer_gone is None or not self.trainer_gone():
            c.publish()
            return
        try:
            c.publish(only_if_unchanged=True)
        except commit.CommitSuperseded:
            log.warning("not committing %s: the training process that asked for it is gone and another writer "
                        "committed that path since this save started (it is kept; this older save is dropped)",
                        c.final_path)
            raise

    def _write_rank_file(self, c: Commit, name: str | None, prepared: PreparedCheckpoint,
                         buffer: memoryview | None) -> tuple[int, ChecksumRecord]:
        """Write (and fsync) one checkpoint file into the temp; returns its size and its checksum record."""
        shown = os.path.join(c.final_path, name) if name else c.final_path  # what the user knows, in errors
        record = write_file(shown, prepared, buffer, direct_io=self.config.use_direct_io, opener=c.opener(name),
                            fsync=self.config.enable_fsync)
        return c.size(name), record

    def _prepare_dir(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        if self.config.remove_stale_tmps and directory not in self._cleaned_dirs:
            removed = commit.remove_stale_temps(directory)
            if removed:
                log.info("removed temps of writers that died from %s: %s", directory, removed)
            self._cleaned_dirs.add(directory)

    def _barrier_wait(self, key: str) -> None:
        log.debug("rank %d waits for the other ranks at %s (expected within %ss)", self.rank_info.global_rank, key,
                  self.config.write_barrier_timeout_secs)
        barrier_wait(self.barrier, key)

    def _hook(self, which: str, path: str, hook_kwargs: dict) -> None:
        if self.commit_hook is not None:
            getattr(self.commit_hook, which)(path, **hook_kwargs)


def _torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "unknown"


def _version() -> str:
    from lightning_ckpt import __version__

    return __version__
