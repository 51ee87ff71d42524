"""Profiling aid: what a checkpoint's background work costs a training loop running beside it, one cause at a time.

A loop of ``--steps`` training steps (a stack of ``Linear(4096, 4096)``, fused Adam: the e2e model, scaled by
``--param-mib``) runs alone and with one background activity of the size of its checkpoint (parameters and Adam
state), in rounds (``--rounds``), interleaved so that a slow spell of the machine hits every variant alike:

* ``copy``: ``torch._foreach_copy_`` of the state into a reused buffer (a staging copy overlapping training);
* ``hash``: xxh3 of that buffer (the writer's checksums);
* ``write``: O_DIRECT ``pwrite`` of that buffer to a file under ``--scratch``, then fsync (the writer's write);
* ``touch``: a new shared-memory buffer of that size, one byte written per page (the staging buffer's prefault);
* ``populate``: a new shared-memory buffer faulted in with one ``madvise(MADV_POPULATE_WRITE)`` (what the
  prefault does where the kernel has it);
* ``fallocate``: a new shared-memory buffer allocated with ``posix_fallocate`` (no page faults in this process);
* ``fallocate+touch``: that, then one byte written per page (faults that only map pages already allocated);
* ``other_process``: the same ``posix_fallocate`` in another process.

Prints, per variant, the median loop time over the rounds, its excess over ``none``, and how long the background
activity itself took.

    python -m benchmarks.contention --param-mib 768 --steps 5 --rounds 3 --scratch benchmarks/results
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import torch

CHUNK = 16 << 20


def _model(param_mib: float) -> tuple[Callable[[], None], list[torch.Tensor]]:
    layers = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(max(1, round(param_mib / 64)))])
    opt = torch.optim.Adam(layers.parameters(), lr=1e-5, fused=True)
    x = torch.randn(4, 4096)

    def step() -> None:
        layers(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    step()  # creates the Adam state
    state = [p.data for p in layers.parameters()]
    state += [s for st in opt.state.values() for s in (st["exp_avg"], st["exp_avg_sq"])]
    return step, state


def _new_shared(nbytes: int, how: str) -> Any:
    fd = os.memfd_create("lightning_ckpt-contention", os.MFD_CLOEXEC)
    os.ftruncate(fd, nbytes)
    if how.startswith("fallocate"):
        os.posix_fallocate(fd, 0, nbytes)
    m = mmap.mmap(fd, nbytes)
    if how == "populate":
        from lightning_ckpt import pages

        if not pages.populate_write(torch.frombuffer(m, dtype=torch.uint8).data_ptr(), nbytes):
            raise OSError("MADV_POPULATE_WRITE is not available here")
    if how.endswith("touch"):
        torch.frombuffer(m, dtype=torch.uint8)[::mmap.PAGESIZE].fill_(0)
    return fd, m


def _activities(state: list[torch.Tensor], scratch: str) -> dict[str, Callable[[], None]]:
    nbytes = sum(t.numel() * t.element_size() for t in state)
    buf = torch.empty(nbytes, dtype=torch.uint8)
    views, offset = [], 0
    for t in state:
        n = t.numel() * t.element_size()
        views.append(buf[offset:offset + n].view(t.dtype).view(t.shape))
        offset += n
    torch._foreach_copy_(views, state)
    fd, staging = _new_shared(nbytes, "touch")  # page-aligned and shared, as the writer reads it
    torch.frombuffer(staging, dtype=torch.uint8).copy_(buf)
    path = os.path.join(scratch, "contention.bin")

    def hash_() -> None:
        import xxhash

        h, view = xxhash.xxh3_64(), memoryview(staging)
        for o in range(0, nbytes, CHUNK):
            h.update(view[o:o + CHUNK])
        view.release()

    def write() -> None:
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o644)
        view = memoryview(staging)
        try:
            for o in range(0, nbytes - nbytes % 4096, CHUNK):
                os.pwrite(out, view[o:min(o + CHUNK, nbytes - nbytes % 4096)], o)
            os.fsync(out)
        finally:
            view.release()
            os.close(out)
            os.unlink(path)

    def allocate(how: str) -> Callable[[], None]:
        def run() -> None:
            new_fd, mapping = _new_shared(nbytes, how)
            mapping.close()
            os.close(new_fd)
        return run

    def other_process() -> None:
        code = (f"import os; fd = os.memfd_create('x'); os.ftruncate(fd, {nbytes}); "
                f"os.posix_fallocate(fd, 0, {nbytes})")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

    return {"copy": lambda: torch._foreach_copy_(views, state), "hash": hash_, "write": write,
            "touch": allocate("touch"), "populate": allocate("populate"), "fallocate": allocate("fallocate"),
            "fallocate+touch": allocate("fallocate+touch"), "other_process": other_process}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--param-mib", type=float, default=768)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scratch", default="benchmarks/results")
    ap.add_argument("--only", default=None, help="comma list of activities")
    a = ap.parse_args(argv)
    os.makedirs(a.scratch, exist_ok=True)
    torch.manual_seed(0)
    step, state = _model(a.param_mib)
    activities = _activities(state, a.scratch)
    if a.only:
        activities = {k: v for k, v in activities.items() if k in a.only.split(",")}

    def loop() -> float:
        start = time.perf_counter()
        for _ in range(a.steps):
            step()
        return time.perf_counter() - start

    loop()
    loops: dict[str, list[float]] = {"none": []}
    took: dict[str, list[float]] = {}
    for _ in range(a.rounds):
        loops["none"].append(loop())
        for name, activity in activities.items():
            spans: list[float] = []

            def background(fn: Callable[[], None] = activity) -> None:
                start = time.perf_counter()
                fn()
                spans.append(time.perf_counter() - start)

            thread = threading.Thread(target=background, name=f"contention-{name}")
            thread.start()
            loops.setdefault(name, []).append(loop())
            thread.join(timeout=300)
            took.setdefault(name, []).extend(spans)
    base = statistics.median(loops["none"])
    state_mib = sum(t.numel() * t.element_size() for t in state) / 2**20
    print(f"{a.steps} steps of a {a.param_mib:.0f} MiB model, state {state_mib:.0f} MiB, {a.rounds} rounds")
    print(f"{'variant':16s} {'loop s (median)':>16s} {'excess s':>9s} {'activity s':>11s}  every loop")
    for name, values in loops.items():
        med = statistics.median(values)
        act = f"{statistics.median(took[name]):.2f}" if took.get(name) else "-"
        print(f"{name:16s} {med:16.2f} {med - base:+9.2f} {act:>11s}  " + " ".join(f"{v:.2f}" for v in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
