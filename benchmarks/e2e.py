"""End-to-end benchmark: a Lightning fit with periodic checkpoints, one configuration per fresh process.

The model is a stack of large ``Linear`` layers (about ``--param-mib`` MiB of fp32 parameters; Adam doubles that in
optimizer state) fed a tiny batch, so compute is cheap and the checkpoint is large. ``--steps`` training steps, a
checkpoint every ``--every`` steps (``ModelCheckpoint(every_n_train_steps=..., save_top_k=-1)``).

Configurations (``--config``):

* ``none``                  no checkpointing (the baseline);
* ``torch_io``              Lightning ``TorchCheckpointIO`` (with ``--anchor-fsync``: a subclass that fsyncs the file
                            after each save, so anchors reach the same durability as ours);
* ``lightning_async``       Lightning ``AsyncCheckpointIO`` around that plugin;
* ``ours_plugin``           ``lightning_ckpt.lightning.AsyncCheckpointIO``;
* ``ours_plugin_callback``  that plugin plus ``AsyncCheckpointCallback`` (the callback's own cadence when it has
                            ``every_n_train_steps``, else next to ModelCheckpoint).

Measured (seconds): ``fit_s`` (``trainer.fit`` total), ``loop_s`` (``on_train_start`` to the start of ``on_train_end``:
every step with every save's stall, but not the final drain), ``drain_s`` (the rest of ``fit``: waiting for the last
writes in ``on_train_end`` or in the plugin's ``teardown``, plus Lightning's own teardown), ``io_teardown_s`` (the
plugin's ``teardown`` alone), ``hook_s`` (time inside the checkpoint callbacks' hooks during training, i.e. excluding
``on_train_end``/``teardown``: what the training loop saw), per-save ``save_call_s`` (each
``trainer.save_checkpoint`` call) and ``stall_per_save_s`` = ``hook_s / saves``. The ``none`` configuration also
measures ``memcpy_floor_s``: a copy of the checkpoint's tensors (parameters and optimizer state after the fit) into one
reused buffer, the floor the per-save loop overhead is divided by.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
import traceback
from typing import Any

import torch

CONFIGS = ["none", "torch_io", "lightning_async", "ours_plugin", "ours_plugin_callback"]


def build_module(param_mib: float, hidden: int, batch: int, steps: int) -> Any:
    """A LightningModule of large Linear layers (about ``param_mib`` MiB fp32) with fused Adam, plus its data."""
    import lightning.pytorch as pl

    per_layer = (hidden * hidden + hidden) * 4
    n_layers = max(1, round(param_mib * 2**20 / per_layer))

    class Wide(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden) for _ in range(n_layers)])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layers(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            try:
                return torch.optim.Adam(self.parameters(), lr=1e-5, fused=True)
            except (RuntimeError, TypeError):
                return torch.optim.Adam(self.parameters(), lr=1e-5)

        def train_dataloader(self) -> Any:
            data = torch.utils.data.TensorDataset(torch.randn(steps * batch, hidden))
            return torch.utils.data.DataLoader(data, batch_size=batch)

    return Wide()


def fsync_torch_io() -> Any:
    """Lightning ``TorchCheckpointIO`` that also fsyncs the written file (same durability as our plugin)."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class FsyncTorchCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            fd = os.open(str(path), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    return FsyncTorchCheckpointIO()


class HookTimer:
    """Times every call of selected methods on selected objects (by wrapping them on the instance)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def wrap(self, obj: Any, names: list[str], tag: str) -> None:
        """Replace ``obj.<name>`` by a timed wrapper for each name that exists and is callable."""
        for name in names:
            fn = getattr(obj, name, None)
            if not callable(fn):
                continue

            def timed(*args: Any, __fn: Any = fn, __key: str = f"{tag}.{name}", **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return __fn(*args, **kwargs)
                finally:
                    self.calls.append((__key, time.perf_counter() - t0))

            setattr(obj, name, timed)

    def total(self, prefix: str) -> float:
        """Sum of the durations of calls whose key starts with ``prefix``."""
        return sum(d for k, d in self.calls if k.startswith(prefix))

    def durations(self, key: str) -> list[float]:
        """Durations of the calls with exactly this key."""
        return [d for k, d in self.calls if k == key]


def hook_names(obj: Any) -> list[str]:
    """The callback hooks (``on_*``) an object defines, plus ``state_dict``."""
    return [n for n in dir(obj) if n.startswith("on_") or n == "state_dict"]


def build_checkpointing(config: str, every: int, ckdir: str, anchor_fsync: bool) -> tuple[list, list, bool, list[str]]:
    """``(plugins, checkpoint callbacks, enable_checkpointing, notes)`` for a configuration."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    notes: list[str] = []
    mc = ModelCheckpoint(dirpath=ckdir, every_n_train_steps=every, save_top_k=-1, save_last=False)
    if config == "none":
        return [], [], False, notes
    if config in ("torch_io", "lightning_async"):
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
        from lightning.pytorch.plugins.io import AsyncCheckpointIO

        inner = fsync_torch_io() if anchor_fsync else TorchCheckpointIO()
        notes.append("anchor fsyncs each file" if anchor_fsync else "anchor does not fsync")
        plugin = inner if config == "torch_io" else AsyncCheckpointIO(inner)
        return [plugin], [mc], True, notes
    from lightning_ckpt.lightning import AsyncCheckpointIO as OursIO

    if config == "ours_plugin":
        return [OursIO()], [mc], True, notes
    from lightning_ckpt.lightning import AsyncCheckpointCallback

    params = inspect.signature(AsyncCheckpointCallback).parameters
    kwargs: dict[str, Any] = {}
    if "dirpath" in params:
        kwargs["dirpath"] = ckdir
    if "save_on_train_end" in params:
        kwargs["save_on_train_end"] = False  # same number of saves as ModelCheckpoint(every_n_train_steps=...)
    if "every_n_train_steps" in params:
        kwargs["every_n_train_steps"] = every
        notes.append("AsyncCheckpointCallback drives the cadence (no ModelCheckpoint)")
        from lightning.pytorch.callbacks import Checkpoint

        # enable_checkpointing=True without a Checkpoint callback makes Lightning add a default ModelCheckpoint
        enable = issubclass(AsyncCheckpointCallback, Checkpoint)
        return [OursIO()], [AsyncCheckpointCallback(**kwargs)], enable, notes
    notes.append("AsyncCheckpointCallback next to ModelCheckpoint")
    return [OursIO()], [mc, AsyncCheckpointCallback(**kwargs)], True, notes


def memcpy_floor(model: Any, optimizers: list, reps: int = 3) -> tuple[float, int]:
    """``(median seconds, bytes)`` of copying every parameter, buffer and optimizer-state tensor into a reused buffer."""
    from benchmarks.common import iter_tensors
    from benchmarks.floors import copy_into

    tensors = [t for t in iter_tensors(model.state_dict()) if t.is_contiguous()]
    tensors += [t for opt in optimizers for t in iter_tensors(opt.state_dict()["state"]) if t.is_contiguous()]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    buf = torch.empty(nbytes, dtype=torch.uint8)
    copy_into(buf, tensors)  # warm-up: faults the buffer in
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        copy_into(buf, tensors)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], nbytes


def run_config(config: str, param_mib: float, hidden: int, batch: int, steps: int, every: int, scratch: str,
               anchor_fsync: bool) -> dict[str, Any]:
    """Run one fit and return its measurements."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    torch.manual_seed(0)
    model = build_module(param_mib, hidden, batch, steps)
    ckdir = os.path.join(scratch, f"e2e-{config}")
    plugins, ck_callbacks, enable_ckpt, notes = build_checkpointing(config, every, ckdir, anchor_fsync)
    timer = HookTimer()
    for i, cb in enumerate(ck_callbacks):
        timer.wrap(cb, hook_names(cb), f"hook.{i}")
    marks: dict[str, float] = {}
    batch_ends: list[float] = []

    class Marks(Callback):
        """First callback: its on_train_end runs after the last step's hooks, before any other on_train_end."""

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            marks.setdefault("train_start", time.perf_counter())

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            batch_ends.append(time.perf_counter())  # runs first: the step itself, not the saves after it

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            marks.setdefault("train_end", time.perf_counter())

    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=enable_ckpt,
        callbacks=[Marks(), *ck_callbacks], plugins=plugins, default_root_dir=scratch,
    )
    timer.wrap(trainer, ["save_checkpoint"], "trainer")
    if plugins:
        timer.wrap(trainer.strategy.checkpoint_io, ["teardown"], "io")
    t0 = time.perf_counter()
    trainer.fit(model)
    t_end = time.perf_counter()
    fit_s = t_end - t0
    loop_end = marks.get("train_end", t_end)
    saves = timer.durations("trainer.save_checkpoint")
    hook_s = sum(d for k, d in timer.calls if k.startswith("hook.") and not k.endswith((".on_train_end",
                 ".on_fit_end", ".teardown")))
    files = sorted(os.listdir(ckdir)) if os.path.isdir(ckdir) else []
    n_params = sum(p.numel() for p in model.parameters())
    floor = memcpy_floor(model, trainer.optimizers) if config == "none" else None
    return {
        "memcpy_floor_s": floor[0] if floor else None,
        "checkpoint_bytes": floor[1] if floor else None,
        "config": config,
        "fit_s": fit_s,
        "loop_s": loop_end - marks.get("train_start", t0),
        "drain_s": t_end - loop_end,
        "io_teardown_s": timer.total("io.teardown"),
        "hook_s": hook_s,
        "saves": len(saves),
        "save_call_s": saves,
        "stall_per_save_s": hook_s / len(saves) if saves else None,
        "files": files,
        "param_mib": n_params * 4 / 2**20,
        "checkpoint_mib_approx": n_params * 12 / 2**20,
        "steps": int(trainer.global_step),
        # per step: from the end of the previous step's hooks (saves included) to the end of this step's training
        "step_s": [b - a for a, b in zip([marks.get("train_start", t0), *batch_ends], batch_ends)],
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    """Process entry point for one configuration; writes one JSON object to ``--json``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, choices=CONFIGS)
    ap.add_argument("--param-mib", type=float, default=768)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--anchor-fsync", type=int, default=1, help="1: anchors fsync each file (default); 0: as shipped")
    ap.add_argument("--scratch", required=True)
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    try:
        out = run_config(a.config, a.param_mib, a.hidden, a.batch, a.steps, a.every, a.scratch, bool(a.anchor_fsync))
    except Exception as e:
        if isinstance(e, ImportError) and "lightning_ckpt" in str(e):
            out = {"config": a.config, "skipped": f"lightning_ckpt not usable yet ({type(e).__name__}: {e})"}
        else:
            out = {"config": a.config, "error": traceback.format_exc(limit=8)}
    finally:
        import shutil

        shutil.rmtree(os.path.join(a.scratch, f"e2e-{a.config}"), ignore_errors=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
