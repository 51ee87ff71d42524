"""How large a staging buffer a Lightning checkpoint needs, known at fit start (before the first save)."""

from __future__ import annotations

from typing import Any

from lightning_ckpt.staging_plan import StagingPlan

# Tensors of each parameter's shape and dtype that an optimizer keeps per parameter once it has stepped (its state
# is created lazily at the first step, so at fit start it has to be predicted). Other optimizers: not predicted.
_MOMENTS_PER_PARAM = {"Adam": 2, "AdamW": 2, "Adamax": 2, "NAdam": 2, "RAdam": 2, "Adadelta": 2, "Adagrad": 1}
_SLACK_BYTES = 1 << 20  # callbacks', loops' and schedulers' small tensors, not predicted one by one


def _moments(optimizer: Any) -> int | None:
    name = type(optimizer).__name__
    groups = optimizer.param_groups
    if name == "SGD":
        return 1 if any(g.get("momentum", 0) for g in groups) else 0
    count = _MOMENTS_PER_PARAM.get(name)
    if count is not None and name in ("Adam", "AdamW") and any(g.get("amsgrad") for g in groups):
        count += 1  # max_exp_avg_sq
    return count


def checkpoint_staging_bytes(module: Any, optimizers: list) -> int | None:
    """The staging bytes of a checkpoint of ``module`` and ``optimizers`` after their first step.

    Optimizers that already hold state (resumed, or stepped) count as they are; those without state count the
    per-parameter tensors their kind creates (Adam: two per parameter); an optimizer of another kind makes the
    estimate None (nothing is prepared: better a slower first save than a buffer of the wrong size held for good).
    """
    stepped, extra = [], []
    for optimizer in optimizers:
        if optimizer.state:
            stepped.append(optimizer.state_dict())
            continue
        count = _moments(optimizer)
        if count is None:
            return None
        extra += [(p.dtype, p.shape) for g in optimizer.param_groups for p in g["params"] for _ in range(count)
                  if p.numel()]
    plan = StagingPlan({"state_dict": module.state_dict(), "optimizer_states": stepped}, extra)
    return plan.nbytes + plan.nbytes // 256 + _SLACK_BYTES
