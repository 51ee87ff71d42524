"""What filling new memory costs on 4 KiB pages and on transparent huge pages (``madvise(MADV_HUGEPAGE)``).

Each round allocates ``--mib`` of new memory the way a load allocates a storage (``torch.UntypedStorage``), with or
without the huge-page advice, and writes one byte per 4 KiB page (the faults, without the bandwidth of a full
fill). Rounds alternate between the two kinds; the THP settings are printed with the result. The library does not
use the advice: benchmarks/README.md ("Round three: huge pages") says what this measured and why.

    .venv/bin/python -m benchmarks.huge_pages --mib 1024 --rounds 8
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import statistics
import time

import torch

THP = "/sys/kernel/mm/transparent_hugepage/"
HUGE_PAGE_BYTES = 2 << 20


def advise_huge_pages(address: int, nbytes: int) -> bool:
    """``madvise(MADV_HUGEPAGE)`` over the whole 2 MiB pages inside the range; whether the kernel took it."""
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (address + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    return end > start and madvise(start, end - start, mmap.MADV_HUGEPAGE) == 0


def _setting(name: str) -> str:
    try:
        with open(THP + name) as f:
            return f.read().strip()
    except OSError:
        return "n/a"


def touch_new(nbytes: int, advise: bool) -> float:
    """Seconds to allocate ``nbytes`` and write one byte per 4 KiB page of it."""
    t0 = time.perf_counter()
    storage = torch.UntypedStorage(nbytes)
    if advise:
        advise_huge_pages(storage.data_ptr(), nbytes)
    torch.empty(0, dtype=torch.uint8).set_(storage)[::4096].fill_(1)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=8)
    a = ap.parse_args()
    nbytes = a.mib << 20
    times: dict[str, list[float]] = {"4k": [], "huge": []}
    for _ in range(a.rounds):
        for kind in ("4k", "huge"):
            times[kind].append(touch_new(nbytes, advise=kind == "huge"))
    out = {"mib": a.mib, "thp_enabled": _setting("enabled"), "thp_defrag": _setting("defrag"),
           "thp_shmem": _setting("shmem_enabled"),
           **{f"{k}_s": [round(t, 4) for t in v] for k, v in times.items()},
           **{f"{k}_median_s": round(statistics.median(v), 4) for k, v in times.items()}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
