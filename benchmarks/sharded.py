"""Sharded (DCP) row on 2 gloo CPU ranks: our DistributedCheckpointer (sync, async) vs dcp.save and dcp.async_save.

    python -m benchmarks.sharded --size-mib 256 --reps 3 --scratch benchmarks/results/scratch-x --json out.json

Each rank holds ``--size-mib`` of DTensor shards (dim 0 over the ranks, so every rank writes its own bytes). Every
variant runs in 2 fresh rank processes: one warm-up save and ``--reps`` timed saves to fresh paths, all ranks
starting together (a barrier):
``stall`` is the time until the call returns (the caller may change the state), ``durable`` until the save is
committed on every rank (sync rows: the same), ``extra MiB`` the peak extra host memory of the rank's process tree
during its saves (``benchmarks.memory``). Times are the slowest rank's, median (min-max) over the repetitions. Floors
in the same run: ``floor.copy`` (each rank copies its shards into a reused buffer) and ``floor.write_fsync`` (both
ranks write their bytes into one new file each and fsync, concurrently).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
import warnings
from datetime import timedelta
from typing import Any

import torch

from benchmarks.common import MiB, make_scratch, summarize

WORLD = 2
SHARD_MIB = 16  # local bytes of one DTensor shard
VARIANTS = ("floor.copy", "floor.write_fsync", "dcp.save", "ours.sync", "ours.async", "dcp.async_save",
            "dcp.async_save_process")
LABELS = {
    "floor.copy": "copy the shards into a reused buffer",
    "floor.write_fsync": "raw write + fsync of the shards' bytes",
    "dcp.save": "torch.distributed.checkpoint.save (FileSystemWriter)",
    "ours.sync": "lightning_ckpt DistributedCheckpointer.save",
    "ours.async": "lightning_ckpt DistributedCheckpointer.async_save",
    "dcp.async_save": "dcp.async_save (THREAD, the default)",
    "dcp.async_save_process": "dcp.async_save (PROCESS)",
}


# ---------------------------------------------------------------------------------------------------------------- ranks


def local_state(size_bytes: int, rank: int) -> dict[str, Any]:
    """DTensors sharded on dim 0 over all ranks, ``SHARD_MIB`` of local bytes each, totalling ``size_bytes``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (WORLD,))
    cols = 4096
    rows = SHARD_MIB * MiB // (4 * cols)
    gen = torch.Generator().manual_seed(rank)
    state: dict[str, Any] = {"step": 1000}
    for i in range(max(1, size_bytes // (SHARD_MIB * MiB))):
        local = torch.randn(rows, cols, generator=gen)
        state[f"layer{i}.weight"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    return state


class _Saver:
    """One variant: ``start(path)`` returns when the caller may mutate the state; ``finish(handle)`` when committed."""

    def __init__(self, name: str, state: dict[str, Any], scratch: str) -> None:
        self.name, self.state, self.scratch = name, state, scratch
        self._locals = [v.to_local() for v in state.values() if isinstance(v, torch.Tensor)]
        self._buffer: torch.Tensor | None = None
        self._checkpointer: Any = None
        if name.startswith("ours."):
            from lightning_ckpt.dcp import DistributedCheckpointer

            self._checkpointer = DistributedCheckpointer(os.path.join(scratch, "ours-unused"))

    def start(self, path: str) -> Any:
        import torch.distributed.checkpoint as dcp

        if self.name == "floor.copy":
            return self._copy()
        if self.name == "floor.write_fsync":
            return self._write(path)
        if self.name == "dcp.save":
            return dcp.save(self.state, checkpoint_id=path)
        if self.name == "ours.sync":
            return self._checkpointer.save(self.state, checkpoint_id=path)
        if self.name == "ours.async":
            return self._checkpointer.async_save(self.state, checkpoint_id=path)
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        kind = AsyncCheckpointerType.PROCESS if self.name.endswith("process") else AsyncCheckpointerType.THREAD
        response = dcp.async_save(self.state, checkpoint_id=path, async_checkpointer_type=kind)
        staging = getattr(response, "staging_completion", None)
        if staging is not None:
            staging.result()
        return getattr(response, "upload_completion", response)

    def finish(self, handle: Any) -> None:
        if hasattr(handle, "result"):
            handle.result(timeout=600) if self.name == "ours.async" else handle.result()

    def _copy(self) -> None:
        total = sum(t.numel() for t in self._locals)
        if self._buffer is None:
            self._buffer = torch.empty(total, dtype=torch.float32)
        offset = 0
        for t in self._locals:
            self._buffer[offset:offset + t.numel()].copy_(t.view(-1))
            offset += t.numel()

    def _write(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        import torch.distributed as dist

        fd = os.open(os.path.join(path, f"rank{dist.get_rank()}.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for t in self._locals:
                view = memoryview(t.numpy()).cast("B")
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        if self.name == "dcp.async_save_process":
            from torch.distributed.checkpoint import _async_process_executor as ape

            ape._CHECKPOINT_PROCESS = None  # its __del__ stops DCP's checkpoint process


def run_variant(name: str, state: dict[str, Any], scratch: str, reps: int) -> dict[str, Any]:
    """This rank's timings and peak memory for one variant (every rank calls)."""
    import torch.distributed as dist

    from benchmarks.memory import MemorySampler

    sampler = MemorySampler().start()
    base = sampler.baseline()
    saver = _Saver(name, state, scratch)
    stalls, durables = [], []
    try:
        for rep in range(reps + 1):  # rep 0 warms up
            path = os.path.join(scratch, f"{name}-{rep}")
            dist.barrier()
            t0 = time.perf_counter()
            handle = saver.start(path)
            stall = time.perf_counter() - t0
            saver.finish(handle)
            durable = time.perf_counter() - t0
            dist.barrier()
            if rep:
                stalls.append(stall)
                durables.append(durable)
            if dist.get_rank() == 0:
                shutil.rmtree(path, ignore_errors=True)
        peak = sampler.window()
    finally:
        saver.close()
        sampler.stop()
    return {"stall": stalls, "durable": durables, "extra_host_mib": (peak.host - base.host) / MiB,
            "extra_rss_mib": (peak.rss - base.rss) / MiB}


def rank_main(rank: int, port: int, size_bytes: int, reps: int, scratch: str, variants: list[str],
              out_path: str) -> None:
    """One rank: every variant in turn; rank 0 writes every rank's results to ``out_path``."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=600))
    try:
        state = local_state(size_bytes, rank)
        mine = {}
        for name in variants:
            try:
                mine[name] = run_variant(name, state, scratch, reps)
            except Exception as e:  # noqa: BLE001 - one variant's failure is reported in its row
                mine[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        gathered: list[Any] = [None] * WORLD
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


# -------------------------------------------------------------------------------------------------------------- results


def combine(per_rank: list[dict[str, Any]], size_bytes: int) -> list[dict[str, Any]]:
    """One row per variant: the slowest rank per repetition, the largest memory peak, and the ratios."""
    rows = []
    for name in per_rank[0]:
        outs = [r[name] for r in per_rank]
        row: dict[str, Any] = {"name": name, "label": LABELS.get(name, name), "bytes_per_rank": size_bytes}
        errors = [o["error"] for o in outs if "error" in o]
        if errors:
            row["error"] = errors[0]
        else:
            row["stall_s"] = summarize(max(v) for v in zip(*(o["stall"] for o in outs)))
            row["durable_s"] = summarize(max(v) for v in zip(*(o["durable"] for o in outs)))
            row["extra_host_mib"] = max(o["extra_host_mib"] for o in outs)
            row["extra_rss_mib"] = max(o["extra_rss_mib"] for o in outs)
        rows.append(row)
    _ratios(rows)
    return rows


def _ratios(rows: list[dict[str, Any]]) -> None:
    from benchmarks.run import TARGETS

    by = {r["name"]: r for r in rows if "error" not in r}

    def med(name: str, key: str) -> float | None:
        return by[name][key]["median"] if name in by and by[name].get(key) else None

    anchors = {"stall_vs_copy": ("floor.copy", "stall_s", TARGETS["stall_vs_copy_cpu"]),
               "durable_vs_write": ("floor.write_fsync", "durable_s", TARGETS["durable_vs_write"]),
               "stall_vs_dcp_async": ("dcp.async_save", "stall_s", None),
               "durable_vs_dcp_save": ("dcp.save", "durable_s", None)}
    for row in by.values():
        if row["name"].startswith("floor."):
            continue
        row["ratios"] = {}
        for key, (anchor, field, target) in anchors.items():
            value, base = med(row["name"], field), med(anchor, field)
            if value is not None and base:
                row["ratios"][key] = {"value": value / base, "target": target,
                                      "pass": None if target is None else value / base <= target}
        row["mem_vs_state"] = row["extra_host_mib"] * MiB / row["bytes_per_rank"]


def table(rows: list[dict[str, Any]]) -> str:
    """The sharded table: slowest-rank times as median (min-max) s, peak extra MiB per rank, ratios."""
    from benchmarks.run import NOISY, _fmt_s, _render

    header = ["row", "stall s", "durable s", "extra MiB", "rss MiB", "mem/state", "stall/copy", "dur/write",
              "stall/dcp.async", "dur/dcp.save"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["name"], "ERROR: " + r["error"][:60]] + ["-"] * 8)
            continue
        ratios = r.get("ratios", {})
        cells = []
        for key in ("stall_vs_copy", "durable_vs_write", "stall_vs_dcp_async", "durable_vs_dcp_save"):
            c = ratios.get(key)
            cells.append("-" if c is None else f"{c['value']:.2f}" + ("" if c["pass"] is None else
                                                                      " ok" if c["pass"] else " FAIL"))
        mem = r.get("mem_vs_state")
        noisy = ((r.get("machine") or {}).get("foreign_cpu") or 0) > NOISY
        body.append([r["name"] + (" *" if noisy else ""), _fmt_s(r["stall_s"]), _fmt_s(r["durable_s"]),
                     f"{r['extra_host_mib']:.0f}", f"{r['extra_rss_mib']:.0f}", "-" if mem is None else f"{mem:.2f}", *cells])
    text = _render(header, body)
    if any(((r.get("machine") or {}).get("foreign_cpu") or 0) > NOISY for r in rows):
        text += f"\n* other processes used more than {NOISY:.0%} of the CPU during these rows: treat them as noisy"
    return text


# ------------------------------------------------------------------------------------------------------------------ CLI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(size_mib: float, reps: int, scratch: str, variants: list[str], timeout_s: float) -> list[dict[str, Any]]:
    """Each variant on 2 fresh ranks (memory, threads and processes of one never leak into the next); returns the
    combined rows. ``timeout_s`` bounds each variant."""
    size_bytes = int(size_mib * MiB)
    per_rank: list[dict[str, Any]] = [{} for _ in range(WORLD)]
    for name in variants:
        try:
            outs = _run_ranks(size_bytes, reps, scratch, name, timeout_s)
        except RuntimeError as e:
            outs = [{name: {"error": str(e)}} for _ in range(WORLD)]
        for mine, out in zip(per_rank, outs):
            mine.update(out)
    return combine(per_rank, size_bytes)


def _run_ranks(size_bytes: int, reps: int, scratch: str, name: str, timeout_s: float) -> list[dict[str, Any]]:
    import multiprocessing

    from benchmarks import sharded as this  # importable by the spawned ranks, also when run as __main__

    out_path = os.path.join(scratch, f"sharded-{name}.json")
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=this.rank_main, args=(r, port, size_bytes, reps, scratch, [name], out_path))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=30)
    if not os.path.exists(out_path):
        raise RuntimeError(f"{name}: the ranks exited {[p.exitcode for p in procs]} without results")
    with open(out_path) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="sharded (DCP) save benchmark on 2 gloo CPU ranks")
    ap.add_argument("--size-mib", type=float, default=256, help="tensor bytes per rank")
    ap.add_argument("--reps", type=int, default=3, help="timed saves per variant (after one warm-up)")
    ap.add_argument("--scratch", default=None, help="where checkpoints are written (default: a new directory "
                    "under benchmarks/results)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--timeout", type=float, default=300, help="seconds before one variant's ranks are killed")
    ap.add_argument("--json", default=None, help="write the rows here")
    a = ap.parse_args(argv)
    unknown = sorted(set(a.variants.split(",")) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown}")
    own_scratch = a.scratch is None
    scratch = a.scratch or make_scratch(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    try:
        rows = run(a.size_mib, a.reps, scratch, a.variants.split(","), a.timeout)
    finally:
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"== sharded [2 gloo ranks, {a.size_mib:.0f} MiB per rank, reps {a.reps}] "
          "(times: slowest rank, median (min-max) s) ==")
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
