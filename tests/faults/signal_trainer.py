"""A trainer the signal tests send SIGTERM or SIGKILL to: ``python -m tests.faults.signal_trainer MODE DIR``.

Modes:
    hold: save ``DIR/a.ckpt`` with the writer held in ``pre_commit`` until ``DIR/release`` exists; the default
        SIGTERM action ends the trainer.
    drain: as ``hold``, but SIGTERM drains the writer (``CheckpointProcess.drain``) and exits 0 after writing
        ``drained <bool>`` to ``DIR/drained``.
    fork: commit ``DIR/a.ckpt``, fork a child that lives until ``DIR/release_child`` exists, then wait to be killed.
Each mode writes ``<writer pid> [<child pid>]`` to ``DIR/pids`` once the writer runs.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

import lightning_ckpt as lc
from tests._helpers import GateHook, wait_for


def _write_pids(directory: str, *pids: int) -> None:
    tmp = os.path.join(directory, "pids.tmp")
    with open(tmp, "w") as f:
        f.write(" ".join(map(str, pids)))
    os.rename(tmp, os.path.join(directory, "pids"))


def _hold(directory: str, drain: bool) -> None:
    gate = GateHook(os.path.join(directory, "entered"), os.path.join(directory, "release"), timeout_secs=120)
    with lc.make_async_checkpointer(commit_hook=gate) as ck:
        if drain:
            def on_sigterm(signum, frame):
                drained = ck.process.drain(120)
                with open(os.path.join(directory, "drained"), "w") as f:
                    f.write(f"drained {drained}")
                raise SystemExit(0)

            signal.signal(signal.SIGTERM, on_sigterm)
        _, write_future = ck.save(os.path.join(directory, "a.ckpt"), {"w": torch.arange(1000.0)})
        wait_for(lambda: ck.process.pid is not None, 60, "the writer to start")
        _write_pids(directory, ck.process.pid)
        write_future.result(timeout=300)


def _fork(directory: str) -> None:
    ck = lc.make_async_checkpointer()
    ck.save(os.path.join(directory, "a.ckpt"), {"w": torch.arange(1000.0)})[1].result(timeout=120)
    child = os.fork()
    if child == 0:
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(directory, "release_child")) and time.monotonic() < deadline:
            time.sleep(0.01)
        os._exit(0)
    _write_pids(directory, ck.process.pid, child)
    time.sleep(300)  # until the test kills us


if __name__ == "__main__":
    mode, directory = sys.argv[1], sys.argv[2]
    if mode == "fork":
        _fork(directory)
    else:
        _hold(directory, drain=mode == "drain")
