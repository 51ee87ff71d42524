"""gs:// checkpoints against a local GCS emulator: a Lightning round trip, nothing published on failure, corruption."""

from __future__ import annotations

import io
import os
import uuid
from dataclasses import dataclass

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.lightning import AsyncCheckpointIO, SyncCheckpointIO
from lightning_ckpt.remote import RemoteConfig
from tests.lightning.helpers import TinyModel, loader, trainer
from tests.remote import gcs_server
from tests.remote.test_remote_paths import PART, checkpoint

pytestmark = [pytest.mark.remote]


@pytest.fixture(scope="session")
def gcs_emulator():
    reason = gcs_server.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    try:
        server = gcs_server.start_server()
    except (OSError, RuntimeError) as e:
        pytest.skip(f"the GCS emulator cannot run here: {e}")
    yield server
    gcs_server.stop_server(server)


@dataclass
class GCSBucket:
    server: gcs_server.GCSServer
    name: str

    @property
    def url(self) -> str:
        return f"gs://{self.name}"

    def keys(self) -> list[str]:
        return self.server.keys(self.name)

    def get(self, key: str) -> bytes:
        return self.server.get(self.name, key)


@pytest.fixture
def gcs(gcs_emulator, monkeypatch, tmp_path):
    """A fresh bucket; the emulator's endpoint in ``STORAGE_EMULATOR_HOST`` (for us, Lightning's own gcsfs calls
    and the writer process), no user credentials, the local cache under ``tmp_path``."""
    for name, value in gcs_server.TEST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.endpoint)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # an empty gcloud config: anonymous
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE_DIR", str(tmp_path / "cache"))
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    gcs_emulator.create_bucket(bucket)
    return GCSBucket(gcs_emulator, bucket)


@pytest.mark.lightning
@pytest.mark.timeout(180)
def test_model_checkpoint_on_gs_keeps_top2_and_last_and_resumes_identical(gcs, empty_cwd, tmp_path,
                                                                          installed_entry_points):
    mc = ModelCheckpoint(dirpath=f"{gcs.url}/run", monitor="step", mode="max", save_top_k=2, save_last=True,
                         every_n_train_steps=1)
    plugin = AsyncCheckpointIO()
    model = TinyModel()
    fit = trainer(tmp_path / "root", max_steps=4, callbacks=[mc], plugins=[plugin], enable_checkpointing=True)
    fit.fit(model, loader())

    names = {os.path.basename(p) for p in mc.best_k_models}
    assert len(names) == 2 and gcs.keys() == sorted(f"run/{n}" for n in names | {"last.ckpt"})
    last = plugin.load_checkpoint(f"{gcs.url}/run/last.ckpt")
    assert last["global_step"] == 4
    for name, value in model.state_dict().items():
        assert torch.equal(last["state_dict"][name], value), name
    plain = torch.load(io.BytesIO(gcs.get("run/last.ckpt")), weights_only=False)  # an ordinary torch file
    assert plain["global_step"] == 4

    resumed = TinyModel()
    again = trainer(tmp_path / "again", max_steps=4, plugins=[AsyncCheckpointIO()], enable_checkpointing=True,
                    callbacks=[ModelCheckpoint(dirpath=f"{gcs.url}/run", save_last=True, every_n_train_steps=1)])
    again.fit(resumed, loader(), ckpt_path="last")
    assert again.ckpt_path == f"{gcs.url}/run/last.ckpt" and again.global_step == 4
    for name, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert os.listdir(empty_cwd) == []


@pytest.mark.parametrize("plugin_cls", [AsyncCheckpointIO, SyncCheckpointIO], ids=lambda c: c.__name__)
def test_plugin_round_trip_through_a_resumable_session(plugin_cls, gcs, empty_cwd, tmp_path):
    plugin = plugin_cls(remote_config=RemoteConfig(part_size_bytes=PART))
    ckpt = checkpoint(numel=3 << 20)  # 12 MiB: three chunks of one resumable session
    url = f"{gcs.url}/run/model.ckpt"
    plugin.save_checkpoint(ckpt, url)
    loaded = plugin.load_checkpoint(url)
    plugin.teardown()
    assert gcs.keys() == ["run/model.ckpt"]
    assert torch.equal(loaded["state_dict"]["w"], ckpt["state_dict"]["w"])
    assert os.listdir(empty_cwd) == []
    assert [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs] == []  # uploaded, then the local copy freed


def test_a_failure_after_the_first_chunk_publishes_nothing_and_cancels_the_session(gcs, monkeypatch):
    from lightning_ckpt import remote_gcs

    url = f"{gcs.url}/run/model.ckpt"
    plugin = SyncCheckpointIO(remote_config=RemoteConfig(part_size_bytes=PART))
    plugin.save_checkpoint(checkpoint(1), url)
    old = gcs.get("run/model.ckpt")

    real_part, real_abort, cancelled = remote_gcs.GCSStore.upload_part, remote_gcs.GCSStore.abort_upload, []

    async def failing_part(self, upload, part, body, deadline):
        if part.number == 2:
            raise KeyboardInterrupt  # a BaseException, mid-upload
        return await real_part(self, upload, part, body, deadline)

    async def recording_abort(self, upload):
        cancelled.append(upload.location)
        await real_abort(self, upload)

    monkeypatch.setattr(remote_gcs.GCSStore, "upload_part", failing_part)
    monkeypatch.setattr(remote_gcs.GCSStore, "abort_upload", recording_abort)
    with pytest.raises(KeyboardInterrupt):
        plugin.save_checkpoint(checkpoint(2), url)
    plugin.teardown()
    assert gcs.get("run/model.ckpt") == old  # the old version, bit-identical
    assert gcs.keys() == ["run/model.ckpt"]
    assert len(cancelled) == 1 and "upload_id" in cancelled[0]  # the session was cancelled


def test_a_flipped_byte_in_the_gs_object_is_a_corrupt_checkpoint_error(gcs):
    url = f"{gcs.url}/run/model.ckpt"
    plugin = AsyncCheckpointIO()
    plugin.save_checkpoint(checkpoint(1, numel=1 << 16), url)
    plugin.wait_for_saves()
    data = bytearray(gcs.get("run/model.ckpt"))
    data[len(data) // 2] ^= 0xFF  # inside the tensor data
    gcs.server.put(gcs.name, "run/model.ckpt", bytes(data))
    with pytest.raises(CorruptCheckpointError):
        plugin.load_checkpoint(url)
    plugin.teardown()
