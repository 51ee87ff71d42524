"""The ``torch.save`` zip container, written and read without importing torch (so the writer process stays small).

What ``torch.load`` needs is a zip of stored (uncompressed) records under one folder: ``data.pkl``, ``version``,
``byteorder`` and ``data/<key>`` per storage, each record's bytes starting at a 64-byte aligned offset (``mmap``
loading maps them in place). CRC fields are written as 0, as ``torch.save`` does with its CRC option off; our own
xxh3 checksums live in an extra record that ``torch.load`` ignores.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import struct
import sys
import zipfile
from typing import Any, BinaryIO

import xxhash

ARCHIVE = "archive"
ALIGNMENT = 64
_ZIP64_MARKER = 0xFFFFFFFF  # a 32-bit field holding this means "see the zip64 extra field"
_ZIP64_THRESHOLD = 0xFFFFFFFF  # sizes/offsets from here on need zip64 (tests lower it to exercise that path)
_PAD_EXTRA_ID = 0x4246  # "FB", the id torch uses for its padding field
_FLAGS = 0x0800  # names are UTF-8
_CHUNK = 64 << 20
# Records at least this large, in memory aligned to DIRECT_IO_ALIGNMENT, are written with O_DIRECT: straight from
# that memory to the disk, without a copy into the page cache (the copy costs CPU the training process needs).
DIRECT_IO_MIN_BYTES = 1 << 20
DIRECT_IO_ALIGNMENT = 4096


def checksum(data: Any) -> str:
    """xxh3-64 hex digest of bytes or any buffer."""
    return xxhash.xxh3_64_hexdigest(data)


class TorchZipWriter:
    """Writes records into a new zip file; ``close`` writes the trailer records and the central directory.

    Args:
        path: the file to create.
        direct_io: write large page-aligned buffers with O_DIRECT where the filesystem allows it.
    """

    def __init__(self, path: str, direct_io: bool = False) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._direct_fd = _open_direct(path) if direct_io else None
        self._pos = 0
        self._entries: list[tuple[bytes, int, int]] = []  # (name, header offset, size)
        self.direct_bytes = 0  # bytes written with O_DIRECT (tests and metrics read it)

    def write_record(self, name: str, data: Any) -> None:
        """Write one record from bytes or a buffer (large buffers go to the file without a copy)."""
        view = memoryview(data).cast("B")
        size = view.nbytes
        full = f"{ARCHIVE}/{name}".encode()
        direct = self._direct_fd is not None and size >= DIRECT_IO_MIN_BYTES and _address(view) % DIRECT_IO_ALIGNMENT == 0
        zip64 = size >= _ZIP64_THRESHOLD or self._pos >= _ZIP64_THRESHOLD
        extra = struct.pack("<HHQQ", 0x0001, 16, size, size) if zip64 else b""
        base = self._pos + 30 + len(full) + len(extra)
        pad = (-(base + 4)) % (DIRECT_IO_ALIGNMENT if direct else ALIGNMENT)
        extra += struct.pack("<HH", _PAD_EXTRA_ID, pad) + b"\0" * pad
        small = _ZIP64_MARKER if zip64 else size
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, _FLAGS, 0, 0, 0x21, 0, small, small,
                             len(full), len(extra))
        self._entries.append((full, self._pos, size))
        self._write(header + full + extra)
        done = self._write_direct(view) if direct else 0
        for start in range(done, size, _CHUNK):
            self._write(view[start:start + _CHUNK])

    def _write_direct(self, view: memoryview) -> int:
        """Write the whole pages of ``view`` at the current position with O_DIRECT; returns the bytes written.

        The header before and the tail after are written through the page cache; they never share a page with
        the direct part. A filesystem that refuses O_DIRECT turns it off for the rest of the file.
        """
        whole = view.nbytes // DIRECT_IO_ALIGNMENT * DIRECT_IO_ALIGNMENT
        self._file.flush()
        written = 0
        try:
            while written < whole:
                chunk = view[written:min(whole, written + _CHUNK)]
                written += os.pwrite(self._direct_fd, chunk, self._pos + written)
        except OSError as e:
            if e.errno != errno.EINVAL or written:
                raise
            self._close_direct()
            return 0
        self._pos += written
        self._file.seek(self._pos)
        self.direct_bytes += written
        return written

    def _close_direct(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    def _write(self, data: Any) -> None:
        n = self._file.write(data)
        self._pos += len(data) if n is None else n

    def close(self) -> None:
        """Write ``version``, ``byteorder``, the serialization id and the central directory, then close."""
        self.write_record("version", b"3\n")
        self.write_record("byteorder", sys.byteorder.encode())
        self.write_record(".data/serialization_id", str(secrets.randbelow(10**40)).zfill(40).encode())
        cd_offset = self._pos
        for full, offset, size in self._entries:
            zip64 = size >= _ZIP64_THRESHOLD or offset >= _ZIP64_THRESHOLD
            extra = struct.pack("<HHQQQ", 0x0001, 24, size, size, offset) if zip64 else b""
            small, small_off = (_ZIP64_MARKER, _ZIP64_MARKER) if zip64 else (size, offset)
            self._write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45 if zip64 else 20, _FLAGS, 0, 0, 0x21, 0,
                                    small, small, len(full), len(extra), 0, 0, 0, 0, small_off) + full + extra)
        cd_size = self._pos - cd_offset
        count = len(self._entries)
        if count >= 0xFFFF or cd_offset >= _ZIP64_THRESHOLD or cd_size >= _ZIP64_THRESHOLD:
            eocd64 = self._pos
            self._write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, cd_offset))
            self._write(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
            count, cd_size, cd_offset = 0xFFFF, _ZIP64_MARKER, _ZIP64_MARKER
        self._write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_size, cd_offset, 0))
        self._file.flush()
        self._file.close()
        self._close_direct()

    def fileno(self) -> int:
        return self._file.fileno()

    def abort(self) -> None:
        """Close without finishing (the caller removes the temp file)."""
        try:
            self._file.close()
        except OSError:
            pass
        self._close_direct()


def _open_direct(path: str) -> int | None:
    """A second descriptor on ``path`` with O_DIRECT, or None where the OS or filesystem has none (tmpfs)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def _address(view: memoryview) -> int:
    """The address of a buffer's first byte (read-only buffers, like bytes, are never written directly)."""
    if view.readonly or view.nbytes == 0:
        return -1
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def read_record(path: str | BinaryIO, name: str) -> bytes | None:
    """The bytes of record ``<folder>/<name>`` of a torch zip (any folder name), or None when absent.

    ``path`` may also be a seekable binary file (e.g. the fetched tail of a remote object): only that record's
    header and bytes are read.

    Raises:
        zipfile.BadZipFile, OSError: not a readable zip.
    """
    opened = open(path, "rb") if isinstance(path, (str, os.PathLike)) else contextlib.nullcontext(path)
    with opened as f:
        span = record_spans(f, str(path), {name}).get(name)
        if span is None:
            return None
        f.seek(span[0])
        data = f.read(span[1])
        if len(data) != span[1]:
            raise zipfile.BadZipFile(f"record {name} of {path} is truncated")
        return data


def record_spans(f: BinaryIO, path: str, names: set[str] | None = None) -> dict[str, tuple[int, int]]:
    """Maps each record name of the torch zip open as ``f`` (its folder stripped) to ``(data offset, size)``.

    The stored bytes are located from each local header, not read through zipfile, which would check the CRC
    fields that torch leaves at 0. ``path`` only names the file in errors; ``names`` limits the records looked up.

    Raises:
        zipfile.BadZipFile, OSError: not a readable zip.
    """
    spans = {}
    with zipfile.ZipFile(f) as z:
        infos = z.infolist()
    for info in infos:
        if names is not None and info.filename.split("/", 1)[-1] not in names:
            continue
        f.seek(info.header_offset)
        header = f.read(30)
        if header[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local header for {info.filename} in {path}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        spans[info.filename.split("/", 1)[-1]] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return spans
