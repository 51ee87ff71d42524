"""Strategies whose saves bypass CheckpointIO are recognised (real Lightning strategy objects; none is run)."""

from __future__ import annotations

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

from lightning_ckpt.lightning.binding import bypass_reason

pytestmark = [pytest.mark.lightning]


@pytest.mark.parametrize("strategy, bypasses", [
    (lambda: FSDPStrategy(state_dict_type="sharded"), True),
    (lambda: FSDPStrategy(state_dict_type="full"), False),
    (lambda: ModelParallelStrategy(), True),
    (lambda: ModelParallelStrategy(save_distributed_checkpoint=False), False),
    (lambda: DDPStrategy(), False),
    (lambda: SingleDeviceStrategy("cpu"), False),
])
def test_bypassing_strategies_are_named(strategy, bypasses):
    reason = bypass_reason(strategy())
    assert (reason is not None) == bypasses
    if bypasses:
        assert "torch.distributed.checkpoint" in reason


def test_deepspeed_is_recognised_by_class_name_without_importing_it():
    deepspeed_like = type("DeepSpeedStrategy", (DDPStrategy,), {})
    assert "DeepSpeed" in bypass_reason(deepspeed_like())
