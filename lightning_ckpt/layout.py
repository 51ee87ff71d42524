"""On-disk names and the atomic commit rule: temp name, fsync, rename, fsync the directory."""

from __future__ import annotations

import errno
import os
import socket
import time
import uuid
from typing import Callable

# Record inside every checkpoint file (a torch zip) that holds our per-record checksums.
CHECKSUM_RECORD = "lightning_ckpt/checksums.json"
# Commit marker of a multi-rank checkpoint directory, written last by rank 0.
MANIFEST_NAME = "MANIFEST.json"
# One file per rank inside a multi-rank checkpoint directory.
RANK_FILE_TEMPLATE = "checkpoint_{rank}"
# Temp names live beside their final path so the rename never crosses a filesystem.
TMP_MARKER = ".lckpt-tmp"
# Format version of CHECKSUM_RECORD and MANIFEST_NAME.
FORMAT_VERSION = 1

_HOST = socket.gethostname().replace(".", "_") or "host"


def rank_file_name(rank: int) -> str:
    return RANK_FILE_TEMPLATE.format(rank=rank)


def tmp_file_path(final_path: str) -> str:
    """A unique temp name beside ``final_path``: ``.<name>.lckpt-tmp.<host>.<pid>.<uuid>``."""
    parent, name = os.path.split(final_path)
    return os.path.join(parent, f".{name}{TMP_MARKER}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}")


def tmp_dir_path(final_path: str) -> str:
    """The temp directory every rank of one multi-rank save writes into (the same name on every rank)."""
    parent, name = os.path.split(final_path.rstrip(os.sep))
    return os.path.join(parent, f".{name}{TMP_MARKER}-dir")


def fsync_path(path: str) -> None:
    """fsync a file or directory by path (fsync on any descriptor flushes the inode's dirty pages)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fsync_path(path or ".")


def commit_file(tmp_path: str, final_path: str) -> None:
    """Move a complete, fsynced temp file into place and make the rename itself durable."""
    os.replace(tmp_path, final_path)
    fsync_dir(os.path.dirname(final_path))


def commit_dir(tmp_dir: str, final_dir: str) -> None:
    """Move a complete temp directory into place; an existing directory is swapped out, then removed."""
    parent = os.path.dirname(final_dir.rstrip(os.sep))
    if os.path.lexists(final_dir):
        if not os.path.isdir(final_dir) or os.path.islink(final_dir):
            raise FileExistsError(f"cannot commit checkpoint directory over a non-directory: {final_dir}")
        old = f"{tmp_dir_path(final_dir)}-old.{uuid.uuid4().hex[:8]}"
        os.rename(final_dir, old)
        os.rename(tmp_dir, final_dir)
        fsync_dir(parent)
        remove_tree(old)
    else:
        os.rename(tmp_dir, final_dir)
        fsync_dir(parent)


def remove_tree(path: str) -> None:
    """Remove a file or directory tree; missing is fine."""
    import shutil

    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_tmp(name: str, *, in_use: Callable[[str], bool] = lambda _: False) -> bool:
    """True for a temp name of ours that no live writer on this host owns.

    File temps carry ``host.pid``; a temp of another host is never judged stale here (its pid means nothing to
    us). Directory temps carry no owner, so they are stale unless ``in_use`` says a save of ours writes them now.
    """
    if TMP_MARKER not in name or in_use(name):
        return False
    suffix = name.split(TMP_MARKER, 1)[1]
    if suffix.startswith("-dir"):
        return True
    parts = suffix.lstrip(".").split(".")
    if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    return pid != os.getpid() and not _pid_alive(pid)


def remove_stale_tmps(directory: str, *, in_use: Callable[[str], bool] = lambda _: False) -> list[str]:
    """Remove temp leftovers of crashed runs from ``directory``; returns the names removed."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    removed = [n for n in names if is_stale_tmp(n, in_use=in_use)]
    for name in removed:
        remove_tree(os.path.join(directory, name))
    return removed


def wait_until(predicate: Callable[[], bool], timeout_secs: float, interval_secs: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds or ``timeout_secs`` pass; returns whether it held."""
    deadline = time.monotonic() + timeout_secs
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_secs)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
