"""AsyncCheckpointCallback in real Trainer runs: snapshots, cadence, keep-last-k, resume, errors, metrics."""

from __future__ import annotations

import csv
import logging
import os
import time

import pytest
import torch
from lightning.pytorch import Callback

from lightning_ckpt.errors import CheckpointWriteError
from lightning_ckpt.lightning import AsyncCheckpointCallback, AsyncCheckpointIO
from lightning_ckpt.lightning.resume import is_complete
from lightning_ckpt.lightning.snapshot_window import SnapshotWindow
from lightning_ckpt.staging import DefaultStager
from tests.lightning import helpers
from tests.lightning.helpers import FailCommitHook, TinyModel

pytestmark = pytest.mark.lightning


def _slow_copies(monkeypatch, delay_secs=0.15):
    """Delay every staging copy so the next training step runs while the copy is still pending."""
    original = DefaultStager._copy

    def slow(self, *args, **kwargs):
        time.sleep(delay_secs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DefaultStager, "_copy", slow)


def _snapshot_mismatches(model, directory):
    bad = []
    for step, expected in model.snapshots.items():
        saved = torch.load(os.path.join(directory, f"step={step}.ckpt"), weights_only=False)
        for part in ("state_dict", "optimizer_states"):
            try:
                helpers.assert_trees_equal(saved[part], expected[part], f"step {step} {part}")
            except AssertionError as e:
                bad.append(str(e))
    return bad


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sabotage, overlap", [(None, True), (None, False), ("no_wait", True),
                                               ("no_buffer_clone", True)])
def test_mutate_after_save_does_not_leak(sabotage, overlap, tmp_path, monkeypatch):
    """Parameters, BatchNorm buffers and Adam state changed right after a save are not in it (copies are slowed
    so they overlap the next step). The sabotaged runs prove the test catches a missing safe point."""
    _slow_copies(monkeypatch)
    if sabotage == "no_wait":
        monkeypatch.setattr(AsyncCheckpointCallback, "on_before_optimizer_step", lambda *a: None)
    if sabotage == "no_buffer_clone":
        monkeypatch.setattr(SnapshotWindow, "prepare", lambda self, ckpt: ckpt)
    model = TinyModel()
    model.record_snapshots = True
    cb = AsyncCheckpointCallback(dirpath=str(tmp_path / "ck"), every_n_train_steps=1, save_on_train_end=False,
                                 overlap_staging=overlap)
    helpers.trainer(tmp_path, max_steps=3, plugins=[AsyncCheckpointIO()], callbacks=[cb]).fit(model, helpers.loader())
    assert sorted(model.snapshots) == [1, 2, 3]
    bad = _snapshot_mismatches(model, tmp_path / "ck")
    if sabotage is None:
        assert bad == []
    elif sabotage == "no_wait":
        assert any("net.0.weight" in b or "optimizer" in b for b in bad), bad
    else:
        assert any("running_mean" in b for b in bad), bad


@pytest.mark.timeout(90)
def test_cadence_keep_last_k_and_resume_from_latest(tmp_path):
    """every_n_train_steps + keep_last_k; find_latest skips temp names and torn files; resume equals a straight run."""
    with pytest.raises(ValueError, match="keep_last_k"):
        AsyncCheckpointCallback(keep_last_k=0)
    ck = tmp_path / "ck"
    torch.manual_seed(0)
    straight = TinyModel()
    data = helpers.loader(n=8)  # one batch per epoch: resuming mid-epoch sees the same data as a straight run
    helpers.trainer(tmp_path / "a", max_steps=6, plugins=[AsyncCheckpointIO()]).fit(straight, data)

    torch.manual_seed(0)
    first = TinyModel()
    cb = AsyncCheckpointCallback(dirpath=str(ck), every_n_train_steps=2, keep_last_k=2)
    helpers.trainer(tmp_path / "b", max_steps=5, plugins=[AsyncCheckpointIO()], callbacks=[cb]).fit(first, data)
    assert helpers.final_files(ck) == ["step=4.ckpt", "step=5.ckpt"]  # 2 pruned, 5 saved at train end
    (ck / "step=9.ckpt").write_bytes(b"torn")  # not a complete checkpoint
    (ck / ".step=10.ckpt.lckpt-tmp.host.1.abc").write_bytes(b"temp")
    latest = AsyncCheckpointCallback.find_latest(str(ck))
    assert latest == str(ck / "step=5.ckpt")
    os.remove(ck / "step=9.ckpt")
    os.remove(ck / ".step=10.ckpt.lckpt-tmp.host.1.abc")

    resumed = TinyModel()
    cb2 = AsyncCheckpointCallback(dirpath=str(ck), every_n_train_steps=2, keep_last_k=2)
    t = helpers.trainer(tmp_path / "b", max_steps=6, plugins=[AsyncCheckpointIO()], callbacks=[cb2])
    t.fit(resumed, data, ckpt_path=latest)
    helpers.assert_trees_equal(resumed.state_dict(), straight.state_dict())
    helpers.assert_trees_equal(t.optimizers[0].state_dict(), straight.trainer.optimizers[0].state_dict())
    assert helpers.final_files(ck) == ["step=5.ckpt", "step=6.ckpt"]


def test_plugin_absent_uses_sync_writer_and_warns_once(tmp_path):
    cb = AsyncCheckpointCallback(dirpath=str(tmp_path / "ck"), every_n_train_steps=1)
    with pytest.warns(UserWarning, match="written synchronously") as record:
        helpers.trainer(tmp_path, max_steps=2, callbacks=[cb]).fit(TinyModel(), helpers.loader())
    assert sum("written synchronously" in str(w.message) for w in record) == 1
    assert helpers.final_files(tmp_path / "ck") == ["step=1.ckpt", "step=2.ckpt"]
    assert all(is_complete(str(tmp_path / "ck" / n)) for n in helpers.final_files(tmp_path / "ck"))
    assert len(cb.saves) == 2


@pytest.mark.timeout(60)
def test_write_failure_fails_fit_at_the_next_step_and_keeps_older(tmp_path):
    cb = AsyncCheckpointCallback(dirpath=str(tmp_path / "ck"), every_n_train_steps=1, keep_last_k=1)
    trainer = helpers.trainer(tmp_path, max_steps=50, plugins=[AsyncCheckpointIO(commit_hook=FailCommitHook("step=2"))],
                              callbacks=[cb])
    with pytest.raises(CheckpointWriteError, match="injected write failure"):
        trainer.fit(TinyModel(), helpers.loader(n=512))
    assert trainer.global_step <= 4  # every save waits for the previous write, so step 4 at the latest
    files = helpers.final_files(tmp_path / "ck")
    assert "step=1.ckpt" in files and "step=2.ckpt" not in files  # the replacement failed: the older one stays
    assert helpers.temp_files(tmp_path) == []


@pytest.mark.timeout(60)
def test_warn_policy_keeps_training_and_logs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightning_ckpt.lightning")
    plugin = AsyncCheckpointIO(commit_hook=FailCommitHook("step=2"), error_policy="warn")
    cb = AsyncCheckpointCallback(dirpath=str(tmp_path / "ck"), every_n_train_steps=1)
    trainer = helpers.trainer(tmp_path, max_steps=4, plugins=[plugin], callbacks=[cb])
    trainer.fit(TinyModel(), helpers.loader())
    assert trainer.global_step == 4
    assert "injected write failure" in caplog.text
    assert helpers.final_files(tmp_path / "ck") == ["step=1.ckpt", "step=3.ckpt", "step=4.ckpt"]


@pytest.mark.timeout(60)
def test_metrics_reach_logging_and_the_trainer_logger(tmp_path, caplog):
    from lightning.pytorch.loggers import CSVLogger

    caplog.set_level(logging.INFO, logger="lightning_ckpt.lightning")
    cb = AsyncCheckpointCallback(dirpath=str(tmp_path / "ck"), every_n_train_steps=2)
    logger = CSVLogger(str(tmp_path / "logs"), name="run")
    helpers.trainer(tmp_path, max_steps=4, plugins=[AsyncCheckpointIO()], callbacks=[cb], logger=logger).fit(
        TinyModel(), helpers.loader())
    assert [s.step for s in cb.saves] == [2, 4] and cb.total_stall_secs >= 0
    assert caplog.text.count("committed") >= 2
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("ckpt/stall_ms")]
    assert sorted(int(float(r["ckpt/step"])) for r in rows) == [2, 4]
    assert all(int(r["step"]) >= int(float(r["ckpt/step"])) for r in rows)  # never logged at a step gone by
    assert all(float(r["ckpt/bytes"]) > 0 and float(r["ckpt/write_secs"]) > 0 for r in rows)


class _Boom(TinyModel):
    exc: BaseException = RuntimeError("boom")

    def training_step(self, batch, batch_idx):
        if self.global_step == 3:
            raise self.exc
        return super().training_step(batch, batch_idx)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_with_saves_in_flight_leaves_nothing_torn(exc, tmp_path):
    cb = AsyncCheckpointCallback(dirpath=str(tmp_path / "ck"), every_n_train_steps=1)
    plugin = AsyncCheckpointIO(commit_hook=helpers.DelayCommitHook(0.1))
    trainer = helpers.trainer(tmp_path, max_steps=10, plugins=[plugin], callbacks=[cb])
    with pytest.raises(SystemExit if isinstance(exc, KeyboardInterrupt) else RuntimeError):
        model = _Boom()
        model.exc = exc
        trainer.fit(model, helpers.loader())
    files = helpers.final_files(tmp_path / "ck")
    assert files == ["step=1.ckpt", "step=2.ckpt", "step=3.ckpt"]  # pending writes were drained by teardown
    assert helpers.temp_files(tmp_path) == []
    for name in files:
        assert is_complete(str(tmp_path / "ck" / name), verify=True)
        assert TinyModel.load_from_checkpoint(tmp_path / "ck" / name) is not None


@pytest.mark.timeout(90)
def test_the_staging_buffer_is_prepared_at_fit_start_and_the_first_save_reuses_it(tmp_path):
    """At fit start (Adam's state not created yet) the plugin prepares a buffer sized for parameters plus Adam's
    two moments, before the sanity check; the first save allocates nothing more."""
    plugin = AsyncCheckpointIO()
    seen = {}

    class Watch(Callback):
        def on_fit_start(self, trainer, pl_module):
            seen["at_fit_start"] = plugin.staging_prepared is not None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:  # before the first save
                seen["prepared"] = plugin.staging_prepared.result(timeout=30)
            seen.setdefault("allocations", []).append(plugin._checkpointer.stager.allocations)

    cb = AsyncCheckpointCallback(dirpath=str(tmp_path / "ck"), every_n_train_steps=1, save_on_train_end=False)
    trainer = helpers.trainer(tmp_path, max_steps=3, callbacks=[cb, Watch()], plugins=[plugin])
    trainer.fit(TinyModel(width=256), helpers.loader())
    assert seen == {"at_fit_start": True, "prepared": True, "allocations": [1, 1, 1]}  # 1, 2 start after saves
    assert [s.step for s in cb.saves] == [1, 2, 3]
    assert plugin.staging_prepared.result() is True


@pytest.mark.timeout(120)
def test_a_resumed_fit_prepares_staging_after_the_restored_checkpoint_is_freed(tmp_path):
    """While a resume holds the loaded checkpoint (fit start to train start), no staging buffer is added to that
    peak: it is prepared at train start, and the first save after the resume still allocates nothing more."""
    first = AsyncCheckpointCallback(dirpath=str(tmp_path / "ck"), every_n_train_steps=2, save_on_train_end=False)
    helpers.trainer(tmp_path, max_steps=2, callbacks=[first], plugins=[AsyncCheckpointIO()]).fit(
        TinyModel(width=256), helpers.loader())  # the trainer's teardown drains and closes the plugin
    saved = str(tmp_path / "ck" / sorted(os.listdir(tmp_path / "ck"))[0])
    plugin = AsyncCheckpointIO()
    seen = {}

    class Watch(Callback):
        def on_fit_start(self, trainer, pl_module):
            seen["at_fit_start"] = plugin.staging_prepared

        def on_train_start(self, trainer, pl_module):
            seen["prepared"] = plugin.staging_prepared.result(timeout=30)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.setdefault("allocations", []).append(plugin._checkpointer.stager.allocations)

    cb = AsyncCheckpointCallback(dirpath=str(tmp_path / "ck2"), every_n_train_steps=1, save_on_train_end=False)
    trainer = helpers.trainer(tmp_path, max_steps=4, callbacks=[cb, Watch()], plugins=[plugin])
    trainer.fit(TinyModel(width=256), helpers.loader(), ckpt_path=saved)
    assert seen == {"at_fit_start": None, "prepared": True, "allocations": [1, 1]}
    assert [s.step for s in cb.saves] == [3, 4]
