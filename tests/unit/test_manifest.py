"""The manifest and checksum record: one writer, one validating reader; malformed fields name path and field."""

from __future__ import annotations

import json

import pytest

from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.manifest import ChecksumRecord, Manifest, ManifestFile, RecordChecksum


def test_manifest_round_trips():
    m = Manifest(2, {"checkpoint_0.pt": ManifestFile(10, "ab"), "checkpoint_1.pt": ManifestFile(12)}, {"step": 3})
    back = Manifest.from_json(m.to_json(), "/x/MANIFEST.json")
    assert back == m


def test_checksum_record_round_trips():
    r = ChecksumRecord("00ff", {"0": RecordChecksum(8, "aa")}, [(["model", "w"], "0")], {"step": 1})
    back = ChecksumRecord.from_json(r.to_json(), "/x/a.ckpt")
    assert back == r


@pytest.mark.parametrize("field, value", [
    ("world_size", "2"), ("files", []), ("format", None), ("created_unix", "now"), ("metadata", [1]),
])
def test_malformed_manifest_field_is_corrupt_naming_path_and_field(field, value):
    raw = json.loads(Manifest(1, {"checkpoint_0.pt": ManifestFile(1)}).to_json())
    raw[field] = value
    with pytest.raises(CorruptCheckpointError, match=f"/d/MANIFEST.json.*'{field}'") as info:
        Manifest.from_json(json.dumps(raw), "/d/MANIFEST.json")
    assert info.value.path == "/d/MANIFEST.json" and info.value.key == field


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.pop("data_pkl_xxh3"), "data_pkl_xxh3"),
    (lambda r: r["records"].__setitem__("0", {"nbytes": 8}), "records['0'].xxh3"),
    (lambda r: r["records"].__setitem__("0", {"nbytes": -1, "xxh3": "aa"}), "records['0'].nbytes"),
    (lambda r: r.__setitem__("key_paths", [[["w"], "missing"]]), "key_paths[0]"),
    (lambda r: r.__setitem__("key_paths", [[{"unhashable": 1}, "0"]]), "key_paths[0]"),
    (lambda r: r.__setitem__("key_paths", [[[True], "0"]]), "key_paths[0]"),  # a bool is no key
    (lambda r: r.__setitem__("key_paths", [[["w", 1.5], "0"]]), "key_paths[0]"),
])
def test_malformed_checksum_record_is_corrupt_naming_the_field(mutate, field):
    raw = json.loads(ChecksumRecord("ff", {"0": RecordChecksum(8, "aa")}, [(["w"], "0")]).to_json())
    mutate(raw)
    with pytest.raises(CorruptCheckpointError, match="a.ckpt") as info:
        ChecksumRecord.from_json(json.dumps(raw), "/d/a.ckpt")
    assert info.value.key == field


@pytest.mark.parametrize("data", [b"", b"\xff{", b"[1]", b"null"])
def test_unreadable_json_is_corrupt(data):
    with pytest.raises(CorruptCheckpointError, match="/d/MANIFEST.json"):
        Manifest.from_json(data, "/d/MANIFEST.json")


def test_the_reader_uses_the_one_checksum_record_and_its_key_path_index():
    from lightning_ckpt import verification

    assert verification.ChecksumRecord is ChecksumRecord  # one parser for writer, reader and finder
    r = ChecksumRecord.from_json(ChecksumRecord("ff", {"0": RecordChecksum(8, "aa"), "1": RecordChecksum(4, "bb")},
                                                [(["opt", 0, "exp_avg"], "0"), (["w"], "1")]).to_json(), "/d/a.ckpt")
    assert r.by_key_path == {("opt", 0, "exp_avg"): "0", ("w",): "1"}
