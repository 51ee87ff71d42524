"""The first async save against the later ones, with and without the staging buffer prepared ahead (a profiling aid).

    python -m benchmarks.first_save --mib 512 --saves 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch

import lightning_ckpt as lc
from lightning_ckpt.staging_plan import StagingPlan


def _stalls(state: dict, directory: str, saves: int, prepare: bool) -> dict:
    ckpt = lc.make_async_checkpointer(lc.CheckpointerConfig())
    try:
        ckpt.start()
        prepared_secs = None
        if prepare:  # what the callback does at train start, here waited for so the comparison is clean
            start = time.perf_counter()
            ckpt.prepare_staging(StagingPlan(state).nbytes).result(timeout=600)
            prepared_secs = time.perf_counter() - start
        stalls = []
        for i in range(saves):
            start = time.perf_counter()
            stage_future, write_future = ckpt.save(os.path.join(directory, f"{int(prepare)}_{i}"), state)
            stage_future.result(timeout=600)
            stalls.append(time.perf_counter() - start)
            write_future.result(timeout=600)
        return {"stalls": stalls, "first_over_later": stalls[0] / min(stalls[1:]), "prepare_secs": prepared_secs}
    finally:
        ckpt.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--saves", type=int, default=3)
    args = parser.parse_args()
    n = args.mib << 18  # fp32 elements
    state = {"w": torch.randn(n // 4, 4), "opt": {"exp_avg": torch.randn(n // 8), "exp_avg_sq": torch.rand(n // 8)}}
    directory = tempfile.mkdtemp(prefix="first_save-")
    try:
        out = {"mib": args.mib, "without": _stalls(state, directory, args.saves, False),
               "prepared": _stalls(state, directory, args.saves, True)}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
