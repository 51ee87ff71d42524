"""One crash trial each (writer SIGKILL; trainer SIGKILL + resume), shared by the fault tests and the stress script."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

import lightning_ckpt as lc
from tests._helpers import wait_for
from tests.faults import trainer
from tests.faults._faults import (
    child_env, load_verified, module_cmd, random_state, state_digest, stop, tmp_leftovers, torn_entries,
    wait_pid_gone,
)


@dataclass
class TrialResult:
    """What one crash left behind: torn final paths, lost commits, whether recovery was bit-identical."""

    torn: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    identical: bool = False
    problems: list[str] = field(default_factory=list)  # any other broken promise (error type, leftovers, ...)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.torn or self.lost or self.problems) and self.identical


def check_checkpoints(directory: str, expected: dict[str, str], committed: set[str]) -> tuple[list[str], list[str]]:
    """``(torn, lost)``: final paths that fail to verify or hold other content than ``expected`` (name -> digest),
    and ``committed`` names that are missing or damaged."""
    torn = sorted(torn_entries(directory))
    for name in sorted(set(os.listdir(directory)) & set(expected)):
        if name not in torn and state_digest(load_verified(os.path.join(directory, name))) != expected[name]:
            torn.append(name)
    lost = sorted(n for n in committed if n in torn or not os.path.exists(os.path.join(directory, n)))
    return torn, lost


# ---------------------------------------------------------------- 1: SIGKILL of the writer subprocess


def writer_kill_trial(directory: str, seed: int, nbytes: int = 2 << 20) -> TrialResult:
    """Commit two checkpoints, SIGKILL the writer at a random instant of a third write, then save again."""
    rng = random.Random(seed)
    result = TrialResult()
    states = {name: random_state(seed * 10 + i, nbytes) for i, name in enumerate(("a.ckpt", "b.ckpt", "c.ckpt",
                                                                                  "d.ckpt"))}
    expected = {name: state_digest(s) for name, s in states.items()}
    with lc.make_async_checkpointer() as ck:
        ck.save(os.path.join(directory, "a.ckpt"), states["a.ckpt"])[1].result(timeout=120)
        ck.save(os.path.join(directory, "b.ckpt"), states["b.ckpt"])[1].result(timeout=120)
        durable = ck.last_save_stats.durable_secs
        pid, starts = ck.process.pid, ck.process.starts
        _, victim = ck.save(os.path.join(directory, "c.ckpt"), states["c.ckpt"])
        time.sleep(rng.uniform(0.0, durable))  # the random instant of the fault
        os.kill(pid, signal.SIGKILL)
        wait_pid_gone(pid, 30, f"killed writer {pid}")  # SIGKILL is delivered asynchronously
        wait_for(victim.done, 60, "the killed write's future")
        exc = victim.exception()
        result.notes.update(durable_secs=durable, died=exc is not None)
        if exc is not None and not isinstance(exc, lc.WriterProcessDiedError):
            result.problems.append(f"killed writer surfaced as {type(exc).__name__}: {exc}")
        committed = {"a.ckpt", "b.ckpt"} | ({"c.ckpt"} if exc is None else set())
        result.torn, result.lost = check_checkpoints(directory, expected, committed)
        result.notes["leftovers_after_kill"] = tmp_leftovers(directory)
        ck.save(os.path.join(directory, "d.ckpt"), states["d.ckpt"])[1].result(timeout=120)
        if ck.process.starts != starts + 1 or ck.process.pid == pid:
            result.problems.append(f"expected one new writer after the kill, starts {starts} -> {ck.process.starts}")
    torn, lost = check_checkpoints(directory, expected, committed | {"d.ckpt"})
    result.torn, result.lost = sorted(set(result.torn) | set(torn)), sorted(set(result.lost) | set(lost))
    if tmp_leftovers(directory):
        result.problems.append(f"temp leftovers after the next writer ran: {tmp_leftovers(directory)}")
    result.identical = state_digest(load_verified(os.path.join(directory, "d.ckpt"))) == expected["d.ckpt"]
    return result


# ---------------------------------------------------------------- 2: SIGKILL of the training process, then resume


@dataclass
class Reference:
    """An uninterrupted run: the digest of the state after every step, and of the final state."""

    steps: int
    seed: int
    digests: dict[int, str]
    final: str

    @classmethod
    def run(cls, steps: int, seed: int) -> "Reference":
        digests: dict[int, str] = {}
        final = trainer.train(steps, seed, on_step=lambda s, state: digests.__setitem__(s, state_digest(state)))
        return cls(steps, seed, digests, state_digest(final))


def trainer_kill_trial(directory: str, ref: Reference, kill_seed: int,
                       checkpointer: lc.AsyncCheckpointer | None = None) -> TrialResult:
    """Run the trainer in a child, SIGKILL it at a random step while saves are in flight, check the disk,
    resume here from the newest committed checkpoint and compare the final state with the reference."""
    rng = random.Random(kill_seed)
    result = TrialResult()
    progress = os.path.join(os.path.dirname(directory), f"{os.path.basename(directory)}.progress")
    kill_step = rng.randint(1, ref.steps - 2)
    with open(progress + ".log", "wb") as log:
        proc = subprocess.Popen(module_cmd("tests.faults.trainer", directory, ref.steps, ref.seed, progress),
                                env=child_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        writers: list[int] = []
        try:
            wait_for(lambda: f"saving {kill_step}" in trainer.read_progress(progress) or proc.poll() is not None,
                     120, f"the trainer to save step {kill_step}")
            time.sleep(rng.uniform(0.0, 0.03))  # the random instant of the fault
            writers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            stop(proc)
    for pid in writers:  # the orphaned writer finishes its write, sees the closed pipe and exits
        wait_pid_gone(pid, 60, f"orphaned writer {pid} of the killed trainer")
    lines = trainer.read_progress(progress)
    if proc.returncode != -signal.SIGKILL:
        result.problems.append(f"trainer was not killed mid-run (exit {proc.returncode}); see {progress}.log")
    committed = {trainer.ckpt_name(int(line.split()[1])) for line in lines if line.startswith("committed ")}
    expected = {trainer.ckpt_name(s): d for s, d in ref.digests.items()}
    result.torn, result.lost = check_checkpoints(directory, expected, committed)
    newest = trainer.newest_committed(directory)
    last_committed = max((int(line.split()[1]) for line in lines if line.startswith("committed ")), default=0)
    result.notes.update(kill_step=kill_step, last_committed=last_committed, resumed_from=newest[0] if newest else 0,
                        leftovers_after_kill=tmp_leftovers(directory))
    final = trainer.train(ref.steps, ref.seed, directory, checkpointer=checkpointer)
    result.identical = state_digest(final) == ref.final
    torn, lost = check_checkpoints(directory, expected, committed)
    result.torn, result.lost = sorted(set(result.torn) | set(torn)), sorted(set(result.lost) | set(lost))
    if tmp_leftovers(directory):
        result.problems.append(f"temp leftovers after the resumed run: {tmp_leftovers(directory)}")
    return result
