"""Multi-rank checkpoints on S3 with two real gloo ranks: rank objects under a fresh generation, the manifest last."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import wait

import pytest
import torch

from lightning_ckpt import CheckpointReader, RankInfo, latest, paths, remote_dirs
from lightning_ckpt.errors import IncompleteCheckpointError
from lightning_ckpt.layout import MANIFEST_NAME
from lightning_ckpt.remote import RemoteConfig, RemoteUpload
from tests._helpers import wait_for

pytestmark = [pytest.mark.remote, pytest.mark.multiprocess, pytest.mark.timeout(180)]
PART = 5 << 20
MODES = ["sync", "async"]  # sync: DistBarrier in the rank's thread; async: TCPStoreBarrier in the writer process


@pytest.fixture(scope="module")
def ranks():
    from tests.distributed.launcher import RankPool

    with RankPool(2) as pool:
        yield pool


def rank_state(rank: int, version: int) -> dict:
    g = torch.Generator().manual_seed(100 * version + rank)
    return {"model": {"w": torch.randn(3 << 20, generator=g)}, "rank": rank, "version": version}  # 12 MiB


def _save(rank: int, world: int, url: str, env: dict, mode: str, version: int) -> str | None:
    """Save this rank's state at ``url``; returns None, or the text of the error this rank raised (the sync
    save's own; for async, raised from the error store by the next call, ``wait``)."""
    import lightning_ckpt as lc
    from lightning_ckpt.errors import CheckpointError

    os.environ.update(env)
    make = lc.make_sync_checkpointer if mode == "sync" else lc.make_async_checkpointer
    ck = make(lc.CheckpointerConfig())
    upload = RemoteUpload(paths.resolve(url), RemoteConfig(part_size_bytes=PART), 60.0)
    try:
        out = ck.save(url, rank_state(rank, version), after_commit=upload)
        if isinstance(out, tuple):
            wait([out[1]], timeout=120)  # without looking at it: its error stays pending in the error store
            ck.wait(120)
    except CheckpointError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        try:
            ck.close()
        except CheckpointError:
            pass
    return None


def _load(rank: int, world: int, url: str, env: dict, version: int) -> bool:
    import lightning_ckpt as lc

    os.environ.update(env)
    with lc.make_sync_checkpointer(lc.CheckpointerConfig()) as ck:
        loaded = ck.load(url)
    expected = rank_state(rank, version)
    return torch.equal(loaded["model"]["w"], expected["model"]["w"]) and loaded["version"] == version


def env_of(s3) -> dict:
    return {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                       "AWS_DEFAULT_REGION", "LIGHTNING_CKPT_CACHE_DIR")}


def generation_keys(s3, prefix: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key in s3.keys():
        if key.startswith(prefix + "/") and key.count("/") == prefix.count("/") + 2:
            generation, name = key[len(prefix) + 1:].split("/")
            found.setdefault(generation, []).append(name)
    return found


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_rank_objects_under_one_generation_and_the_manifest_names_them(mode, ranks, s3, tmp_path):
    url = f"{s3.url}/run/ckpt"
    assert ranks.run(_save, url, env_of(s3), mode, 1) == [None, None]
    (generation,) = generation_keys(s3, "run/ckpt")
    assert s3.keys() == sorted([f"run/ckpt/{generation}/checkpoint_0.pt", f"run/ckpt/{generation}/checkpoint_1.pt",
                                f"run/ckpt/{MANIFEST_NAME}"])
    manifest = json.loads(s3.get(f"run/ckpt/{MANIFEST_NAME}"))
    assert manifest["world_size"] == 2
    for rank in range(2):
        entry = manifest["files"][f"{generation}/checkpoint_{rank}.pt"]
        assert entry["nbytes"] == len(s3.get(f"run/ckpt/{generation}/checkpoint_{rank}.pt"))
        assert entry["data_pkl_xxh3"]
    assert ranks.run(_load, url, env_of(s3), 1) == [True, True]
    assert len(s3.server.ops("UploadPart", "checkpoint_1.pt")) == 3  # 12 MiB in 5 MiB parts
    assert s3.server.ops("PutObject", MANIFEST_NAME) and s3.uploads() == []
    assert latest.is_complete(url)


@pytest.mark.parametrize("mode", MODES)
def test_a_rank_failing_mid_upload_leaves_the_old_checkpoint_and_no_new_manifest(mode, ranks, s3):
    url = f"{s3.url}/run/ckpt"
    assert ranks.run(_save, url, env_of(s3), "sync", 1) == [None, None]
    before = {key: s3.get(key) for key in s3.keys()}
    s3.server.set_faults({"op": "UploadPart", "key": "checkpoint_1.pt", "part": 2, "action": "error",
                          "status": 403, "code": "AccessDenied"})
    s3.server.clear_log()
    errors = ranks.run(_save, url, env_of(s3), mode, 2)
    assert "AccessDenied" in errors[1], errors  # the failing rank raises its own error
    assert errors[0] is not None and ("AccessDenied" in errors[0] or "ranks [1]" in errors[0]), errors  # by its peer
    assert not s3.server.ops("PutObject", MANIFEST_NAME) and s3.uploads() == []
    for key, data in before.items():
        assert s3.get(key) == data  # the old checkpoint, bit-identical
    cache = os.environ["LIGHTNING_CKPT_CACHE_DIR"]
    assert [f for _, _, fs in os.walk(cache) for f in fs] == []  # no local copy of the failed generation is kept
    s3.server.set_faults()
    assert ranks.run(_load, url, env_of(s3), 1) == [True, True]


def test_a_re_save_switches_generation_and_then_deletes_the_old_one(ranks, s3):
    url = f"{s3.url}/run/ckpt"
    assert ranks.run(_save, url, env_of(s3), "sync", 1) == [None, None]
    (old,) = generation_keys(s3, "run/ckpt")
    s3.server.set_faults({"op": "UploadPart", "key": "checkpoint_1.pt", "action": "error", "status": 403,
                          "code": "AccessDenied"})
    assert ranks.run(_save, url, env_of(s3), "sync", 2)[1] is not None  # leaves rank 0's object behind
    s3.server.set_faults()
    assert len(generation_keys(s3, "run/ckpt")) == 2
    s3.server.clear_log()
    assert ranks.run(_save, url, env_of(s3), "async", 3) == [None, None]
    (new,) = generation_keys(s3, "run/ckpt")  # the old generation and the failed one's leftover are gone
    assert new != old and sorted(generation_keys(s3, "run/ckpt")[new]) == ["checkpoint_0.pt", "checkpoint_1.pt"]
    ops = [(o["op"], o["key"]) for o in s3.server.ops()]
    put = ops.index(("PutObject", f"run/ckpt/{MANIFEST_NAME}"))
    deletes = [i for i, (op, key) in enumerate(ops) if op == "DeleteObject"]
    assert deletes and min(deletes) > put  # old objects are deleted only once the new manifest is in place
    assert ranks.run(_load, url, env_of(s3), 3) == [True, True]


def test_removal_deletes_the_manifest_first_and_a_checkpoint_without_one_is_incomplete(ranks, s3):
    url, older = f"{s3.url}/run/step=2.ckpt", f"{s3.url}/run/step=1.ckpt"
    assert ranks.run(_save, older, env_of(s3), "sync", 1) == [None, None]
    assert ranks.run(_save, url, env_of(s3), "sync", 2) == [None, None]
    assert latest.find_latest_checkpoint(f"{s3.url}/run") == url
    s3.client.delete_object(Bucket=s3.name, Key=f"run/step=2.ckpt/{MANIFEST_NAME}")  # as if rank 0 died before it
    with pytest.raises(IncompleteCheckpointError, match="MANIFEST.json"):
        CheckpointReader(RankInfo(1, 2)).read(url)
    assert latest.find_latest_checkpoint(f"{s3.url}/run") == older  # skipped
    s3.server.clear_log()
    remote_dirs.remove_checkpoint(older)
    deletes = [o["key"] for o in s3.server.ops("DeleteObject")]
    assert deletes[0].endswith(f"run/step=1.ckpt/{MANIFEST_NAME}") and len(deletes) == 3
    assert not [k for k in s3.keys() if k.startswith("run/step=1.ckpt/")]
    with pytest.raises(FileNotFoundError, match="step=1.ckpt"):
        CheckpointReader(RankInfo(0, 2)).read(older)


def test_the_next_save_of_a_directory_aborts_the_uploads_its_killed_ranks_left(s3):
    import lightning_ckpt as lc

    url = f"{s3.url}/run/ckpt"
    for key in ("run/ckpt/gen-0123456789abcdef/checkpoint_1.pt", "run/ckpt/other/x.pt", "run/elsewhere.pt"):
        s3.client.create_multipart_upload(Bucket=s3.name, Key=key)  # a killed rank's, and two not ours
    timeout = 5.0  # uploads older than the write timeout are dead: their writers were killed by then
    wait_for(lambda: all(time.time() - u["Initiated"].timestamp() > timeout for u in s3.uploads()), 30,
             "the uploads to age")
    with lc.make_sync_checkpointer(lc.CheckpointerConfig()) as ck:
        ck.save(url, {"w": torch.zeros(4)}, after_commit=RemoteUpload(paths.resolve(url), RemoteConfig(), timeout))
    assert sorted(u["Key"] for u in s3.uploads()) == ["run/ckpt/other/x.pt", "run/elsewhere.pt"]


def test_a_damaged_rank_object_is_a_corrupt_checkpoint_error_naming_the_object(s3):
    import lightning_ckpt as lc
    from lightning_ckpt.errors import CorruptCheckpointError

    url = f"{s3.url}/run/ckpt"
    with lc.make_sync_checkpointer(lc.CheckpointerConfig()) as ck:
        ck.save(url, {"w": torch.randn(1 << 16)})
    (key,) = [k for k in s3.keys() if k.endswith("checkpoint_0.pt")]
    data = bytearray(s3.get(key))
    data[len(data) // 2] ^= 0xFF  # inside the tensor data
    s3.client.put_object(Bucket=s3.name, Key=key, Body=bytes(data))
    with pytest.raises(CorruptCheckpointError, match=key):
        CheckpointReader().read(url)
    s3.client.put_object(Bucket=s3.name, Key=key, Body=bytes(data[:-10]))  # not the size the manifest names
    with pytest.raises(CorruptCheckpointError, match="manifest says"):
        CheckpointReader().read(url)
    assert not latest.is_complete(url)
