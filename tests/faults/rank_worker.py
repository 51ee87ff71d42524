"""One rank of a two-rank save whose peer fails at the barrier; run by the barrier fault tests.

``python -m tests.faults.rank_worker RANK PORT DIR SCENARIO TIMEOUT_SECS OUT_PREFIX``

Scenarios (rank 1 misbehaves; each rank that saves writes what its save raised to OUT_PREFIX.<rank>):
  tcp_die / dist_die: rank 1 exits before its save reaches the barrier;
  tcp_fail: rank 1's write fails in pre_commit (its peers must fail fast, not wait);
  dist_stall: rank 1 stalls before the barrier for longer than the barrier timeout.
``tcp_*`` use the async checkpointer (TCPStoreBarrier in the writer), ``dist_*`` the sync one (DistBarrier, gloo).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import torch

import lightning_ckpt as lc
from tests.faults._faults import RankFailHook

WORLD = 2


def main() -> None:
    rank, port, directory, scenario = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    timeout_secs, out = float(sys.argv[5]), f"{sys.argv[6]}.{rank}"
    info = lc.RankInfo(rank, WORLD)
    state = {"w": torch.full((1000,), float(rank)), "step": 1}
    if scenario.startswith("dist"):
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=120))  # far longer than the barrier's own timeout
        config = lc.CheckpointerConfig(barrier_config=lc.BarrierConfig("dist", {"timeout_secs": timeout_secs}))
        ck = lc.make_sync_checkpointer(config, info)
    else:
        barrier = lc.BarrierConfig("tcp_store", {"master_port": port, "master_addr": "127.0.0.1",
                                                 "timeout_secs": timeout_secs})
        ck = lc.make_async_checkpointer(lc.CheckpointerConfig(barrier_config=barrier), info,
                                        commit_hook=RankFailHook(1) if scenario == "tcp_fail" else None)
    if rank == 1 and scenario.endswith("_die"):
        os._exit(3)  # dies before the barrier, without any cleanup
    if rank == 1 and scenario == "dist_stall":
        time.sleep(timeout_secs + 30)  # the stall is the fault; the test kills this rank once rank 0 reported
    start = time.monotonic()
    outcome: dict = {"rank": rank}
    try:
        out_future = ck.save(os.path.join(directory, "ckpt"), state)
        if isinstance(out_future, tuple):
            out_future[1].result(timeout=600)
        outcome["error_type"] = None
    except Exception as e:  # noqa: BLE001 - reported to the test
        outcome.update(error_type=type(e).__name__, message=str(e))
    outcome["elapsed"] = time.monotonic() - start
    with open(out + ".tmp", "w") as f:
        json.dump(outcome, f)
    os.replace(out + ".tmp", out)
    try:
        ck.close()
    except Exception:  # noqa: BLE001 - already reported through the save
        pass
    if scenario.startswith("dist"):
        os._exit(0)  # the process group has a dead or stalled peer: do not wait for it at exit


if __name__ == "__main__":
    main()
