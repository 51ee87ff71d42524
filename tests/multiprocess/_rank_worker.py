"""One rank of a multi-rank save: ``python -m tests.multiprocess._rank_worker --rank R ...`` (run by the tests)."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import lightning_ckpt as lc
from tests._helpers import GateHook, assert_equal_state


def rank_state(rank: int) -> dict:
    g = torch.Generator().manual_seed(rank)
    return {"model": {"w": torch.randn(64, 64, generator=g), "rank": torch.tensor(rank)}, "step": 5, "rank": rank}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--init-port", type=int, required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--mode", choices=["sync", "async"], required=True)
    p.add_argument("--gate-dir", default=None)
    p.add_argument("--gate-rank", type=int, default=1)
    args = p.parse_args()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.init_port}", rank=args.rank,
                            world_size=args.world, timeout=timedelta(seconds=60))
    try:
        hook = None
        if args.gate_dir:
            hook = GateHook(f"{args.gate_dir}/entered", f"{args.gate_dir}/release", only_rank=args.gate_rank)
        config = lc.CheckpointerConfig()
        make = lc.make_sync_checkpointer if args.mode == "sync" else lc.make_async_checkpointer
        ck = make(config, commit_hook=hook)  # rank info and barrier come from torch.distributed
        try:
            sd = rank_state(args.rank)
            out = ck.save(args.path, sd)
            if isinstance(out, tuple):
                out[1].result(timeout=120)
            dist.barrier()
            assert_equal_state(ck.load(args.path), sd)  # each rank reads back its own part
        finally:
            ck.close()
    finally:
        dist.destroy_process_group()
    print(f"rank {args.rank} ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
