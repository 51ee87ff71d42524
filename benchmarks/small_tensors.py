"""Many small tensors (per-parameter optimizer state) and partial loads: one implementation and count per process.

``--impl`` is one of ``IMPLS``; each runs the micro protocol (``micro.measure``: warm-up, ``reps`` timed saves, ``reps``
cold loads) on a state of ``--count`` tensors shaped like Adam's per-parameter state (``step`` scalar, ``exp_avg`` and
``exp_avg_sq`` of 64-200 floats; about 35 MB at 100k tensors). ``ours.async`` also reports its writer process's peak RSS
(``VmHWM``) and its RSS after a one-tensor save (its baseline). ``--impl partial`` instead saves the micro state
(``--size-gib``) once and loads it cold twice: whole, and only its ``state_dict`` (the model weights), reporting the
bytes each read (from the reader's read statistics and ``/proc/self/io``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any

import torch

from benchmarks.common import (
    GiB, artifacts, drop_cache, make_state, new_row, remove_path, summarize, tensor_bytes,
)
from benchmarks.memory import MemorySampler, available
from benchmarks.micro import Adapter, measure

IMPLS = ["ours.sync", "ours.async", "anchor.torch_save", "anchor.lightning_async", "anchor.dcp_save"]


def make_small_state(count: int, seed: int = 0) -> dict[str, Any]:
    """``count`` tensors (a multiple of 3) shaped like Lightning's checkpoint of Adam state for ``count / 3`` params."""
    g = torch.Generator().manual_seed(seed)
    params = max(1, count // 3)
    sizes = torch.randint(64, 200, (params,), generator=g).tolist()
    state = {i: {"step": torch.tensor(float(i % 97)), "exp_avg": torch.randn(n, generator=g),
                 "exp_avg_sq": torch.rand(n, generator=g)} for i, n in enumerate(sizes)}
    groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "params": list(range(params))}]
    return {"epoch": 0, "global_step": 10, "optimizer_states": [{"state": state, "param_groups": groups}]}


class TorchSaveAdapter(Adapter):
    """Plain ``torch.save`` to the path, ``torch.load(weights_only=True)`` back."""

    name = "anchor.torch_save"
    label = "torch.save / torch.load"
    fsyncs_itself = False

    def start(self, path: str, state: dict[str, Any]) -> Any:
        torch.save(state, path)

    def load(self, path: str, state: dict[str, Any]) -> Any:
        return torch.load(path, weights_only=True)


def _dcp_save_adapter() -> type[Adapter]:
    from benchmarks.anchors import DCPAsyncProcessAdapter

    class DCPSaveAdapter(DCPAsyncProcessAdapter):
        """``torch.distributed.checkpoint.save`` (blocking) and ``dcp.load``, single-rank gloo group."""

        name = "anchor.dcp_save"
        label = "DCP save / load"

        def start(self, path: str, state: dict[str, Any]) -> Any:
            import torch.distributed.checkpoint as dcp

            dcp.save(state, checkpoint_id=path)

        def finish(self, handle: Any) -> None:
            pass  # dcp.save returned once written

    return DCPSaveAdapter


def _adapter(name: str) -> type[Adapter]:
    if name == TorchSaveAdapter.name:
        return TorchSaveAdapter
    if name == "anchor.dcp_save":
        return _dcp_save_adapter()
    from benchmarks.micro import row_registry

    return row_registry()[name]


def _writer_rss(adapter: Adapter) -> dict[str, float] | None:
    """Peak and current RSS (MiB) of this process's child processes (our writer), from ``/proc/<pid>/status``."""
    try:
        import psutil
    except ImportError:
        return None
    out: dict[str, float] = {"peak_mib": 0.0, "rss_mib": 0.0}
    for child in psutil.Process().children(recursive=True):
        try:
            with open(f"/proc/{child.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        out["peak_mib"] = max(out["peak_mib"], int(fields.get("VmHWM", "0 kB").split()[0]) / 1024)
        out["rss_mib"] = max(out["rss_mib"], int(fields.get("VmRSS", "0 kB").split()[0]) / 1024)
    return out


def run_impl(name: str, count: int, reps: int, scratch: str) -> dict[str, Any]:
    """The micro protocol for one implementation on ``count`` small tensors."""
    cls = _adapter(name)
    reason = cls.skip_reason("cpu")
    if reason:
        return dict(new_row(name, cls.kind, cls.label), skipped=reason, count=count)
    state = make_small_state(count)
    adapter = cls("cpu", scratch)
    extra: dict[str, Any] = {}
    if name == "ours.async":  # the writer's baseline: its RSS after a save of one tensor
        adapter.open()
        tiny = os.path.join(scratch, "tiny-ours")
        adapter.finish(adapter.start(tiny, {"x": torch.ones(1)}))
        extra["writer_base"] = _writer_rss(adapter)
        remove_path(tiny)
        adapter.open = lambda: None  # measure() calls open again: keep the checkpointer just made
        real_close = adapter.close

        def close() -> None:
            extra["writer_end"] = _writer_rss(adapter)
            real_close()

        adapter.close = close
    sampler = MemorySampler().start() if available() else None
    try:
        row = measure(adapter, state, reps, 0, sampler)
    finally:
        if sampler:
            sampler.stop()
    row.update(count=count, state_bytes=tensor_bytes(state), **extra)
    return row


def _read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (``/proc/self/io``), or None."""
    try:
        with open("/proc/self/io") as f:
            return int(dict(line.split(": ") for line in f.read().splitlines())["read_bytes"])
    except (OSError, KeyError, ValueError):
        return None


def run_partial(size_gib: float, reps: int, scratch: str) -> dict[str, Any]:
    """Full against partial (``state_dict`` only) cold loads of one checkpoint of ours."""
    import lightning_ckpt as lc

    state = make_state(int(size_gib * GiB))
    path = os.path.join(scratch, "partial-ours")
    ck = lc.make_sync_checkpointer(lc.CheckpointerConfig())
    try:
        ck.save(path, state)
        files = artifacts(path)
        result: dict[str, Any] = new_row("ours.partial_load", "ours", "partial load (state_dict only)")
        result["file_bytes"] = sum(os.path.getsize(f) for f in files)
        result["requested_bytes"] = tensor_bytes(state["state_dict"])
        for mode in ("full", "partial"):
            times, engine, disk = [], [], []
            for _ in range(reps):
                target = None if mode == "full" else {"state_dict": dict(state["state_dict"])}
                drop_cache(files)
                before, t0 = _read_bytes(), time.perf_counter()
                ck.load(path, target)
                times.append(time.perf_counter() - t0)
                after = _read_bytes()
                disk.append(after - before if before is not None and after is not None else None)
                stats = ck.reader.last_read_stats
                engine.append(stats.bytes_read if stats is not None else None)
            result[f"{mode}_load_s"] = summarize(times)
            result[f"{mode}_bytes_read"] = engine[-1]
            result[f"{mode}_disk_read_bytes"] = disk[-1]
        return result
    finally:
        ck.close()
        remove_path(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", required=True, choices=[*IMPLS, "partial"])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--size-gib", type=float, default=0.25, help="partial: size of the micro state")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--scratch", required=True)
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    try:
        out = (run_partial(a.size_gib, a.reps, a.scratch) if a.impl == "partial"
               else run_impl(a.impl, a.count, a.reps, a.scratch))
    except Exception:
        out = dict(new_row(a.impl, "error", a.impl), error=traceback.format_exc(limit=8), count=a.count)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    from benchmarks.small_tensors import main as _main

    sys.exit(_main())
