"""One rank re-saving one multi-rank checkpoint directory again and again (the crash trials SIGKILL it).

Run as ``python -m tests.faults.resave_worker --rank R --port P --path DIR/ck --versions N --mode sync|async
--progress FILE [--kill-version V --kill-step K] [--no-exchange]``. Version ``v`` of rank ``r`` is ``state(r, v)``;
rank 0 appends ``saving v`` before and ``committed v`` after each save returns. With ``--kill-version`` the
process that writes rank 0's part (this one, or its writer subprocess) SIGKILLs itself during that version's
commit, right after its K-th rename (K = 0: before the first), so every instant between the renames is hit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

import torch

import lightning_ckpt as lc

NUMEL = 256 << 10  # 1 MiB of float32 per rank and version


def state(rank: int, version: int) -> dict[str, Any]:
    return {"w": torch.full((NUMEL,), float(version * 10 + rank)), "version": version, "rank": rank}


def check_state(loaded: dict, rank: int) -> int:
    """The version ``loaded`` holds; raises when it is not exactly ``state(rank, version)``."""
    version = loaded["version"]
    if loaded["rank"] != rank or not torch.equal(loaded["w"], state(rank, version)["w"]):
        raise AssertionError(f"rank {rank}'s part does not hold version {version}'s bytes")
    return version


class KillAtRenameHook(lc.WriterHook):
    """In the process that commits rank 0's part of ``version``: SIGKILL it right after its ``step``-th rename.

    With ``no_exchange`` the commit falls back to two renames (a filesystem without ``RENAME_EXCHANGE``).
    """

    def __init__(self, version: int, step: int, no_exchange: bool) -> None:
        self.version, self.step, self.no_exchange = version, step, no_exchange
        self.seen = 0  # this process's pre_commit calls: the n-th is version n

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        from lightning_ckpt import commit

        if self.no_exchange:
            commit._RENAMEAT2 = None
        self.seen += 1
        if kwargs["rank_info"].global_rank == 0 and self.seen == self.version:
            _arm(commit, self.step)


def _arm(commit: Any, after: int) -> None:
    """Count the commit's renames (``os.rename`` and ``renameat2``) and SIGKILL this process after the n-th."""
    count = [0]
    real_rename, real_renameat2 = os.rename, commit._renameat2

    def tick() -> None:
        count[0] += 1
        if count[0] >= after:
            os.kill(os.getpid(), signal.SIGKILL)

    def rename(*a: Any, **kw: Any) -> None:
        if after == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(*a, **kw)
        tick()

    def renameat2(*a: Any) -> None:
        if after == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        real_renameat2(*a)
        tick()

    commit.os.rename = rename  # commit.os is the os module: only this process's commits are in flight
    commit._renameat2 = renameat2


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--versions", type=int, required=True)
    p.add_argument("--mode", choices=["sync", "async"], required=True)
    p.add_argument("--progress", required=True)
    p.add_argument("--kill-version", type=int, default=0)
    p.add_argument("--kill-step", type=int, default=0)
    p.add_argument("--no-exchange", action="store_true")
    args = p.parse_args()
    info = lc.RankInfo(args.rank, 2)
    from tests.faults import resave_worker  # the hook's class by its importable name (the writer process imports it)

    hook = resave_worker.KillAtRenameHook(args.kill_version, args.kill_step, args.no_exchange) \
        if args.kill_version or args.no_exchange else None
    barrier_args = {"tcpstore_port": args.port, "master_address": "127.0.0.1", "timeout_secs": 60}
    if args.mode == "sync":
        barrier_args["is_master"] = args.rank == 0  # async: rank 0's training process serves the store
    barrier = lc.BarrierConfig("tcp_store", barrier_args)
    config = lc.CheckpointerConfig(barrier_config=barrier)
    progress = open(args.progress, "a", buffering=1) if args.rank == 0 else None
    make = lc.make_sync_checkpointer if args.mode == "sync" else lc.make_async_checkpointer
    ck = make(config, info, commit_hook=hook)
    with ck:
        for v in range(1, args.versions + 1):
            if progress:
                progress.write(f"saving {v}\n")
            out = ck.save(args.path, state(args.rank, v), metadata={"version": v})
            if isinstance(out, tuple):
                out[1].result(timeout=120)
            if progress:
                progress.write(f"committed {v}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
