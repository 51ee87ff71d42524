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
from typing import Any, BinaryIO, Callable

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
        path: the file to create (named in errors).
        direct_io: write large page-aligned buffers with O_DIRECT where the filesystem allows it.
        opener: ``flags -> fd`` that opens the file (e.g. ``Commit.opener``: relative to a directory descriptor,
            never following a symlink); by default ``path`` is opened.
    """

    def __init__(self, path: str, direct_io: bool = False, opener: Callable[[int], int] | None = None) -> None:
        self.path = path
        self._opener = opener or (lambda flags: os.open(path, flags | os.O_CLOEXEC, 0o644))
        self._file: BinaryIO = os.fdopen(self._opener(os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb")  # noqa: SIM115
        self._direct_fd = _open_direct(self._opener) if direct_io else None
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

    def close(self, fsync: bool = False) -> None:
        """Write ``version``, ``byteorder``, the serialization id and the central directory, then close (after an
        fsync of the file when ``fsync``)."""
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
        if fsync:
            os.fsync(self._file.fileno())
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


def _open_direct(opener: Callable[[int], int], access: int = os.O_WRONLY) -> int | None:
    """A second descriptor on the file with O_DIRECT, or None where the OS or filesystem has none (tmpfs)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return opener(access | flag)
    except OSError:
        return None


def reopen_direct(fd: int) -> int | None:
    """An O_DIRECT read descriptor on the very file ``fd`` has open (through ``/proc/self/fd``, so a rename of its
    path meanwhile changes nothing), or None where there is none to be had."""
    st = os.fstat(fd)
    direct = _open_direct(lambda flags: os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC), os.O_RDONLY)
    if direct is not None and (os.fstat(direct).st_ino, os.fstat(direct).st_dev) != (st.st_ino, st.st_dev):
        os.close(direct)
        return None
    return direct


def _address(view: memoryview) -> int:
    """The address of a buffer's first byte (read-only buffers, like bytes, are never written directly)."""
    if view.readonly or view.nbytes == 0:
        return -1
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def read_record(path: str | BinaryIO, name: str, opener: Callable[[int], int] | None = None) -> bytes | None:
    """The bytes of record ``<folder>/<name>`` of a torch zip (any folder name), or None when absent.

    ``path`` may also be a seekable binary file (e.g. the fetched tail of a remote object): only that record's
    header and bytes are read. With ``opener`` (``flags -> fd``, e.g. relative to a directory descriptor) the file is
    opened through it and ``path`` only names it in errors.

    Raises:
        zipfile.BadZipFile, OSError: not a readable zip.
    """
    if opener is not None:
        opened: Any = os.fdopen(opener(os.O_RDONLY), "rb")
    else:
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


class CompressedRecordError(zipfile.BadZipFile):
    """A zip with compressed (e.g. DEFLATE) records: a valid torch file that only ``torch.load`` reads (its bytes on
    disk are not the records' bytes). ``names`` lists every record (its folder stripped)."""

    def __init__(self, message: str, names: list[str]) -> None:
        super().__init__(message)
        self.names = names


def record_spans(f: BinaryIO, path: str, names: set[str] | None = None) -> dict[str, tuple[int, int]]:
    """Maps each record name of the torch zip open as ``f`` (its folder stripped) to ``(data offset, size)``.

    The stored bytes are located from each local header, not read through zipfile, which would check the CRC
    fields that torch leaves at 0. ``path`` only names the file in errors; ``names`` limits the records looked up.

    Raises:
        CompressedRecordError: a record is compressed (any record: the spans are of stored bytes only).
        zipfile.BadZipFile, OSError: not a readable zip.
    """
    fast = _stored_spans(f, names)
    if fast is not None:
        return fast
    spans = {}
    with zipfile.ZipFile(f) as z:
        infos = z.infolist()
    compressed = sorted(i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED)
    if compressed:  # its bytes on disk are not the record's: only torch.load (which inflates them) reads it
        raise CompressedRecordError(f"record {compressed[0]} of {path} is compressed ({len(compressed)} such)",
                                    [i.filename.split("/", 1)[-1] for i in infos])
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


_EOCD, _EOCD64_LOCATOR, _CENTRAL, _LOCAL = b"PK\x05\x06", b"PK\x06\x07", b"PK\x01\x02", b"PK\x03\x04"
_CENTRAL_FIXED = struct.Struct("<4sHHHHHHIIIHHHHHII")
_HEADER_WINDOW = 1 << 20  # local headers read together when they lie within this many bytes


def _stored_spans(f: BinaryIO, names: set[str] | None) -> dict[str, tuple[int, int]] | None:
    """``record_spans`` for a zip of stored records, from one read of the central directory and one read per
    megabyte of local headers (zipfile costs tens of microseconds a record, seconds for 100k records).

    Returns None for anything unusual (a compressed or encrypted record, a multi-disk or damaged directory): the
    caller then reads the file through zipfile, which names what is wrong.
    """
    entries = central_entries(f)
    if entries is None:
        return None
    wanted = [(name.split("/", 1)[-1], offset, size) for name, offset, size in entries
              if names is None or name.split("/", 1)[-1] in names]
    spans: dict[str, tuple[int, int]] = {}
    order = sorted(wanted, key=lambda e: e[1])
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and order[j + 1][1] + 30 - order[i][1] <= _HEADER_WINDOW:
            j += 1
        start = order[i][1]
        f.seek(start)
        window = f.read(order[j][1] + 30 - start)
        for name, offset, size in order[i:j + 1]:
            header = window[offset - start:offset - start + 30]
            if len(header) != 30 or header[:4] != _LOCAL:
                return None
            name_len, extra_len = struct.unpack_from("<HH", header, 26)
            spans[name] = (offset + 30 + name_len + extra_len, size)
        i = j + 1
    return {name: spans[name] for name, _, _ in wanted}  # the directory's order, as zipfile gives it


def central_entries(f: BinaryIO) -> list[tuple[str, int, int]] | None:
    """``(name, local header offset, size)`` of every stored record, in directory order; None if unusual."""
    end = f.seek(0, os.SEEK_END)
    tail_len = min(end, 22 + 0xFFFF)
    f.seek(end - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        return None
    disk, cd_disk, _, count, cd_size, cd_offset = struct.unpack_from("<HHHHII", tail, at + 4)
    if disk or cd_disk:
        return None
    if at >= 20 and tail[at - 20:at - 16] == _EOCD64_LOCATOR:
        (eocd64,) = struct.unpack_from("<Q", tail, at - 12)
        f.seek(eocd64)
        record = f.read(56)
        if len(record) != 56 or record[:4] != b"PK\x06\x06":
            return None
        count, cd_size, cd_offset = struct.unpack_from("<QQQ", record, 32)
    f.seek(cd_offset)
    directory = f.read(cd_size)
    if len(directory) != cd_size:
        return None
    entries, pos = [], 0
    for _ in range(count):
        if pos + 46 > cd_size:
            return None
        (sig, _, _, flags, method, _, _, _, csize, usize, name_len, extra_len, comment_len, _, _, _,
         offset) = _CENTRAL_FIXED.unpack_from(directory, pos)
        if sig != _CENTRAL or method != 0 or flags & 0x1:
            return None
        raw = directory[pos + 46:pos + 46 + name_len]
        name = raw.decode("utf-8" if flags & 0x800 else "cp437")
        extra = directory[pos + 46 + name_len:pos + 46 + name_len + extra_len]
        if _ZIP64_MARKER in (usize, csize, offset):
            usize, offset = _zip64_fields(extra, usize, csize, offset)
            if usize is None:
                return None
        entries.append((name, offset, usize))
        pos += 46 + name_len + extra_len + comment_len
    return entries if pos == cd_size else None


def _zip64_fields(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int | None, int]:
    """The 64-bit size and offset from a zip64 extra field (each present only where its 32-bit field is maxed)."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 0x0001:
            values = list(struct.unpack_from(f"<{length // 8}Q", extra, pos + 4))
            if usize == _ZIP64_MARKER:
                usize = values.pop(0) if values else None
            if csize == _ZIP64_MARKER and values:
                values.pop(0)
            if offset == _ZIP64_MARKER:
                if not values:
                    return None, 0
                offset = values.pop(0)
            return usize, offset
        pos += 4 + length
    return None, 0
