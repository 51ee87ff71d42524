"""Shared helpers for the benchmark scripts: synthetic checkpoints, timing statistics, file-system helpers.

Nothing here prints; the CLI (``benchmarks.run``) owns all output.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

MiB = 2**20
GiB = 2**30

# ----------------------------------------------------------------------------------------------------------------------
# Synthetic Lightning-like checkpoint
# ----------------------------------------------------------------------------------------------------------------------


def _block_shapes(h: int) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of one transformer-like block of hidden size ``h`` (mixed tensor sizes)."""
    return [
        ("attn.qkv.weight", (3 * h, h)),
        ("attn.qkv.bias", (3 * h,)),
        ("attn.proj.weight", (h, h)),
        ("attn.proj.bias", (h,)),
        ("ln1.weight", (h,)),
        ("ln1.bias", (h,)),
        ("mlp.fc1.weight", (4 * h, h)),
        ("mlp.fc1.bias", (4 * h,)),
        ("mlp.fc2.weight", (h, 4 * h)),
        ("mlp.fc2.bias", (h,)),
        ("ln2.weight", (h,)),
        ("ln2.bias", (h,)),
    ]


def _param_shapes(size_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter shapes whose fp32 params + Adam moments (3 copies) total about ``size_bytes``."""
    budget = max(size_bytes // (3 * 4), 4096)  # fp32 elements per copy
    h = int(min(2048, max(128, round(math.sqrt(budget / 144) / 64) * 64)))
    per_block = sum(math.prod(s) for _, s in _block_shapes(h))
    n_blocks = max(1, int(budget * 0.9) // per_block)
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for b in range(n_blocks):
        shapes += [(f"model.blocks.{b}.{n}", s) for n, s in _block_shapes(h)]
    shapes += [("model.ln_f.weight", (h,)), ("model.ln_f.bias", (h,))]
    used = sum(math.prod(s) for _, s in shapes)
    vocab = max(1, (budget - used) // h)
    return [("model.embed.weight", (vocab, h)), *shapes]


def _filler(pool: torch.Tensor, t: torch.Tensor, offset: int) -> None:
    """Fill ``t`` with a slice of a random pool (fast, distinct content per tensor)."""
    flat = t.view(-1)
    n = flat.numel()
    pos = 0
    while pos < n:
        start = (offset + pos) % pool.numel()
        k = min(n - pos, pool.numel() - start)
        flat[pos : pos + k].copy_(pool[start : start + k].to(flat.dtype))
        pos += k


def make_state(size_bytes: int, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """A synthetic checkpoint shaped like Lightning's ``trainer.save_checkpoint`` dict.

    ``state_dict`` holds fp32 parameters of mixed sizes plus a few buffers (int64 counters, running stats);
    ``optimizer_states`` holds Adam state (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter). The tensor bytes add up
    to about ``size_bytes``. Content is deterministic for a given ``seed`` so every row saves the same bytes.
    """
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(4 * MiB, generator=g).to(device)
    shapes = _param_shapes(size_bytes)
    state_dict: dict[str, torch.Tensor] = {}
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    offset = 0
    for i, (name, shape) in enumerate(shapes):
        tensors = []
        for _ in range(3):
            t = torch.empty(shape, dtype=torch.float32, device=device)
            _filler(pool, t, offset)
            offset += 7919 * (i + 1)
            tensors.append(t)
        state_dict[name] = tensors[0]
        opt_state[i] = {"step": torch.tensor(1000.0), "exp_avg": tensors[1], "exp_avg_sq": tensors[2]}
        if name.endswith("ln1.weight"):
            block = name.rsplit(".", 2)[0]
            state_dict[f"{block}.norm_stats.running_mean"] = torch.zeros(shape, device=device)
            state_dict[f"{block}.norm_stats.num_batches_tracked"] = torch.tensor(1000, dtype=torch.int64, device=device)
    param_group = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "foreach": None,
        "maximize": False,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "params": list(range(len(shapes))),
    }
    return {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": _lightning_version(),
        "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None, "dirpath": "ckpts"}},
        "optimizer_states": [{"state": opt_state, "param_groups": [param_group]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"hidden": shapes[-1][1][0], "n_params": len(shapes)},
    }


def _lightning_version() -> str:
    """Installed Lightning version, or ``"unknown"``."""
    try:
        import lightning

        return lightning.__version__
    except Exception:  # pragma: no cover - lightning is a hard dependency of the project
        return "unknown"


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """All tensors in a nested dict/list/tuple structure, in deterministic order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v)


def tensor_bytes(obj: Any) -> int:
    """Total bytes of all tensors in a nested structure."""
    return sum(t.numel() * t.element_size() for t in iter_tensors(obj))


def count_tensors(obj: Any) -> int:
    """Number of tensors in a nested structure."""
    return sum(1 for _ in iter_tensors(obj))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor's storage."""
    return t.detach().reshape(-1).view(torch.uint8)


def same_tensors(a: Any, b: Any, limit: int = 64) -> bool:
    """Whether the first ``limit`` tensors of two nested structures are equal (CPU comparison)."""
    ta, tb = list(iter_tensors(a)), list(iter_tensors(b))
    if len(ta) != len(tb):
        return False
    step = max(1, len(ta) // limit)
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(ta[::step], tb[::step]))


def empty_like_state(obj: Any) -> Any:
    """A structure like ``obj`` with every tensor replaced by an uninitialised CPU tensor (for in-place loads)."""
    if isinstance(obj, torch.Tensor):
        return torch.empty(obj.shape, dtype=obj.dtype, device="cpu")
    if isinstance(obj, dict):
        return {k: empty_like_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [empty_like_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(empty_like_state(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------------------------------------------------
# Timing statistics
# ----------------------------------------------------------------------------------------------------------------------


def summarize(values: Iterable[float | None]) -> dict[str, float | int] | None:
    """Median, min, max and count of the non-None values, or None when there are none."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn`` and return ``(seconds, result)``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@dataclass
class Sync:
    """Device synchronisation used around timed regions (no-op on CPU)."""

    device: str = "cpu"

    def __call__(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------------
# File-system helpers
# ----------------------------------------------------------------------------------------------------------------------


def files_under(path: str) -> list[str]:
    """``path`` itself if it is a file, else every regular file below it (sorted)."""
    if os.path.isfile(path):
        return [path]
    out: list[str] = []
    for root, _dirs, names in os.walk(path):
        out += [os.path.join(root, n) for n in names]
    return sorted(out)


def artifacts(path: str) -> list[str]:
    """Files a save to ``path`` produced: the path (file or directory) plus sidecars named ``path.*``."""
    out = files_under(path) if os.path.exists(path) else []
    parent, base = os.path.split(path)
    for name in sorted(os.listdir(parent or ".")):
        full = os.path.join(parent, name)
        if name.startswith(base + ".") and os.path.isfile(full):
            out.append(full)
    return out


def fsync_paths(paths: Iterable[str]) -> None:
    """``os.fsync`` each file (data made durable, as a row that does not fsync itself would need)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def drop_cache(paths: Iterable[str]) -> bool:
    """Evict files from the page cache with ``posix_fadvise(DONTNEED)`` (after fsync, so the pages are clean).

    Returns False when the platform has no ``posix_fadvise``.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def remove_path(path: str) -> None:
    """Remove a checkpoint (file or directory) and its ``path.*`` sidecars; ignore what is missing."""
    parent, base = os.path.split(path)
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)
    if os.path.isdir(parent or "."):
        for name in os.listdir(parent or "."):
            if name.startswith(base + "."):
                full = os.path.join(parent, name)
                shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)


def fs_type(path: str) -> str:
    """File-system type of the mount holding ``path`` (from /proc/mounts; ``"unknown"`` elsewhere)."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) > len(best):
                        best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def make_scratch(base: str) -> str:
    """A fresh scratch directory under ``base`` (created if needed), for checkpoint files."""
    os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix="scratch-", dir=base)


@dataclass
class PathSeq:
    """Fresh checkpoint paths in a scratch directory; only the newest ``keep`` are kept on disk."""

    root: str
    suffix: str = ".ckpt"
    keep: int = 2
    _made: list[str] = field(default_factory=list)

    def next(self, tag: str) -> str:
        """A new path; older paths beyond ``keep`` are deleted."""
        p = os.path.join(self.root, f"{tag}-{len(self._made):03d}{self.suffix}")
        self._made.append(p)
        while len(self._made) > self.keep:
            remove_path(self._made.pop(0))
        return p


# ----------------------------------------------------------------------------------------------------------------------
# Result rows
# ----------------------------------------------------------------------------------------------------------------------


def new_row(name: str, kind: str, label: str, **extra: Any) -> dict[str, Any]:
    """An empty result row; ``kind`` is ``floor``, ``ours`` or ``anchor``. Timing fields are filled by the runners."""
    row: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "label": label,
        "fsyncs_itself": None,
        "stall_s": None,
        "done_s": None,
        "durable_s": None,
        "load_s": None,
        "warmup": None,
        "extra_host_mib": None,
        "extra_rss_mib": None,
        "per_save_extra_host_mib": [],
        "per_save_extra_rss_mib": [],
        "gbps": None,
        "notes": [],
        "skipped": None,
        "error": None,
    }
    row.update(extra)
    return row
