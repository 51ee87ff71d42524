"""The torch-free zip writer produces files torch.load reads, plain and mmap, including the zip64 layout."""

from __future__ import annotations

import pytest
import torch

import lightning_ckpt as lc
from lightning_ckpt import torch_zip
from tests._helpers import assert_equal_state, data_file, nested_state_dict


@pytest.mark.parametrize("zip64", [False, True])
def test_files_load_with_torch_plain_and_mmap(zip64, tmp_path, monkeypatch):
    if zip64:
        monkeypatch.setattr(torch_zip, "_ZIP64_THRESHOLD", 512)  # every big record and the directory go zip64
    sd = nested_state_dict()
    sd["big"] = torch.arange(100_000, dtype=torch.float32)
    with lc.make_sync_checkpointer() as ck:
        ck.save(tmp_path / "a.ckpt", sd)
        assert_equal_state(ck.load(tmp_path / "a.ckpt"), sd)
    assert_equal_state(torch.load(data_file(tmp_path / "a.ckpt"), weights_only=True), sd)
    mapped = torch.load(data_file(tmp_path / "a.ckpt"), weights_only=True, mmap=True)
    assert_equal_state(mapped, sd)


def test_tensor_records_start_at_aligned_offsets(tmp_path):
    import zipfile

    with lc.make_sync_checkpointer() as ck:
        ck.save(tmp_path / "a.ckpt", {"a": torch.ones(3), "b": torch.ones(5, dtype=torch.int8), "c": torch.ones(7)})
    raw = data_file(tmp_path / "a.ckpt").read_bytes()
    with zipfile.ZipFile(data_file(tmp_path / "a.ckpt")) as z:
        for info in z.infolist():
            name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
                int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
            assert (info.header_offset + 30 + name_len + extra_len) % torch_zip.ALIGNMENT == 0, info.filename


def test_read_record_finds_records_of_torch_save_files(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    assert torch_zip.read_record(str(tmp_path / "plain.pt"), "byteorder") in (b"little", b"big")
    assert torch_zip.read_record(str(tmp_path / "plain.pt"), "lightning_ckpt/checksums.json") is None


def test_page_aligned_buffers_are_written_with_direct_io_and_load_back(tmp_path):
    import mmap

    n = 3 * torch_zip.DIRECT_IO_MIN_BYTES + 100  # whole pages go direct, the 100-byte tail through the page cache
    buf = mmap.mmap(-1, n)
    payload = torch.frombuffer(buf, dtype=torch.uint8)
    payload.copy_(torch.randint(0, 256, (n,), dtype=torch.uint8))
    writer = torch_zip.TorchZipWriter(str(tmp_path / "d.zip"), direct_io=True)
    if writer._direct_fd is None:
        writer.abort()
        pytest.skip("this filesystem refuses O_DIRECT")
    writer.write_record("data.pkl", b"x")
    writer.write_record("data/0", memoryview(buf))
    writer.write_record("data/1", b"small")
    writer.close()
    assert writer.direct_bytes == n // torch_zip.DIRECT_IO_ALIGNMENT * torch_zip.DIRECT_IO_ALIGNMENT
    assert torch_zip.read_record(str(tmp_path / "d.zip"), "data/0") == bytes(buf)
    assert torch_zip.read_record(str(tmp_path / "d.zip"), "data/1") == b"small"
    del payload
    buf.close()


def test_async_checkpoints_of_large_tensors_round_trip_through_direct_io(tmp_path):
    sd = {"big": torch.randn(1 << 20), "odd": torch.randn(300_001), "small": torch.ones(3)}
    with lc.make_async_checkpointer() as ck:
        ck.save(tmp_path / "a.ckpt", sd)[1].result(timeout=60)
        assert_equal_state(ck.load(tmp_path / "a.ckpt"), sd)
    assert_equal_state(torch.load(data_file(tmp_path / "a.ckpt"), weights_only=True, mmap=True), sd)


def _zipfile_spans(path) -> dict:
    """The spans as zipfile locates them (the reference the direct directory parse must agree with)."""
    import struct
    import zipfile

    raw = open(path, "rb").read()
    with zipfile.ZipFile(path) as z:
        return {i.filename.split("/", 1)[-1]: (i.header_offset + 30 + sum(struct.unpack_from("<HH", raw,
                i.header_offset + 26)), i.file_size) for i in z.infolist()}


@pytest.mark.parametrize("source", ["ours", "ours_zip64", "torch_save"])
def test_record_spans_from_the_directory_agree_with_zipfile(source, tmp_path, monkeypatch):
    path = str(tmp_path / "a.pt")
    state = {"a": torch.arange(10.0), "big": torch.ones(50_000), "small": [torch.ones(i) for i in range(30)]}
    if source == "torch_save":
        torch.save(state, path)
    else:
        if source == "ours_zip64":
            monkeypatch.setattr(torch_zip, "_ZIP64_THRESHOLD", 512)
        lc.CheckpointWriter(lc.CheckpointWriterConfig(layout="file"), rank_info=lc.RankInfo(0, 1)).write(path, state)
    monkeypatch.setattr(torch_zip, "_HEADER_WINDOW", 4096)  # several header windows
    with open(path, "rb") as f:
        assert torch_zip._stored_spans(f, None) is not None
        spans = torch_zip.record_spans(f, path)
        assert spans == _zipfile_spans(path) and list(spans) == list(_zipfile_spans(path))
        assert torch_zip.record_spans(f, path, {"data.pkl", "nope"}) == {"data.pkl": spans["data.pkl"]}


def test_record_spans_of_a_compressed_zip_are_refused_not_taken_as_stored_bytes(tmp_path):
    import zipfile

    path = str(tmp_path / "c.zip")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"x" * 1000)
        z.writestr("archive/version", b"3\n", compress_type=zipfile.ZIP_STORED)
    with open(path, "rb") as f:
        assert torch_zip._stored_spans(f, None) is None
        with pytest.raises(torch_zip.CompressedRecordError, match="archive/data.pkl.*compressed") as info:
            torch_zip.record_spans(f, path)
    assert info.value.names == ["data.pkl", "version"]
