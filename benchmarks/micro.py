"""Micro benchmark: save/load one synthetic Lightning-like checkpoint with each checkpointer (one row per process).

Each row runs in a fresh process (``python -m benchmarks.micro --row NAME ...``, started by ``benchmarks.run``) so that
memory, threads, writer processes and process groups of one row do not leak into the next. A row is an *adapter*:

* ``start(path, state)`` returns when the training loop could continue (the **stall**);
* ``finish(handle)`` waits until the save is complete as that implementation defines it (**done**, as measured);
* afterwards the harness ``fsync``s every produced file, so **durable** (save call -> data fsynced) is comparable across
  rows whether or not the implementation fsyncs itself (an fsync of already-clean pages costs next to nothing);
* ``load(path, state)`` reads the checkpoint back (page cache dropped first: a cold load).

Protocol per row: one warm-up save, ``reps`` timed saves (each finished before the next), optionally ``consecutive``
back-to-back saves that record the peak extra host memory after each save, then ``reps`` cold loads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from typing import Any, Callable

import torch

from benchmarks.common import (
    GiB,
    MiB,
    PathSeq,
    Sync,
    artifacts,
    count_tensors,
    drop_cache,
    fsync_paths,
    make_state,
    new_row,
    same_tensors,
    summarize,
    tensor_bytes,
)
from benchmarks.memory import MemorySampler, available


class Adapter:
    """One checkpointer under test. Subclasses override the hooks; ``skip_reason`` says why a row cannot run here."""

    name = "adapter"
    kind = "anchor"
    label = ""
    fsyncs_itself: bool | None = None
    suffix = ".ckpt"
    #: whether ``finish`` of one handle drains all pending saves (then consecutive mode calls it once, at the end)
    drains_all = False

    def __init__(self, device: str, scratch: str) -> None:
        self.device = device
        self.scratch = scratch
        self.notes: list[str] = []

    @classmethod
    def skip_reason(cls, device: str) -> str | None:
        """A reason to skip this row on this machine, or None."""
        return None

    def open(self) -> None:
        """One-time setup, before the warm-up save (not timed)."""

    def start(self, path: str, state: dict[str, Any]) -> Any:
        """Begin a save; return once the caller may mutate ``state`` again. Returns a handle for ``finish``."""
        raise NotImplementedError

    def finish(self, handle: Any) -> None:
        """Wait until the save behind ``handle`` is complete."""

    def load(self, path: str, state: dict[str, Any]) -> Any:
        """Load the checkpoint at ``path`` (``state`` is the saved structure, for loaders that need a template)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release everything (threads, processes, process groups)."""


# ----------------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------------


def one_save(adapter: Adapter, path: str, state: dict[str, Any], sync: Sync) -> dict[str, float]:
    """One save: stall, done (as measured) and durable (after the harness fsyncs the produced files), in seconds."""
    t0 = time.perf_counter()
    handle = adapter.start(path, state)
    sync()
    t_stall = time.perf_counter() - t0
    adapter.finish(handle)
    t_done = time.perf_counter() - t0
    fsync_paths(artifacts(path))
    t_durable = time.perf_counter() - t0
    return {"stall": t_stall, "done": t_done, "durable": t_durable}


class _Mem:
    """Extra host memory relative to a baseline taken before the row (no-op without a sampler)."""

    def __init__(self, sampler: MemorySampler | None) -> None:
        self.sampler = sampler
        self.base = sampler.baseline() if sampler else None
        if sampler:
            sampler.window()

    def window(self) -> tuple[float | None, float | None]:
        """``(extra_host_mib, extra_rss_mib)`` peaks since the previous call."""
        if self.sampler is None or self.base is None:
            return None, None
        peak = self.sampler.window()
        return (peak.host - self.base.host) / MiB, (peak.rss - self.base.rss) / MiB


def _gpu_peak_reset(device: str) -> int:
    """Reset the CUDA peak counter; returns bytes allocated now (0 on CPU)."""
    if not device.startswith("cuda"):
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def measure(
    adapter: Adapter,
    state: dict[str, Any],
    reps: int,
    consecutive: int,
    sampler: MemorySampler | None,
) -> dict[str, Any]:
    """Run the full protocol for one adapter and return its row."""
    row = new_row(adapter.name, adapter.kind, adapter.label, fsyncs_itself=adapter.fsyncs_itself)
    sync = Sync(adapter.device)
    mem = _Mem(sampler)
    gpu0 = _gpu_peak_reset(adapter.device)
    adapter.open()
    paths = PathSeq(adapter.scratch, suffix=adapter.suffix, keep=2)

    warm = one_save(adapter, paths.next(adapter.name), state, sync)
    host, rss = mem.window()
    row["warmup"] = {"stall_s": warm["stall"], "done_s": warm["done"], "durable_s": warm["durable"],
                     "extra_host_mib": host, "extra_rss_mib": rss}
    saves = []
    for _ in range(reps):
        saves.append(one_save(adapter, paths.next(adapter.name), state, sync))
        host, rss = mem.window()
        row["per_save_extra_host_mib"].append(host)
        row["per_save_extra_rss_mib"].append(rss)
    for key in ("stall", "done", "durable"):
        row[f"{key}_s"] = summarize(s[key] for s in saves)
    if consecutive:
        row["consecutive"] = measure_consecutive(adapter, state, consecutive, mem, sync)

    last = paths._made[-1]
    loads, ok = [], None
    for _ in range(reps):
        drop_cache(artifacts(last))
        t0 = time.perf_counter()
        out = adapter.load(last, state)
        loads.append(time.perf_counter() - t0)
        if ok is None:
            ok = same_tensors(out, state)
        del out
    row["load_s"] = summarize(loads)
    row["load_verified"] = ok
    adapter.close()
    if adapter.device.startswith("cuda"):
        row["extra_gpu_mib"] = (torch.cuda.max_memory_allocated() - gpu0) / MiB
    hosts = [h for h in row["per_save_extra_host_mib"] if h is not None]
    rsss = [r for r in row["per_save_extra_rss_mib"] if r is not None]
    row["extra_host_mib"] = max(hosts) if hosts else None
    row["extra_rss_mib"] = max(rsss) if rsss else None
    row["notes"] += adapter.notes
    paths.keep = 0
    paths.next("cleanup")  # deletes this row's remaining checkpoints
    return row


def measure_consecutive(
    adapter: Adapter, state: dict[str, Any], n: int, mem: _Mem, sync: Sync
) -> dict[str, Any]:
    """``n`` back-to-back saves (each started right after the previous one's stall ends); peak extra memory per save.

    Entry ``i`` of ``extra_host_mib`` is the peak between the end of save ``i-1``'s stall and the end of save ``i``'s
    stall; the last entry also covers draining all saves.
    """
    paths = PathSeq(adapter.scratch, suffix=adapter.suffix, keep=n + 2)
    stalls, hosts, rsss, handles = [], [], [], []
    mem.window()
    t_all = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        handles.append(adapter.start(paths.next(f"{adapter.name}-c"), state))
        sync()
        stalls.append(time.perf_counter() - t0)
        h, r = mem.window()
        hosts.append(h)
        rsss.append(r)
    for h in handles[-1:] if adapter.drains_all else handles:
        adapter.finish(h)
    total = time.perf_counter() - t_all
    h, r = mem.window()
    if h is not None:
        hosts[-1] = max(hosts[-1], h)
        rsss[-1] = max(rsss[-1], r)
    for p in list(paths._made):
        fsync_paths(artifacts(p))
    paths.keep = 0
    paths.next("cleanup")
    return {"n": n, "stall_s": stalls, "extra_host_mib": hosts, "extra_rss_mib": rsss, "total_s": total}


# ----------------------------------------------------------------------------------------------------------------------
# Row registry and process entry point
# ----------------------------------------------------------------------------------------------------------------------


def row_registry() -> dict[str, Callable[..., Adapter]]:
    """All checkpointer rows by name, in table order (ours first, then anchors). Floors are the separate row ``floors``."""
    from benchmarks import anchors, ours

    return {**ours.ADAPTERS, **anchors.ADAPTERS}


ROW_NAMES = ["floors", "ours.sync", "ours.async", "ours.plugin_sync", "ours.plugin_async",
             "anchor.torch_io", "anchor.lightning_async", "anchor.dcp_async_process"]


def run_row(name: str, size_gib: float, reps: int, device: str, scratch: str, consecutive: int) -> list[dict[str, Any]]:
    """Build the state, run one registry row (or the floors) and return its result rows (errors become rows too)."""
    from benchmarks.floors import run_floors

    torch.manual_seed(0)
    state = make_state(int(size_gib * GiB), device=device)
    sampler = MemorySampler().start() if available() else None
    try:
        if name == "floors":
            return run_floors(state, scratch, reps, device, sampler)
        cls = row_registry()[name]
        reason = cls.skip_reason(device)
        if reason:
            return [dict(new_row(name, cls.kind, cls.label), skipped=reason)]
        adapter = cls(device, scratch)
        try:
            return [measure(adapter, state, reps, consecutive, sampler)]
        except Exception:
            row = new_row(name, cls.kind, cls.label, error=traceback.format_exc(limit=8))
            try:
                adapter.close()
            except Exception:
                pass
            return [row]
    finally:
        if sampler:
            sampler.stop()


def state_info(size_gib: float) -> dict[str, Any]:
    """Tensor bytes and count of the synthetic state for ``size_gib`` (built on the meta device: no memory)."""
    state = make_state(int(size_gib * GiB), device="meta")
    return {"bytes": tensor_bytes(state), "tensors": count_tensors(state)}


def main(argv: list[str] | None = None) -> int:
    """Process entry point for one row; writes the rows as JSON to ``--json``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", required=True, choices=ROW_NAMES)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scratch", required=True)
    ap.add_argument("--consecutive", type=int, default=0)
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    rows = run_row(a.row, a.size_gib, a.reps, a.device, a.scratch, a.consecutive)
    with open(a.json, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    # Re-enter through the package module so that adapters (which import ``benchmarks.micro``) share one copy of it.
    from benchmarks.micro import main as _main

    sys.exit(_main())
