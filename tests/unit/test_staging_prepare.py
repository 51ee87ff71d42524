"""A staging buffer prepared ahead of the first save: allocated and faulted in off the training thread, then reused."""

from __future__ import annotations

import pytest
import torch

from lightning_ckpt.lightning.staging_size import checkpoint_staging_bytes
from lightning_ckpt.staging import CheckpointStagerConfig, DefaultStager
from lightning_ckpt.staging_plan import StagingPlan

MiB = 1 << 20


def _resident_shmem() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssShmem:"))


@pytest.mark.timeout(60)
def test_prepare_faults_the_buffer_in_and_the_first_save_reuses_it():
    stager = DefaultStager(CheckpointStagerConfig(buffer_wait_timeout_secs=30))
    try:
        before = _resident_shmem()
        assert stager.prepare(32 * MiB).result(timeout=30) is True
        assert _resident_shmem() - before >= 31 * MiB  # the pages are there before any copy touches them
        staged = stager.stage({"w": torch.ones(1024, 1024), "b": torch.ones(10)}).result(timeout=30)
        assert torch.equal(staged["w"], torch.ones(1024, 1024))
        assert stager.allocations == 1  # the first save allocated nothing
    finally:
        stager.close()


@pytest.mark.timeout(60)
def test_prepare_does_nothing_when_a_buffer_is_there_or_the_budget_refuses():
    stager = DefaultStager(CheckpointStagerConfig(buffer_wait_timeout_secs=30, budget_bytes=8 * MiB))
    try:
        assert stager.prepare(16 * MiB).result(timeout=30) is False  # over budget_bytes: the first save decides
        assert stager.allocations == 0
        assert stager.prepare(4 * MiB).result(timeout=30) is True
        assert stager.prepare(2 * MiB).result(timeout=30) is False  # a free buffer that large is there
        assert stager.allocations == 1
    finally:
        stager.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make_optimizer, extra_tensors", [
    (lambda p: torch.optim.Adam(p), 2),
    (lambda p: torch.optim.AdamW(p, amsgrad=True), 3),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 1),
    (lambda p: torch.optim.SGD(p, lr=0.1), 0),
])
def test_the_estimate_before_the_first_step_covers_the_checkpoint_after_it(make_optimizer, extra_tensors):
    module = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.LayerNorm(300), torch.nn.Linear(300, 2000))
    optimizer = make_optimizer(module.parameters())
    estimate = checkpoint_staging_bytes(module, [optimizer])
    module(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    actual = StagingPlan({"state_dict": module.state_dict(), "optimizer_states": [optimizer.state_dict()]}).nbytes
    params = sum(p.numel() * 4 for p in module.parameters())
    assert actual <= estimate <= actual * 1.01 + 2 * MiB
    assert actual >= params * (1 + extra_tensors)  # the optimizer's state is really in it
    assert checkpoint_staging_bytes(module, [optimizer]) >= actual  # stepped: counted as it is


@pytest.mark.timeout(30)
def test_an_optimizer_of_unknown_kind_prepares_nothing():
    module = torch.nn.Linear(4, 4)
    assert checkpoint_staging_bytes(module, [torch.optim.LBFGS(module.parameters())]) is None
