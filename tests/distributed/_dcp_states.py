"""State dicts for the DCP tests: a small FSDP2 model on a CPU mesh, and sharded DTensors (importable by ranks)."""

from __future__ import annotations

import hashlib
import os

import torch


def fsdp2_model(world: int, seed: int = 0) -> torch.nn.Module:
    """A 2-layer MLP sharded with ``fully_shard`` over a CPU mesh of ``world`` ranks (same init on every rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sharded_state(world: int, version: int) -> dict:
    """DTensors sharded on dim 0 over all ranks (each rank writes its own chunk), plus a non-tensor leaf."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(world * 64, dtype=torch.float32).reshape(world * 8, 8) + 1000 * version
    return {"w": distribute_tensor(full, mesh, [Shard(0)]), "version": version}


def full_tensors(state: dict) -> dict:
    """Every DTensor gathered to a full CPU tensor (a collective), other leaves as they are."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in state.items()}


def tree_digest(path: str) -> dict[str, str]:
    """sha256 of every file under ``path`` by relative name (to prove a directory bit-identical)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out
