"""The lock every publish into a directory holds across its look at the final path and its rename (``commit``).

A private per-user regular file in that directory, never the directory itself, created for the publish and
unlinked while still held; scans skip its name (it carries the temp marker).
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import time

from lightning_ckpt.layout import TMP_MARKER

log = logging.getLogger("lightning_ckpt.commit")

PUBLISH_LOCK_SECS = 30.0  # bounds the wait for another publish into the same directory (held for microseconds)


class PublishLock:
    """An exclusive ``flock`` on a lock file of ours in the parent directory, around a publish's check and rename.

    Every publish takes it, so ``publish(only_if_unchanged=True)``'s comparison and its rename are one step as
    seen by any other publish into the same directory (an orphaned writer cannot put its older checkpoint over
    one committed between the two). The lock is a private regular file (``publish_lock_name()``: per user, skipped
    by scans) created for the publish and unlinked while still held, never the user's directory itself: a user's
    own ``flock`` of the checkpoint directory must not stall saves. A waiter that locked a file since unlinked
    retries on the new one. The wait is bounded by ``PUBLISH_LOCK_SECS``; where no lock can be had (a file of
    that name owned by someone else, a filesystem without locks) the publish goes on unlocked, as it did before
    the lock existed, and leaves the file (only a holder may unlink it). The lock is per user: publishes of
    different users into one shared directory do not exclude each other.
    """

    def __init__(self, parent_fd: int, final_path: str) -> None:
        self._parent_fd = parent_fd
        self._final_path = final_path
        self._name = publish_lock_name()
        self._fd: int | None = None

    def __enter__(self) -> "PublishLock":
        deadline = time.monotonic() + PUBLISH_LOCK_SECS
        pause = 0.0005
        while True:
            fd = self._open()
            if fd is None:
                return self
            try:
                held = self._take(fd)
            except BaseException:
                os.close(fd)
                raise
            if held is None:  # no lock to be had here
                os.close(fd)
                return self
            if held:
                self._fd = fd
                return self
            os.close(fd)  # another publish holds it, or its holder unlinked it before we got it
            if time.monotonic() >= deadline:
                log.warning("publishing %s without the publish lock: another process held it for %.0fs",
                            self._final_path, PUBLISH_LOCK_SECS)
                return self
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def _take(self, fd: int) -> bool | None:
        """Lock ``fd``: True when held and still the file at the name; False: try again; None: publish unlocked.

        A failure other than "held by another" (no locks on this filesystem, NFS lockd's ENOLCK, a stale handle)
        gives up the lock, never the file: another publish may hold it, and only a holder may unlink it.
        """
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as e:
            log.debug("no publish lock for %s (%s): publishing unlocked", self._final_path, e)
            return None
        try:
            return self._still_named(fd)
        except OSError as e:
            log.debug("publish lock of %s unusable (%s): publishing unlocked", self._final_path, e)
            return None

    def _open(self) -> int | None:
        try:
            fd = os.open(self._name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self._parent_fd)
        except OSError as e:  # a symlink planted at the name, a read-only directory, ...
            log.debug("no publish lock for %s (%s): publishing unlocked", self._final_path, e)
            return None
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            log.warning("publishing %s without the publish lock: %s there is not a private file of ours",
                        self._final_path, self._name)
            return None
        return fd

    def _still_named(self, fd: int) -> bool:
        return is_named(fd, self._name, self._parent_fd)

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._still_named(fd):  # while held: a waiter that opened it sees the change
                _unlink_quietly(self._name, self._parent_fd)
        except OSError as e:
            log.debug("publish lock of %s left in place: %s", self._final_path, e)
        finally:
            os.close(fd)  # releases the flock


def is_named(fd: int, name: str, dir_fd: int) -> bool:
    """Whether the open file ``fd`` is the file at ``name`` in ``dir_fd`` now. The name is opened, not stat'ed: an
    open looks the name up again on NFS (close-to-open), where a stat may answer from a cache after another host
    replaced the file."""
    try:
        # O_NONBLOCK: a FIFO planted at the name is opened without waiting for a writer (and is not our file)
        named_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    try:
        named, held = os.fstat(named_fd), os.fstat(fd)
    finally:
        os.close(named_fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError as e:  # left for remove_stale_temps
        log.debug("could not remove %s: %s", name, e)


def publish_lock_name() -> str:
    """The per-user lock file a publish holds (``.lckpt-publish-<uid>.lock``): never a checkpoint, scans skip it."""
    return f"{TMP_MARKER}publish-{os.geteuid()}.lock"
