"""Removing the temps of writers that are gone: the cleanup half of the commit primitive (see ``commit``).

A temp is reaped only when it is a private directory of this user and no process holds its ``flock``; pid liveness
is never consulted, so this holds across PID namespaces. A committed checkpoint that the two-rename fallback left
aside is put back at its final path instead of being deleted. A publish lock file that a killed publish left
behind is removed when no process holds it.
"""

from __future__ import annotations

import fcntl
import logging
import os

from lightning_ckpt import commit
from lightning_ckpt.commit import (
    _DIR_FLAGS, _NOFOLLOW_DIR, _RENAME_NOREPLACE, ASIDE_NAME, LOCK_NAME, CommitError, _check_ours, _remove_temp,
    _still_linked, _try_lock, _Unsupported, is_temp_name,
)
from lightning_ckpt.publish_lock import is_named, publish_lock_name

log = logging.getLogger(__name__)


def remove_stale_temps(directory: str) -> list[str]:
    """Remove the temps in ``directory`` that are ours and whose writers are gone; returns their names.

    A temp is removed only when it is a private directory of this user and no live process holds its lock. A
    committed checkpoint that a crash left moved aside (the two-rename fallback) is put back at its final path
    instead, when that path is empty. Temps of other users, live temps and anything that is not a temp stay.
    """
    try:
        parent_fd = os.open(directory, _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    lock_name = publish_lock_name()
    try:
        for name in os.listdir(parent_fd):
            if is_temp_name(name) and _reap(parent_fd, name):
                removed.append(name)
            elif name == lock_name and _reap_publish_lock(parent_fd, name):
                removed.append(name)
    finally:
        os.close(parent_fd)
    return removed


def _reap(parent_fd: int, name: str) -> bool:
    """Remove temp ``name`` when it is ours and dead; True when removed."""
    try:
        tmp_fd = os.open(name, _NOFOLLOW_DIR, dir_fd=parent_fd)
    except OSError:
        return False  # gone, a symlink, or not a directory: not ours to touch
    try:
        _check_ours(os.fstat(tmp_fd), name)
        lock_fd = _open_lock_for_reaping(tmp_fd)
    except (CommitError, OSError):
        os.close(tmp_fd)
        return False
    try:
        if not _try_lock(lock_fd, fcntl.LOCK_EX) or not _still_linked(parent_fd, name, tmp_fd, lock_fd):
            return False  # a live writer holds it (or it changed under us)
        if not _restore_aside(parent_fd, tmp_fd, lock_fd, name):
            return False
        _remove_temp(parent_fd, name, tmp_fd)
        return True
    except OSError as e:
        log.warning("could not remove stale temp %s: %s", name, e)
        return False
    finally:
        os.close(lock_fd)
        os.close(tmp_fd)


def _reap_publish_lock(parent_fd: int, name: str) -> bool:
    """Unlink a publish lock file of ours that no process holds (its publish was killed); True when removed."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or not _try_lock(fd, fcntl.LOCK_EX):
            return False
        if not is_named(fd, name, parent_fd):
            return False
        os.unlink(name, dir_fd=parent_fd)  # held: a publish that opened it meanwhile sees the change and retries
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _open_lock_for_reaping(tmp_fd: int) -> int:
    """The temp's lock file; created when a writer died before making it (its creator then picks another name)."""
    try:
        return os.open(LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=tmp_fd)
    except FileNotFoundError:
        return os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                       dir_fd=tmp_fd)


def _restore_aside(parent_fd: int, tmp_fd: int, lock_fd: int, name: str) -> bool:
    """Put a committed checkpoint that a crash left aside back at its final path; False: keep the temp."""
    try:
        os.stat(ASIDE_NAME, dir_fd=tmp_fd, follow_symlinks=False)
    except FileNotFoundError:
        return True
    final_name = os.pread(lock_fd, 4096, 0).decode("utf-8", "surrogateescape")
    if not final_name or "/" in final_name or final_name in (".", ".."):
        log.warning("stale temp %s holds a committed checkpoint of unknown name: kept", name)
        return False
    try:
        commit._renameat2(tmp_fd, ASIDE_NAME, parent_fd, final_name, _RENAME_NOREPLACE)
    except FileExistsError:
        return True  # a newer checkpoint is in place: the aside one is the older, replaced one
    except _Unsupported:
        try:
            os.stat(final_name, dir_fd=parent_fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            os.rename(ASIDE_NAME, final_name, src_dir_fd=tmp_fd, dst_dir_fd=parent_fd)
    os.fsync(parent_fd)
    log.warning("restored the committed checkpoint %s that a crash had left in temp %s", final_name, name)
    return True
