"""The parallel read engine: storages filled by batched and pieced preads, every recorded range verified."""

from __future__ import annotations

import errno
import os

import pytest
import torch
import xxhash

import lightning_ckpt as lc
from lightning_ckpt import read_engine, torch_zip
from lightning_ckpt.read_engine import Check, StorageReader
from lightning_ckpt.serialization import storage_view
from lightning_ckpt.verification import OpenedFile, read_checksum_record
from tests._helpers import assert_equal_state
from tests.unit._crafted import write_ours, write_per_tensor


def _mixed_state() -> dict:
    torch.manual_seed(0)
    small = {f"p{i}": torch.randn(7 + i) for i in range(40)}
    return {"small": small, "big": torch.randn(50_000), "empty": torch.empty(0), "step": 3}


@pytest.fixture
def tiny_pieces(monkeypatch):
    """Pieces and batches small enough that a 200 KB tensor is read in pieces and 40 small ones in a few batches."""
    monkeypatch.setattr(read_engine, "PIECE_BYTES", 16 << 10)
    monkeypatch.setattr(read_engine, "BATCH_BYTES", 2 << 10)  # also: records of 2 KiB and more are read directly
    monkeypatch.setattr(read_engine, "BATCH_RECORDS", 8)


def _storage_spans(opened: OpenedFile) -> dict:
    return {n[len("data/"):]: s for n, s in opened.spans().items() if n.startswith("data/")}


def _checks(record) -> list[Check]:
    return [Check(r.xxh3, [k]) for k, r in record.records.items()]


def test_storages_match_the_file_bytes_with_batched_and_pieced_reads(tmp_path, tiny_pieces):
    path = write_per_tensor(tmp_path / "a.ckpt", _mixed_state())
    with OpenedFile(path) as opened:
        spans, record = _storage_spans(opened), read_checksum_record(opened)
        engine = StorageReader(opened.fd, path, spans, _checks(record), threads=3).start()
        stats = engine.finish(timeout_secs=60)
        for key, (offset, size) in spans.items():
            assert bytes(storage_view(engine.storages[key])) == opened.read_span((offset, size)), key
    big = max(size for _, size in spans.values())
    assert stats.storages == len(spans) == 42
    assert stats.reads < len(spans)  # 40 small storages took far fewer reads than one each
    assert stats.reads >= big // (16 << 10)  # the large one was read in pieces
    first, last = min(o for o, _ in spans.values()), max(o + s for o, s in spans.values())
    assert sum(s for _, s in spans.values()) <= stats.bytes_read <= last - first


def test_a_flipped_byte_in_a_later_piece_names_the_check(tmp_path, tiny_pieces):
    path = write_ours(tmp_path / "a.ckpt", _mixed_state())
    with OpenedFile(path) as opened:
        spans = _storage_spans(opened)
        key = max(spans, key=lambda k: spans[k][1])
        offset, size = spans[key]
    with open(path, "r+b") as f:
        f.seek(offset + size - 100)
        byte = f.read(1)
        f.seek(offset + size - 100)
        f.write(bytes([byte[0] ^ 0x01]))
    with OpenedFile(path) as opened:
        checks = _checks(read_checksum_record(opened))
        engine = StorageReader(opened.fd, path, _storage_spans(opened), checks, threads=2).start()
        with pytest.raises(lc.CorruptCheckpointError, match=f"record data/{key} checksum mismatch") as info:
            engine.finish(timeout_secs=60)
    assert info.value.path == path and info.value.key == f"data/{key}"


def test_one_check_over_a_run_of_storages_hashes_them_in_order(tmp_path, tiny_pieces):
    """A format recording one checksum per run of small storages (and over pieces of a large one) is verified."""
    path = write_ours(tmp_path / "a.ckpt", _mixed_state())
    with OpenedFile(path) as opened:
        spans = _storage_spans(opened)
        ordered = sorted(spans, key=lambda k: spans[k][0])
        run = b"".join(opened.read_span(spans[k]) for k in ordered)
        good = Check(xxhash.xxh3_64_hexdigest(run), ordered, name="run 0")
        StorageReader(opened.fd, path, spans, [good], threads=4).start().finish(timeout_secs=60)
        swapped = Check(good.expected, ordered[1:] + ordered[:1], name="run 0")  # same bytes, wrong order
        with pytest.raises(lc.CorruptCheckpointError, match="run 0 checksum mismatch") as info:
            StorageReader(opened.fd, path, spans, [swapped], threads=4).start().finish(timeout_secs=60)
    assert info.value.key == "run 0"


def test_a_record_past_the_end_of_the_file_is_truncated(tmp_path):
    path = write_ours(tmp_path / "a.ckpt", _mixed_state())
    size = os.path.getsize(path)
    with OpenedFile(path) as opened:
        engine = StorageReader(opened.fd, path, {"x": (size - 10, 100)}, [], threads=1).start()
        with pytest.raises(lc.CorruptCheckpointError, match="data/x is truncated") as info:
            engine.finish(timeout_secs=60)
    assert info.value.path == path


def test_bad_thread_counts_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="threads"):
        StorageReader(0, "x", {}, [], threads=0)
    with pytest.raises(ValueError, match="read_threads"):
        lc.CheckpointReader(read_threads=0)


@pytest.mark.parametrize("threads", [1, 4])
def test_reader_loads_the_mixed_state_through_the_engine(tmp_path, tiny_pieces, threads):
    state = _mixed_state()
    path = write_per_tensor(tmp_path / "a.ckpt", state)
    reader = lc.CheckpointReader(read_threads=threads)
    loaded, missing = reader.read(path)
    assert missing == [] and reader.last_read_stats is not None and reader.last_read_stats.storages == 42
    assert_equal_state(loaded, state)
    packed = write_ours(tmp_path / "packed.ckpt", state)  # the 40 small tensors written as one run
    loaded, missing = reader.read(packed)
    assert missing == [] and reader.last_read_stats.storages == 3  # the run, the large one, the empty one
    assert_equal_state(loaded, state)


@pytest.fixture
def small_direct_chunks(monkeypatch):
    """Records of 8 KiB and more go through the O_DIRECT path, in chunks of 64 KiB (the alignment stays real)."""
    monkeypatch.setattr(read_engine, "BATCH_BYTES", 8 << 10)
    monkeypatch.setattr(read_engine, "DIRECT_CHUNK_BYTES", 64 << 10)


def _cold(path) -> None:
    """Drop the file from the page cache (written pages are flushed first: only clean pages can be dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _direct_or_skip(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        direct = torch_zip.reopen_direct(fd)
    finally:
        os.close(fd)
    if direct is None:
        pytest.skip(f"no O_DIRECT on the filesystem of {path}")
    os.close(direct)


def _direct_state() -> dict:
    torch.manual_seed(1)  # sizes that are no multiple of the alignment, several chunks each
    return {"a": torch.randn(100_003), "b": torch.randn(30_001).double(), "c": torch.randn(5), "step": 1}


def test_a_cold_file_is_read_around_the_page_cache_into_the_exact_bytes(tmp_path, small_direct_chunks):
    """torch.save puts records at 64-byte offsets: the aligned blocks around each chunk are read, and exactly the
    record's bytes are copied out, whatever the alignment of file offset, length and memory."""
    path = str(tmp_path / "plain.pt")
    torch.save(_direct_state(), path)
    _direct_or_skip(path)
    with OpenedFile(path) as opened:
        spans = _storage_spans(opened)
        _cold(path)  # after the zip directory was read: its readahead cached the records' first pages
        assert any(offset % 4096 for offset, _ in spans.values())  # the case this is about
        engine = StorageReader(opened.fd, path, spans, [], threads=2).start()
        stats = engine.finish(timeout_secs=60)
        for key, span in spans.items():
            assert bytes(storage_view(engine.storages[key])) == opened.read_span(span), key
    direct_records = sum(size for _, size in spans.values() if size >= 8 << 10)
    assert stats.direct_bytes >= direct_records  # read with O_DIRECT, whole blocks (a little more)
    assert stats.direct_bytes <= direct_records + 2 * 4096 * stats.reads


def test_a_cached_file_is_copied_from_the_page_cache_not_read_again(tmp_path, small_direct_chunks):
    path = write_ours(tmp_path / "a.ckpt", _direct_state())
    _direct_or_skip(path)
    with open(path, "rb") as f:
        f.read()  # every page cached
    with OpenedFile(path) as opened:
        record = read_checksum_record(opened)
        engine = StorageReader(opened.fd, path, _storage_spans(opened), _checks(record), threads=2).start()
        stats = engine.finish(timeout_secs=60)
    assert stats.direct_bytes == 0 and stats.bytes_read > 0


def test_a_flipped_byte_in_a_cold_large_record_is_caught_on_the_direct_path(tmp_path, small_direct_chunks):
    path = write_ours(tmp_path / "a.ckpt", _direct_state())
    _direct_or_skip(path)
    with OpenedFile(path) as opened:
        offset, size = _storage_spans(opened)[read_checksum_record(opened).by_key_path[("a",)]]
    with open(path, "r+b") as f:
        f.seek(offset + size - 3)  # in the last chunk, past the first block
        byte = f.read(1)
        f.seek(offset + size - 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    with OpenedFile(path) as opened:
        record = read_checksum_record(opened)
        spans = _storage_spans(opened)
        _cold(path)
        engine = StorageReader(opened.fd, path, spans, _checks(record), threads=2).start()
        with pytest.raises(lc.CorruptCheckpointError, match="checksum mismatch"):
            engine.finish(timeout_secs=60)
        assert engine.stats.direct_bytes > 0


def test_a_large_record_past_the_end_of_the_file_is_truncated_on_the_direct_path(tmp_path, small_direct_chunks):
    path = write_ours(tmp_path / "a.ckpt", _direct_state())
    _direct_or_skip(path)
    _cold(path)
    size = os.path.getsize(path)
    with OpenedFile(path) as opened:
        engine = StorageReader(opened.fd, path, {"x": (size - 5000, 100_000)}, [], threads=1).start()
        with pytest.raises(lc.CorruptCheckpointError, match="data/x is truncated"):
            engine.finish(timeout_secs=60)


def test_a_device_that_refuses_the_alignment_falls_back_to_plain_reads(tmp_path, small_direct_chunks, monkeypatch):
    path = write_ours(tmp_path / "a.ckpt", _direct_state())
    _direct_or_skip(path)
    real, refused = os.preadv, []

    def preadv(fd, buffers, offset, *flags):
        if fd == engine._direct_fd:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(read_engine.os, "preadv", preadv)
    with OpenedFile(path) as opened:
        record = read_checksum_record(opened)
        spans = _storage_spans(opened)
        _cold(path)
        engine = StorageReader(opened.fd, path, spans, _checks(record), threads=2)
        engine.start()
        stats = engine.finish(timeout_secs=60)
        loaded = {k: bytes(storage_view(s)) for k, s in engine.storages.items()}
        assert loaded == {k: opened.read_span(span) for k, span in spans.items()}
    assert refused and stats.direct_bytes == 0
