"""Many small tensors: async stall, durable time and writer peak RSS against ``torch.save`` of the same state.

A profiling aid, not part of ``benchmarks.run``: one process, a state shaped like a large model's per-parameter
Adam state (weight, ``exp_avg``, ``exp_avg_sq`` of ~350 bytes each and a 0-dim ``step`` per parameter).

    python -m benchmarks.profile_small --tensors 100000 --reps 2
    python -m benchmarks.profile_small --tensors 100000 --reps 3 --only interleaved   # the steadiest ratio
    python -m cProfile -o stall.prof -m benchmarks.profile_small --tensors 100000 --reps 1 --only async
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

ELEMENTS = 88  # fp32: 352 bytes per tensor, so 100k tensors are ~35 MB


def small_state(n_tensors: int) -> dict:
    """A Lightning-like checkpoint of about ``n_tensors`` tensors: 3 per parameter plus a 0-dim ``step``."""
    n_params = max(1, n_tensors // 4)
    gen = torch.Generator().manual_seed(0)
    weights = {f"model.layer{i}.weight": torch.randn(ELEMENTS, generator=gen) for i in range(n_params)}
    state = {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(ELEMENTS, generator=gen),
                 "exp_avg_sq": torch.rand(ELEMENTS, generator=gen)} for i in range(n_params)}
    optimizer = {"state": state, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(n_params))}]}
    return {"state_dict": weights, "optimizer_states": [optimizer], "global_step": 10, "epoch": 0}


def _peak_rss_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_kib(pid: int | None) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, TypeError):
        return None


def time_torch_save(state: dict, directory: str, reps: int) -> list[float]:
    return [t for t, _ in (_torch_save_once(state, os.path.join(directory, f"torch_{i}.pt")) for i in range(reps))]


def _torch_save_once(state: dict, path: str) -> tuple[float, float]:
    """Wall and CPU seconds of one ``torch.save`` (CPU time is steadier on a shared machine)."""
    start, cpu = time.perf_counter(), time.process_time()
    torch.save(state, path)
    return time.perf_counter() - start, time.process_time() - cpu


def time_interleaved(state: dict, directory: str, reps: int) -> dict:
    """Our async save and ``torch.save`` alternately, so both see the same load; wall and CPU (this process:
    the training thread and the stager thread, not the writer process) seconds."""
    ckpt = lc.make_async_checkpointer(lc.CheckpointerConfig())
    out: dict = {"stall": [], "stall_cpu": [], "torch_save": [], "torch_save_cpu": []}
    try:
        ckpt.start()
        for i in range(reps + 1):  # the first save is a warm-up (allocates the staging buffer)
            start, cpu = time.perf_counter(), time.process_time()
            stage_future, write_future = ckpt.save(os.path.join(directory, f"inter_{i}"), state)
            stage_future.result()
            stall, stall_cpu = time.perf_counter() - start, time.process_time() - cpu
            write_future.result()
            if i:
                wall, cpu_secs = _torch_save_once(state, os.path.join(directory, f"inter_torch_{i}.pt"))
                out["stall"].append(stall)
                out["stall_cpu"].append(stall_cpu)
                out["torch_save"].append(wall)
                out["torch_save_cpu"].append(cpu_secs)
    finally:
        ckpt.close()
    out["stall_over_torch_save"] = [a / b for a, b in zip(out["stall"], out["torch_save"])]
    out["cpu_over_torch_save_cpu"] = [a / b for a, b in zip(out["stall_cpu"], out["torch_save_cpu"])]
    return out


def time_async(state: dict, directory: str, reps: int) -> dict:
    ckpt = lc.make_async_checkpointer(lc.CheckpointerConfig())
    try:
        ckpt.start()
        pid = ckpt.process.pid
        baseline = _rss_kib(pid)
        stalls, durables = [], []
        for i in range(reps + 1):  # the first save is a warm-up (allocates the staging buffer)
            path = os.path.join(directory, f"ours_{i}.pt")
            start = time.perf_counter()
            stage_f, write_f = ckpt.save(path, state)
            stage_f.result()
            stall = time.perf_counter() - start
            write_f.result()
            durable = time.perf_counter() - start
            if i:
                stalls.append(stall)
                durables.append(durable)
        size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)) if os.path.isdir(path) \
            else os.path.getsize(path)
        return {"stall": stalls, "durable": durables, "file_bytes": size, "writer_baseline_kib": baseline,
                "writer_peak_kib": _peak_rss_kib(pid)}
    finally:
        ckpt.close()


def time_sync(state: dict, directory: str, reps: int) -> list[float]:
    ckpt = lc.make_sync_checkpointer(lc.CheckpointerConfig())
    try:
        out = []
        for i in range(reps):
            start = time.perf_counter()
            ckpt.save(os.path.join(directory, f"sync_{i}.pt"), state)
            out.append(time.perf_counter() - start)
        return out
    finally:
        ckpt.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--only", choices=["async", "sync", "torch", "interleaved"], action="append")
    parser.add_argument("--scratch-dir", default=None)
    args = parser.parse_args()
    only = set(args.only or ["async", "sync", "torch"])
    state = small_state(args.tensors)
    count = sum(len(v) for v in (state["state_dict"], *state["optimizer_states"][0]["state"].values()))
    directory = tempfile.mkdtemp(prefix="profile_small-", dir=args.scratch_dir)
    result: dict = {"tensors": count}
    try:
        if "torch" in only:
            result["torch_save"] = time_torch_save(state, directory, args.reps)
        if "async" in only:
            result["async"] = time_async(state, directory, args.reps)
        if "sync" in only:
            result["sync"] = time_sync(state, directory, args.reps)
        if "interleaved" in only:
            result["interleaved"] = time_interleaved(state, directory, args.reps)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    stall = min(result["async"]["stall"]) if "async" in result else None
    if stall is not None:
        result["stall_per_tensor_us"] = stall / count * 1e6
    if stall is not None and "torch_save" in result:
        result["stall_over_torch_save"] = stall / min(result["torch_save"])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
