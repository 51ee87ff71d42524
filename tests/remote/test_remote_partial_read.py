"""A partial read of a remote checkpoint fetches only what the local partial read reads (the object's tail, the
pickle and the requested records), returns what the local partial read returns, checks every fetched record, and
reads an object replaced meanwhile again from its new version."""

from __future__ import annotations

import io

import pytest
import torch

from lightning_ckpt import remote_files
from lightning_ckpt.builder import make_sync_checkpointer
from lightning_ckpt.checkpoint_reader import CheckpointReader
from lightning_ckpt.config import CheckpointerConfig
from lightning_ckpt.checkpoint_writer import CheckpointWriterConfig
from lightning_ckpt.errors import CheckpointError, CorruptCheckpointError
from lightning_ckpt.layout import LAYOUT_DIR, LAYOUT_FILE
from lightning_ckpt.remote_partial import RemoteReadStats
from lightning_ckpt.remote_s3 import S3Store
from tests.remote.test_remote_paths import all_files

pytestmark = [pytest.mark.remote, pytest.mark.timeout(60)]
BIG = 3 << 20  # bytes of each large tensor: the object is ~6 MiB, its first tail read 1 MiB
A = torch.full((4,), 1234.5)  # requested; its bytes are unique in the object


def state() -> dict:
    return {"big0": torch.randn(BIG // 4), "a": A.clone(), "step": 7,
            "opt": {"b": torch.arange(6, dtype=torch.int64), "c": torch.ones(3, dtype=torch.float16)},
            "big1": torch.randn(BIG // 4)}


def request() -> dict:
    """The keys to read: two tensors (one nested), a non-tensor leaf, and two keys the checkpoint lacks."""
    return {"a": torch.zeros(4), "step": 0, "opt": {"b": torch.zeros(6, dtype=torch.int64), "gone": 1},
            "nope": torch.zeros(2)}


def save(path: str, layout: str, values: dict) -> None:
    checkpointer = make_sync_checkpointer(CheckpointerConfig(writer_config=CheckpointWriterConfig(layout=layout)))
    try:
        checkpointer.save(path, values)
    finally:
        checkpointer.close()


def rank_object_key(s3, key: str, layout: str) -> str:
    if layout == LAYOUT_FILE:
        return key
    (found,) = [k for k in s3.keys() if k.startswith(f"{key}/gen-")]
    return found


def ops(s3, op: str, key: str) -> list[dict]:
    return [o for o in s3.server.ops(op, key) if o["key"].endswith(key)]  # not run/ck/MANIFEST.json for run/ck


def fetched_bytes(s3, key: str) -> int:
    """The bytes the server sent of ``key`` (every GET ranged: never the whole object)."""
    gets = ops(s3, "GetObject", key)
    assert gets and all(o["range"] and o["range"].startswith("bytes=") for o in gets), gets
    total = 0
    for o in gets:
        first, last = o["range"][len("bytes="):].split("-")
        total += int(last) - int(first) + 1 if first else int(last)
    return total


@pytest.mark.parametrize("layout", [LAYOUT_FILE, LAYOUT_DIR])
def test_a_partial_read_fetches_only_the_tail_the_pickle_and_the_requested_records(s3, tmp_path, layout):
    values = state()
    url = f"{s3.url}/run/ck"
    save(url, layout, values)
    local = str(tmp_path / "local")
    save(local, layout, values)
    key = rank_object_key(s3, "run/ck", layout)
    size = len(s3.get(key))
    s3.server.clear_log()

    target = request()
    a, b = target["a"], target["opt"]["b"]
    reader = CheckpointReader()
    loaded, missing = reader.read(url, target)
    expected, expected_missing = CheckpointReader().read(local, request())

    assert missing == expected_missing == ["opt.gone", "nope"]
    assert loaded is target and loaded["a"] is a and loaded["opt"]["b"] is b  # filled in place
    assert torch.equal(a, values["a"]) and torch.equal(b, values["opt"]["b"]) and loaded["step"] == 7
    assert sorted(loaded) == sorted(expected) and sorted(loaded["opt"]) == sorted(expected["opt"])
    for got, want in ((loaded["a"], expected["a"]), (loaded["opt"]["b"], expected["opt"]["b"]),
                      (loaded["nope"], expected["nope"])):
        assert torch.equal(got, want) and got.dtype == want.dtype
    assert loaded["step"] == expected["step"] and loaded["opt"]["gone"] == expected["opt"]["gone"]

    sent = fetched_bytes(s3, key)
    assert sent <= remote_files.TAIL_BYTES + (64 << 10) < size // 4  # the tail, the pickle and two small records
    stats = reader.last_read_stats
    assert isinstance(stats, RemoteReadStats) and stats.fetched_bytes == sent
    assert stats.fetch_requests == len(ops(s3, "GetObject", key)) + len(ops(s3, "HeadObject", key))
    assert all_files(tmp_path / "cache") == []  # the sparse copy is gone


@pytest.mark.parametrize("layout", [LAYOUT_FILE, LAYOUT_DIR])
def test_a_flipped_byte_in_a_requested_record_raises(s3, layout):
    url = f"{s3.url}/run/ck"
    save(url, layout, state())
    key = rank_object_key(s3, "run/ck", layout)
    data = bytearray(s3.get(key))
    at = data.find(A.numpy().tobytes())
    assert at > 0 and data.find(A.numpy().tobytes(), at + 1) < 0
    data[at + 5] ^= 0x01
    s3.client.put_object(Bucket=s3.name, Key=key, Body=bytes(data))
    s3.server.clear_log()

    with pytest.raises(CorruptCheckpointError, match="checksum mismatch") as caught:
        CheckpointReader().read(url, {"a": torch.zeros(4)})
    assert caught.value.expected and caught.value.actual and caught.value.expected != caught.value.actual
    assert fetched_bytes(s3, key) < len(data) // 4  # found by the partial read, not by a download
    # a key whose record is intact still reads
    loaded, missing = CheckpointReader().read(url, {"opt": {"b": torch.zeros(6, dtype=torch.int64)}})
    assert missing == [] and torch.equal(loaded["opt"]["b"], torch.arange(6))


def test_an_object_smaller_than_the_tail_is_read_from_the_tail_alone(s3):
    url = f"{s3.url}/run/small"
    save(url, LAYOUT_FILE, {"a": A, "b": torch.ones(2)})
    s3.server.clear_log()
    reader = CheckpointReader()
    loaded, missing = reader.read(url, {"a": torch.zeros(4), "x": 1})
    assert missing == ["x"] and torch.equal(loaded["a"], A)
    assert len(ops(s3, "GetObject", "run/small")) == 1 and reader.last_read_stats.fetch_requests == 2


def test_a_plain_torch_save_object_is_read_whole(s3):
    body = io.BytesIO()
    torch.save({"a": A, "b": torch.ones(2)}, body)
    s3.client.put_object(Bucket=s3.name, Key="run/plain.pt", Body=body.getvalue())
    loaded, missing = CheckpointReader().read(f"{s3.url}/run/plain.pt", {"a": torch.zeros(4), "x": 1})
    assert missing == ["x"] and torch.equal(loaded["a"], A)


def _replace_after_head(monkeypatch, s3, key: str, bodies: list[bytes], times: int) -> list[int]:
    """After each of the next ``times`` HEADs of ``key``, put the next of ``bodies`` (in turn) there."""
    real_head = S3Store.head
    put: list[int] = []

    async def head(self, target, deadline):
        answer = await real_head(self, target, deadline)
        if target.key == key and len(put) < times:
            put.append(len(put) % len(bodies))
            s3.client.put_object(Bucket=s3.name, Key=key, Body=bodies[put[-1]])
        return answer

    monkeypatch.setattr(S3Store, "head", head)
    return put


def test_an_object_replaced_during_a_partial_read_is_read_again_from_its_new_version(s3, monkeypatch, tmp_path):
    url = f"{s3.url}/run/ck"
    save(url, LAYOUT_FILE, state())
    newer = state()
    newer["a"] = torch.full((4,), -2.0)
    save(f"{s3.url}/run/newer", LAYOUT_FILE, newer)
    _replace_after_head(monkeypatch, s3, "run/ck", [s3.get("run/newer")], times=1)
    s3.server.clear_log()

    reader = CheckpointReader()
    loaded, missing = reader.read(url, {"a": torch.zeros(4)})
    assert missing == [] and torch.equal(loaded["a"], newer["a"])
    assert len(ops(s3, "HeadObject", "run/ck")) == 2
    assert isinstance(reader.last_read_stats, RemoteReadStats)  # still a partial read, not a download
    assert all_files(tmp_path / "cache") == []


def test_an_object_replaced_on_every_partial_read_fails_after_a_bounded_number_of_tries(s3, monkeypatch, tmp_path):
    url = f"{s3.url}/run/ck"
    save(url, LAYOUT_FILE, state())
    save(f"{s3.url}/run/other", LAYOUT_FILE, state())
    _replace_after_head(monkeypatch, s3, "run/ck", [s3.get("run/other"), s3.get("run/ck")], times=100)
    s3.server.clear_log()

    with pytest.raises(CheckpointError, match="replaced"):
        CheckpointReader().read(url, {"a": torch.zeros(4)})
    assert len(ops(s3, "HeadObject", "run/ck")) == remote_files._READ_ATTEMPTS
    assert all_files(tmp_path / "cache") == []
