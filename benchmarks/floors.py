"""Floors: the hardware limits a checkpointer is measured against, on the same tensor bytes as the other rows.

* ``floor.memcpy``      copy every tensor into one reused host buffer (the least a point-in-time snapshot can cost).
* ``floor.d2h_pinned``  (GPU mode) copy every tensor into one reused pinned host buffer, non-blocking, then synchronise.
* ``floor.write_fsync`` one sequential ``os.write`` of those bytes into a new file, then ``fsync``.
* ``floor.read_cold``   read the file back into a reused buffer after evicting it from the page cache
                        (``posix_fadvise(POSIX_FADV_DONTNEED)`` after fsync).
* ``floor.read_warm``   the same read with the file in the page cache.
* ``floor.read_cold_fresh`` the cold read into a buffer allocated inside the timed region (what any load that returns
                        new tensors pays on top: the kernel faults in and zeroes every page it copies into).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from benchmarks.common import MiB, PathSeq, Sync, as_bytes, drop_cache, iter_tensors, new_row, summarize, timed
from benchmarks.memory import MemorySampler

CHUNK = 64 * MiB


def copy_into(buf: torch.Tensor, tensors: list[torch.Tensor], non_blocking: bool = False) -> None:
    """Copy the bytes of ``tensors`` back to back into the flat ``uint8`` buffer ``buf``."""
    off = 0
    for t in tensors:
        b = as_bytes(t)
        n = b.numel()
        buf[off : off + n].copy_(b, non_blocking=non_blocking)
        off += n


def write_fsync(path: str, buf: torch.Tensor) -> None:
    """Write ``buf`` sequentially to a new file in ``CHUNK`` pieces, then fsync and close it."""
    view = memoryview(buf.numpy()).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        off = 0
        while off < len(view):
            off += os.write(fd, view[off : off + CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_into(path: str, buf: torch.Tensor) -> int:
    """Read a whole file sequentially into the reused buffer ``buf``; returns the bytes read."""
    view = memoryview(buf.numpy()).cast("B")
    total = 0
    with open(path, "rb", buffering=0) as f:
        while total < len(view):
            n = f.readinto(view[total : total + CHUNK])
            if not n:
                break
            total += n
    return total


def _mem_row(row: dict[str, Any], sampler: MemorySampler | None, base: Any) -> None:
    """Record the peak extra host memory since ``base`` into ``row``."""
    if sampler is None or base is None:
        return
    peak = sampler.window()
    row["extra_host_mib"] = (peak.host - base.host) / MiB
    row["extra_rss_mib"] = (peak.rss - base.rss) / MiB


def run_floors(
    state: dict[str, Any], scratch: str, reps: int, device: str, sampler: MemorySampler | None
) -> list[dict[str, Any]]:
    """Measure all floors for ``state``; returns one row per floor (the copy floor first)."""
    tensors = list(iter_tensors(state))
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    gpu = device.startswith("cuda")
    sync = Sync(device)
    rows: list[dict[str, Any]] = []
    base = sampler.baseline() if sampler else None
    if sampler:
        sampler.window()

    # -- the copy floor: memcpy (CPU) or pinned D2H (GPU)
    name, label = ("floor.d2h_pinned", "pinned D2H copy") if gpu else ("floor.memcpy", "memcpy into reused buffer")
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=gpu)

    def copy() -> None:
        copy_into(buf, tensors, non_blocking=gpu)
        sync()

    sync()
    warm, _ = timed(copy)
    times = [timed(copy)[0] for _ in range(reps)]
    row = new_row(name, "floor", label, fsyncs_itself=None)
    row["stall_s"] = summarize(times)
    row["warmup"] = {"stall_s": warm}
    row["gbps"] = nbytes / row["stall_s"]["median"] / 1e9
    _mem_row(row, sampler, base)
    rows.append(row)

    # -- sequential write + fsync of the same bytes
    paths = PathSeq(scratch, suffix=".bin", keep=1)
    timed(lambda: write_fsync(paths.next("floor"), buf))  # warm-up (file-system metadata, allocator)
    times = []
    for _ in range(reps):
        p = paths.next("floor")
        times.append(timed(lambda: write_fsync(p, buf))[0])
    row = new_row("floor.write_fsync", "floor", "raw write + fsync", fsyncs_itself=True)
    row["durable_s"] = summarize(times)
    row["done_s"] = row["durable_s"]
    row["gbps"] = nbytes / row["durable_s"]["median"] / 1e9
    rows.append(row)

    # -- cold and warm sequential reads of that file
    last = paths._made[-1]
    cold, warm_t, fresh, can_drop = [], [], [], True
    for _ in range(reps):
        can_drop = drop_cache([last])
        cold.append(timed(lambda: read_into(last, buf))[0])
        warm_t.append(timed(lambda: read_into(last, buf))[0])
        drop_cache([last])
        fresh.append(timed(lambda: read_into(last, torch.empty(nbytes, dtype=torch.uint8)))[0])
    for name, label, vals in (
        ("floor.read_cold", "raw read, page cache dropped", cold),
        ("floor.read_warm", "raw read, page cache warm", warm_t),
        ("floor.read_cold_fresh", "raw read, page cache dropped, into fresh memory", fresh),
    ):
        row = new_row(name, "floor", label)
        row["load_s"] = summarize(vals)
        row["gbps"] = nbytes / row["load_s"]["median"] / 1e9
        if name == "floor.read_cold" and not can_drop:
            row["notes"].append("posix_fadvise unavailable: cache not dropped")
        rows.append(row)
    paths.next("floor")  # removes the last file
    buf = None  # the closures above hold the name, not the memory: release it before the next rows
    return rows
