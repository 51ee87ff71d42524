"""One committed version of a DCP checkpoint directory held open: its files read through descriptors, never by path."""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterable, Iterator

from lightning_ckpt.dcp.manifest import open_checkpoint_dir, read_manifest_at
from lightning_ckpt.errors import CorruptCheckpointError, IncompleteCheckpointError
from lightning_ckpt.torch_zip import checksum


class PinnedCheckpoint:
    """The checkpoint directory at ``path`` as it was when this object opened it, whatever commits over ``path``.

    A commit over ``path`` exchanges the directory and then removes the replaced one, so every name is looked up
    relative to the descriptor of the directory opened here: a file is of this version or missing, never of
    another. A file held open by ``hold`` keeps its bytes even after the replaced directory is removed; one opened
    only when it is read fails with ``IncompleteCheckpointError`` naming it if it is gone by then.

    Args:
        path: the checkpoint directory (named in errors).

    Raises:
        FileNotFoundError: nothing at ``path``.
        IncompleteCheckpointError: ``path`` is not a committed directory (no manifest).
        CorruptCheckpointError: the manifest is unreadable.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._held: dict[str, int] = {}
        self._dir_fd = open_checkpoint_dir(path)
        # Closes every descriptor when the load that opened it is abandoned without ``close`` (DCP has no close).
        self._close = weakref.finalize(self, _close_all, self._held, self._dir_fd)
        try:
            self.manifest, data = read_manifest_at(path, self._dir_fd)
        except BaseException:
            self.close()
            raise
        self.version = checksum(data)  # the manifest lists every chunk's checksum: equal manifests, equal data

    def read_bytes(self, name: str) -> bytes:
        """The whole of file ``name`` of this version."""
        with self.opened(name) as fd:
            return self.read_at(fd, name, 0, os.fstat(fd).st_size)

    def hold(self, names: Iterable[str], limit: int) -> None:
        """Open the files ``names`` now and keep them open (at most ``limit`` held, to spare descriptors)."""
        for name in names:
            if len(self._held) >= limit:
                return
            if name not in self._held:
                self._held[name] = self._open(name)

    @contextlib.contextmanager
    def opened(self, name: str) -> Iterator[int]:
        """A descriptor of file ``name`` of this version: the held one, or one opened now and closed on exit."""
        if name in self._held:
            yield self._held[name]
            return
        fd = self._open(name)
        try:
            yield fd
        finally:
            os.close(fd)

    def read_at(self, fd: int, name: str, offset: int, length: int, key: str | None = None) -> bytes:
        """``length`` bytes at ``offset`` of file ``name`` (open as ``fd``).

        Raises:
            CorruptCheckpointError: the file ends first (names the file and ``key``).
        """
        data = os.pread(fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]  # a read over 2 GiB returns in pieces
        done = len(data)
        while done < length:
            part = os.pread(fd, length - done, offset + done)
            if not part:
                file_path = os.path.join(self.path, name)
                raise CorruptCheckpointError(
                    f"corrupt checkpoint {file_path}: truncated, {length} bytes expected at offset {offset} "
                    f"({done} there)", path=file_path, key=key, expected=str(length), actual=str(done))
            parts.append(part)
            done += len(part)
        return b"".join(parts)

    def close(self) -> None:
        """Close every descriptor (idempotent)."""
        self._close()

    def _open(self, name: str) -> int:
        if not self._close.alive:
            raise ValueError(f"the pinned version of {self.path} is closed")
        try:
            return os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dir_fd)
        except FileNotFoundError as e:
            raise IncompleteCheckpointError(
                f"incomplete checkpoint: {os.path.join(self.path, name)} is gone from the version of {self.path} "
                "being loaded (a save replaced or removed the directory meanwhile, or it is damaged); load it again"
            ) from e


def _close_all(held: dict[str, int], dir_fd: int) -> None:
    for fd in held.values():
        os.close(fd)
    held.clear()
    os.close(dir_fd)
