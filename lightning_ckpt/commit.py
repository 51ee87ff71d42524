"""The one commit primitive: a private, locked temp beside a final path, published by one rename or exchange.

Every commit in the project goes through :class:`Commit`; no other module renames into a final path.

Public API::

    with Commit.create(final_path, directory=False, fsync=True) as c:   # or directory=True
        fd = c.open_new()                 # file payload (or c.open_new("name") inside a directory payload)
        ...write, os.fsync(fd), os.close(fd)...   # or c.write_bytes(name, data) / c.symlink(target)
        c.publish()                       # atomically visible at final_path; the parent directory fsynced
                                          # (only_if_unchanged=True: not over what another writer put there since)
    # leaving the block removes the temp (and what the publish replaced); an exception aborts instead

    Commit.join(final_path, c.token)      # another rank of a multi-rank save opens rank 0's directory temp
    is_temp_name(name)                    # True for our temp names (scans must skip them)
    remove_stale_temps(directory)         # removes temps whose writers are gone; returns their names
    remove_path(path)                     # removes a published checkpoint (never follows a symlink)

On disk a temp is a directory ``.lckpt-<16 hex>.tmp`` (mode 0700, 26 bytes whatever the final name, so any valid
final name works; the name carries no ``.ckpt``, ``hpc_ckpt_``, ``epoch=``/``step=`` that a scan could parse). It
holds ``lock`` (the final name; every live writer holds an ``flock`` on it, which dies with its process in any PID
namespace) and ``payload`` (the file, directory or symlink to publish). Everything is opened relative to directory
descriptors with ``O_NOFOLLOW``/``O_EXCL`` and ``mkdir`` without ``exist_ok``, so a symlink planted at any name is
never followed, and a temp owned by another user is never touched.

Publishing a file over a file is one ``rename`` (the old file is first hard-linked into the temp as ``replaced`` so
freeing its blocks waits for ``close``). Replacing a directory (or any change of type) uses
``renameat2(RENAME_EXCHANGE)``: the final path holds the old complete checkpoint until, in one step, it holds the
new one; the old one then sits in the temp and is removed at ``close``. Where the filesystem lacks the exchange
(NFS, some FUSE), the fallback is two renames (final -> ``aside``, payload -> final): a crash between them leaves no
checkpoint at the final path for that instant, but the committed one stays in the temp as ``aside`` and
``remove_stale_temps`` renames it back instead of deleting it. The stale-temp cleanup removes a temp only when it is
ours (owner uid) and no process holds its lock; it never deletes a complete checkpoint that is not also at its
final path. Across hosts this relies on the filesystem's lock support (NFSv4 locks; local filesystems). Every
publish holds an ``flock`` on a short-lived lock file of ours in the parent directory (``.lckpt-publish-<uid>.lock``,
never the directory itself) across its look at the final path and its rename, so
``publish(only_if_unchanged=True)`` compares and replaces in one step as seen by any other publish.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import stat
from typing import Callable

from lightning_ckpt._libc import libc_function
from lightning_ckpt.layout import TMP_MARKER
from lightning_ckpt.publish_lock import PublishLock

log = logging.getLogger(__name__)

TEMP_PREFIX = TMP_MARKER
TEMP_SUFFIX = ".tmp"
LOCK_NAME = "lock"
PAYLOAD_NAME = "payload"
REPLACED_NAME = "replaced"  # what a publish replaced; removed at close
ASIDE_NAME = "aside"  # the committed checkpoint moved aside by the two-rename fallback; restored if orphaned
_TEMP_RE = re.compile(r"\.lckpt-[0-9a-f]{16}\.tmp")
_TOKEN_RE = re.compile(r"[0-9a-f]{16}")
_CREATE_ATTEMPTS = 16
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW_DIR = _DIR_FLAGS | os.O_NOFOLLOW


def is_temp_name(name: str) -> bool:
    """True for the name of one of our temps (``.lckpt-<16 hex>.tmp``): never a checkpoint, skip it in scans."""
    return _TEMP_RE.fullmatch(os.path.basename(name)) is not None


def temp_name(token: str) -> str:
    return f"{TEMP_PREFIX}{token}{TEMP_SUFFIX}"


class Commit:
    """A temp beside ``final_path`` that becomes ``final_path`` in one atomic step (see the module docstring).

    Build it with :meth:`create` (a new temp) or :meth:`join` (another rank's directory temp); use it as a context
    manager or call :meth:`close`/:meth:`abort` yourself.
    """

    def __init__(self, final_path: str, token: str, parent_fd: int, tmp_fd: int, lock_fd: int, *,
                 directory: bool, owner: bool, fsync: bool, found: tuple[int, int, int] | None = None) -> None:
        self.final_path = final_path
        self.final_name = os.path.basename(final_path)
        self.token = token
        self.directory = directory
        self.owner = owner
        self.fsync = fsync
        self.published = False
        self.replaced = False  # the publish moved a previous checkpoint into the temp (freed at close)
        self.found = found  # identity of what was at final_path when the temp was made (None: nothing)
        self._parent_fd = parent_fd
        self._tmp_fd = tmp_fd
        self._lock_fd = lock_fd
        self._payload_fd = os.open(PAYLOAD_NAME, _NOFOLLOW_DIR, dir_fd=tmp_fd) if directory else None
        self._closed = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, final_path: str | os.PathLike, *, directory: bool = False, fsync: bool = True) -> "Commit":
        """Create a new temp beside ``final_path`` (its parent directory must exist).

        Args:
            final_path: where the payload appears on :meth:`publish`.
            directory: the payload is a directory (files go in with ``open_new(name)``), else one file or symlink.
            fsync: fsync the payload directory and the parent around the publish (files are the caller's).

        Raises:
            FileNotFoundError: the parent directory does not exist.
            ValueError: ``final_path`` has no file name.
        """
        final_path, parent = _split(final_path)
        parent_fd = os.open(parent, _DIR_FLAGS)
        try:
            found = _identity(_lstat_at(parent_fd, os.path.basename(final_path)))
            for _ in range(_CREATE_ATTEMPTS):
                made = _make_temp(parent_fd, secrets.token_hex(8), os.path.basename(final_path), directory)
                if made is not None:
                    token, tmp_fd, lock_fd = made
                    return cls(final_path, token, parent_fd, tmp_fd, lock_fd, directory=directory, owner=True,
                               fsync=fsync, found=found)
            raise FileExistsError(f"could not create a temp beside {final_path} in {_CREATE_ATTEMPTS} attempts")
        except BaseException:
            os.close(parent_fd)
            raise

    @classmethod
    def join(cls, final_path: str | os.PathLike, token: str, *, fsync: bool = True) -> "Commit":
        """Open the directory temp ``token`` that another rank created for ``final_path``; only its creator
        publishes and removes it, a joiner writes its files and closes.

        Raises:
            ValueError: ``token`` is not a token of ours.
            CommitError: the temp is gone, not a directory we own, or being removed.
        """
        if not isinstance(token, str) or _TOKEN_RE.fullmatch(token) is None:
            raise ValueError(f"not a temp token: {token!r}")
        final_path, parent = _split(final_path)
        parent_fd = os.open(parent, _DIR_FLAGS)
        fds: list[int] = []
        try:
            name = temp_name(token)
            fds.append(os.open(name, _NOFOLLOW_DIR, dir_fd=parent_fd))
            _check_ours(os.fstat(fds[0]), name)
            fds.append(os.open(LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fds[0]))
            if not _try_lock(fds[1], fcntl.LOCK_SH) or not _still_linked(parent_fd, name, fds[0], fds[1]):
                raise CommitError(f"temp {name} of {final_path} is being removed")
            return cls(final_path, token, parent_fd, fds[0], fds[1], directory=True, owner=False, fsync=fsync)
        except OSError as e:
            for fd in fds + [parent_fd]:
                os.close(fd)
            raise CommitError(f"cannot join temp {temp_name(token)} of {final_path}: {e}") from e
        except BaseException:
            for fd in fds + [parent_fd]:
                os.close(fd)
            raise

    # ------------------------------------------------------------------ writing the payload

    @property
    def path(self) -> str:
        """The payload's path, for code that needs one (prefer the descriptors: ``open_new``, ``dir_fd``)."""
        return os.path.join(os.path.dirname(self.final_path), temp_name(self.token), PAYLOAD_NAME)

    @property
    def dir_fd(self) -> int:
        """The directory that holds the payload's files: the payload directory, or the temp for a file payload."""
        return self._payload_fd if self.directory else self._tmp_fd

    def entry(self, name: str | None = None) -> str:
        """The name, relative to ``dir_fd``, of the payload file (``None``) or of file ``name`` in a directory."""
        if not self.directory:
            if name is not None:
                raise ValueError(f"a file payload has no member {name!r}")
            return PAYLOAD_NAME
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"not a file name inside a checkpoint directory: {name!r}")
        return name

    def opener(self, name: str | None = None) -> Callable[[int], int]:
        """A function ``flags -> fd`` opening the payload file (or ``name``): ``O_CREAT`` gets ``O_EXCL``, and
        nothing follows a symlink."""

        def open_(flags: int) -> int:
            if flags & os.O_CREAT:
                flags = (flags | os.O_EXCL) & ~os.O_TRUNC
            return os.open(self.entry(name), flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=self.dir_fd)

        return open_

    def open_new(self, name: str | None = None) -> int:
        """Create the payload file (or file ``name`` in a directory payload) for writing; returns its descriptor."""
        return self.opener(name)(os.O_WRONLY | os.O_CREAT)

    def write_bytes(self, name: str | None, data: bytes) -> None:
        """Create a small file with ``data`` (fsynced when this commit fsyncs)."""
        fd = self.open_new(name)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def symlink(self, target: str) -> None:
        """Make the (file) payload a symlink to ``target``."""
        os.symlink(target, self.entry(None), dir_fd=self.dir_fd)

    def copy_from(self, source: str) -> None:
        """Make the (file) payload a copy of file ``source`` (fsynced when this commit fsyncs)."""
        fd = self.open_new()
        with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            if self.fsync:
                os.fsync(dst.fileno())

    def size(self, name: str | None = None) -> int:
        return os.stat(self.entry(name), dir_fd=self.dir_fd, follow_symlinks=False).st_size

    def listdir(self) -> list[str]:
        """The files in a directory payload."""
        return os.listdir(self.dir_fd)

    def remove(self, name: str) -> None:
        """Remove file ``name`` from a directory payload."""
        os.unlink(self.entry(name), dir_fd=self.dir_fd)

    # ------------------------------------------------------------------ publish, close, abort

    def publish(self, *, only_if_unchanged: bool = False) -> None:
        """Make the payload visible at ``final_path`` atomically, then fsync the parent directory.

        What was at ``final_path`` stays complete until the payload replaces it in one step; it is removed at
        :meth:`close` (a crash before leaves it in the temp for ``remove_stale_temps``).

        Args:
            only_if_unchanged: publish only if ``final_path`` is still what it was when the temp was made (same
                entry, not modified; or still absent): a writer whose trainer is gone must not put its older
                checkpoint over one that a newer run committed meanwhile. An absent path is claimed without
                replacing (``RENAME_NOREPLACE``); an existing one is compared and replaced under the publish lock
                of the parent directory that every publish takes, so no other publish falls between the two.

        Raises:
            CommitError: this is a joined temp, or it was already published or closed.
            CommitSuperseded: ``only_if_unchanged`` and ``final_path`` changed; nothing changed at ``final_path``.
            OSError: the rename failed; nothing changed at ``final_path``.
        """
        if not self.owner or self.published or self._closed:
            raise CommitError(f"cannot publish {self.final_path}: not the owner, or already published/closed")
        if self.fsync and self.directory:
            os.fsync(self._payload_fd)  # the payload's entries (files of every rank)
        with PublishLock(self._parent_fd, self.final_path):
            old = _lstat_at(self._parent_fd, self.final_name)
            if only_if_unchanged and _identity(old) != self.found:
                raise CommitSuperseded(f"{self.final_path} changed since this save started: not replaced")
            if old is None:
                self._rename_new(replace=not only_if_unchanged)
            elif self.directory or stat.S_ISDIR(old.st_mode):
                self._exchange()
            else:
                self._keep_replaced(old)
                os.rename(PAYLOAD_NAME, self.final_name, src_dir_fd=self._tmp_fd, dst_dir_fd=self._parent_fd)
        self.published = True
        if self.fsync:
            os.fsync(self._parent_fd)

    def _rename_new(self, replace: bool) -> None:
        try:
            _renameat2(self._tmp_fd, PAYLOAD_NAME, self._parent_fd, self.final_name, _RENAME_NOREPLACE)
        except FileExistsError:  # appeared meanwhile: replace it like any existing entry
            if not replace:
                raise CommitSuperseded(f"{self.final_path} appeared since this save started: not replaced") \
                    from None
            self._exchange()
        except _Unsupported:
            os.rename(PAYLOAD_NAME, self.final_name, src_dir_fd=self._tmp_fd, dst_dir_fd=self._parent_fd)

    def _exchange(self) -> None:
        try:
            _renameat2(self._tmp_fd, PAYLOAD_NAME, self._parent_fd, self.final_name, _RENAME_EXCHANGE)
            os.rename(PAYLOAD_NAME, REPLACED_NAME, src_dir_fd=self._tmp_fd, dst_dir_fd=self._tmp_fd)
            self.replaced = True
        except _Unsupported:
            log.debug("no RENAME_EXCHANGE for %s: replacing it by two renames", self.final_path)
            os.rename(self.final_name, ASIDE_NAME, src_dir_fd=self._parent_fd, dst_dir_fd=self._tmp_fd)
            try:
                os.rename(PAYLOAD_NAME, self.final_name, src_dir_fd=self._tmp_fd, dst_dir_fd=self._parent_fd)
            except BaseException:
                os.rename(ASIDE_NAME, self.final_name, src_dir_fd=self._tmp_fd, dst_dir_fd=self._parent_fd)
                raise
            os.rename(ASIDE_NAME, REPLACED_NAME, src_dir_fd=self._tmp_fd, dst_dir_fd=self._tmp_fd)
            self.replaced = True

    def _keep_replaced(self, old: os.stat_result) -> None:
        """Hard-link a regular file about to be replaced, so the rename does not free its blocks (slow for a big
        file); ``close`` frees them."""
        if not stat.S_ISREG(old.st_mode):
            return
        try:
            os.link(self.final_name, REPLACED_NAME, src_dir_fd=self._parent_fd, dst_dir_fd=self._tmp_fd,
                    follow_symlinks=False)
            self.replaced = True
        except OSError:
            pass  # no hard links here: the rename frees the old blocks itself

    def close(self) -> None:
        """Remove the temp (an unpublished payload, what a publish replaced) and release the lock; idempotent.

        A joiner only releases its descriptors; the creator removes the temp.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self.owner:
                _remove_temp(self._parent_fd, temp_name(self.token), self._tmp_fd)
        finally:
            for fd in (self._payload_fd, self._lock_fd, self._tmp_fd, self._parent_fd):
                if fd is not None:
                    os.close(fd)

    def abort(self) -> None:
        """Give up: nothing new appears at ``final_path`` (unless already published) and the temp is removed."""
        self.close()

    def __enter__(self) -> "Commit":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except OSError:
                pass


def remove_path(path: str) -> None:
    """Remove a published checkpoint: a file, a symlink (not its target) or a directory tree; missing is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)  # never follows a symlink inside
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class CommitError(OSError):
    """A temp could not be used: gone, not ours, or being removed by a cleanup."""


class CommitSuperseded(CommitError):
    """``publish(only_if_unchanged=True)`` found another checkpoint at the final path: nothing was published."""


class _Unsupported(Exception):
    """The filesystem or the C library has no ``renameat2`` with these flags."""


# ---------------------------------------------------------------------- temps: create, check, remove


def _split(final_path: str | os.PathLike) -> tuple[str, str]:
    final_path = os.path.abspath(os.fspath(final_path))
    parent, name = os.path.split(final_path)
    if not name or name in (".", ".."):
        raise ValueError(f"not a file or directory path: {final_path!r}")
    return final_path, parent


def _lstat_at(parent_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _identity(st: os.stat_result | None) -> tuple[int, int, int] | None:
    """What tells one entry at a final path from another: device, inode and modification time (None: absent)."""
    return None if st is None else (st.st_dev, st.st_ino, st.st_mtime_ns)


def _make_temp(parent_fd: int, token: str, final_name: str, directory: bool) -> tuple[str, int, int] | None:
    """Create and lock temp ``token``; None when the name is taken or a cleanup removed it meanwhile."""
    name = temp_name(token)
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        return None  # anything can sit at a name (a planted symlink too): never reuse it
    fds: list[int] = []
    try:
        fds.append(os.open(name, _NOFOLLOW_DIR, dir_fd=parent_fd))
        _check_ours(os.fstat(fds[0]), name)
        fds.append(os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                           dir_fd=fds[0]))
        if not _try_lock(fds[1], fcntl.LOCK_SH) or not _still_linked(parent_fd, name, fds[0], fds[1]):
            raise FileExistsError(name)  # a cleanup took it between mkdir and lock: try another name
        os.write(fds[1], final_name.encode("utf-8", "surrogateescape"))
        if directory:
            os.mkdir(PAYLOAD_NAME, 0o700, dir_fd=fds[0])
        return token, fds[0], fds[1]
    except (FileExistsError, FileNotFoundError, CommitError):
        for fd in fds:
            os.close(fd)
        return None
    except BaseException:
        if len(fds) == 2:  # we hold the lock: the half-made temp is ours to remove
            _remove_temp(parent_fd, name, fds[0])
        for fd in fds:
            os.close(fd)
        raise


def _check_ours(st: os.stat_result, name: str) -> None:
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise CommitError(f"{name} is not a private directory of ours")


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _still_linked(parent_fd: int, name: str, tmp_fd: int, lock_fd: int) -> bool:
    """The temp and its lock file we hold are still the ones at their names (a cleanup did not remove them)."""
    try:
        here = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        lock = os.stat(LOCK_NAME, dir_fd=tmp_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held_tmp, held_lock = os.fstat(tmp_fd), os.fstat(lock_fd)
    return (here.st_dev, here.st_ino) == (held_tmp.st_dev, held_tmp.st_ino) and \
        (lock.st_dev, lock.st_ino) == (held_lock.st_dev, held_lock.st_ino)


def _remove_temp(parent_fd: int, name: str, tmp_fd: int) -> None:
    """Remove a temp's contents, its lock file and itself (the caller holds its lock).

    What cannot be removed yet stays for ``remove_stale_temps`` (logged): on NFS a file that a reader still holds
    open is silly-renamed, so the replaced checkpoint's directory is not empty until that reader closes it, and a
    publish that already happened must not be reported as a failure for it.
    """
    try:
        for entry in os.listdir(tmp_fd):
            if entry == LOCK_NAME:
                continue
            st = os.stat(entry, dir_fd=tmp_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(entry, dir_fd=tmp_fd)  # fd-based: never follows a symlink inside
            else:
                os.unlink(entry, dir_fd=tmp_fd)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove temp %s yet (a later cleanup will): %s", name, e)
        return
    for remove in (lambda: os.unlink(LOCK_NAME, dir_fd=tmp_fd), lambda: os.rmdir(name, dir_fd=parent_fd)):
        try:
            remove()
        except FileNotFoundError:
            pass
        except OSError as e:  # e.g. NFS keeps a silly-renamed file of a peer's open lock: the next cleanup goes
            log.debug("could not remove temp %s yet: %s", name, e)
            return


# ---------------------------------------------------------------------- renameat2 through libc


_RENAMEAT2 = libc_function("renameat2",
                           [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint])


def _renameat2(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str, flags: int) -> None:
    """``renameat2`` with ``flags``; raises ``_Unsupported`` where the C library or the filesystem lacks it."""
    if _RENAMEAT2 is None:
        raise _Unsupported()
    if _RENAMEAT2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), flags) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        raise _Unsupported()
    raise OSError(err, os.strerror(err), dst)


def remove_stale_temps(directory: str) -> list[str]:
    """Remove the temps in ``directory`` that are ours and whose writers are gone; returns their names (the cleanup
    half of this API: ``stale_temps.remove_stale_temps``)."""
    from lightning_ckpt.stale_temps import remove_stale_temps as remove  # it imports this module

    return remove(directory)
