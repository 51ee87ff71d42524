"""A trainer the lifecycle tests kill or let end: ``python -m tests.faults.lifecycle_worker MODE DIR LAYOUT``.

Modes (the writer is held in ``pre_commit`` until ``DIR/release`` exists; ``DIR/entered`` once it is):
    orphan: save ``DIR/last.ckpt`` (``{"step": 1}``) and wait for it (until the test SIGKILLs us).
    exit: save ``DIR/a.ckpt`` (``exit_state()``), then end the script without ``wait()`` or ``close()``, logging
        the library at INFO (so the drain at exit is seen on stderr).
Both write the writer's pid to ``DIR/pids`` once it runs. ``LAYOUT`` is the writer's layout, ``file`` or ``dir``.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

import lightning_ckpt as lc
from tests._helpers import GateHook, wait_for


def step_state(step: int) -> dict:
    return {"w": torch.full((1000,), float(step)), "step": step}


def exit_state() -> dict:
    return {"w": torch.arange(256 * 1024, dtype=torch.float32)}


def make_config(layout: str) -> lc.CheckpointerConfig:
    return lc.CheckpointerConfig(writer_config=lc.CheckpointWriterConfig(layout=layout))


def _publish_pid(directory: str, pid: int) -> None:
    tmp = os.path.join(directory, "pids.tmp")
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.rename(tmp, os.path.join(directory, "pids"))


def main(mode: str, directory: str, layout: str) -> None:
    gate = GateHook(os.path.join(directory, "entered"), os.path.join(directory, "release"), timeout_secs=60)
    if mode == "exit":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
        logging.getLogger("lightning_ckpt").setLevel(logging.INFO)
    ck = lc.make_async_checkpointer(make_config(layout), commit_hook=gate)
    name, state = ("last.ckpt", step_state(1)) if mode == "orphan" else ("a.ckpt", exit_state())
    _, write_future = ck.save(os.path.join(directory, name), state)
    wait_for(lambda: ck.process.pid is not None, 60, "the writer to start")
    _publish_pid(directory, ck.process.pid)
    if mode == "orphan":
        write_future.result(timeout=90)
    # exit: the script ends here, its save still held in the writer


if __name__ == "__main__":
    main(*sys.argv[1:4])
