"""Deterministic CPU training with an async checkpoint every step; the fault tests SIGKILL it and resume.

Run as ``python -m tests.faults.trainer DIR STEPS SEED PROGRESS_FILE``: trains from the newest committed checkpoint
in DIR (or from scratch) to STEPS, saving ``step_<n>.ckpt`` after every step, and appends ``saving <n>`` and
``committed <n>`` lines to PROGRESS_FILE as it goes.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from typing import Any, Callable

import torch

import lightning_ckpt as lc

DIM, HIDDEN, BATCH = 128, 1024, 32  # ~1 MB of parameters, ~3 MB per checkpoint with Adam state
LR = 1e-3
_NAME = re.compile(r"^step_(\d{6})\.ckpt$")


def ckpt_name(step: int) -> str:
    return f"step_{step:06d}.ckpt"


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, DIM))
    return model, torch.optim.Adam(model.parameters(), lr=LR)


def batch(seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(BATCH, DIM, generator=g)
    return x, torch.sin(x)


def checkpoint_state(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}


def newest_committed(directory: str) -> tuple[int, dict[str, Any]] | None:
    """The highest step among final-path checkpoints that load and verify (damaged ones are skipped)."""
    steps = sorted((int(m.group(1)) for m in map(_NAME.match, os.listdir(directory)) if m), reverse=True)
    reader = lc.CheckpointReader()
    for step in steps:
        try:
            state, _ = reader.read(os.path.join(directory, ckpt_name(step)))
        except (lc.CheckpointError, OSError):
            continue
        return step, state
    return None


def train(steps: int, seed: int, directory: str | None = None,
          checkpointer: lc.AsyncCheckpointer | None = None, on_event: Callable[[str], None] | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train to ``steps``; with ``directory``, resume from its newest checkpoint and save after every step.

    Returns the final ``checkpoint_state``. ``on_step(step, state)`` sees the state after every step.
    """
    with _threads(1):
        model, opt = build(seed)
        start = 0
        if directory is not None:
            newest = newest_committed(directory)
            if newest is not None:
                start = newest[0]
                model.load_state_dict(newest[1]["model"])
                opt.load_state_dict(newest[1]["optimizer"])
        own = directory is not None and checkpointer is None
        ck = lc.make_async_checkpointer() if own else checkpointer
        try:
            stage_future = None
            for step in range(start + 1, steps + 1):
                x, y = batch(seed, step)
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                if stage_future is not None:
                    stage_future.result(timeout=600)  # the safe point: staging done before the in-place update
                opt.step()
                opt.zero_grad(set_to_none=True)
                state = checkpoint_state(model, opt, step)
                if on_step is not None:
                    on_step(step, state)
                if ck is not None:
                    stage_future = _save(ck, directory, state, step, on_event)
            if ck is not None:
                ck.wait()
            return checkpoint_state(model, opt, steps)
        finally:
            if own and ck is not None:
                ck.close()


def _save(ck: lc.AsyncCheckpointer, directory: str, state: dict, step: int,
          on_event: Callable[[str], None] | None) -> Any:
    stage_future, write_future = ck.save(os.path.join(directory, ckpt_name(step)), state)
    if on_event is not None:
        on_event(f"saving {step}")
        write_future.add_done_callback(lambda f: f.exception() is None and on_event(f"committed {step}"))
    return stage_future


class _threads:
    """One intra-op thread, so that a run and its resumed twin compute bit for bit the same."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.old)


def read_progress(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def main() -> None:
    directory, steps, seed, progress = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    lock = threading.Lock()

    def on_event(line: str) -> None:
        with lock:
            os.write(fd, (line + "\n").encode())

    train(steps, seed, directory, on_event=on_event)
    on_event("done")


if __name__ == "__main__":
    main()
