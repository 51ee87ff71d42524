"""One crash trial of a 2-rank re-save of the same checkpoint directory (trainer or writer SIGKILLed, at a random
instant or exactly between the renames of the commit), shared by the fault test and the stress script."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time
from datetime import timedelta

import psutil

import lightning_ckpt as lc
from lightning_ckpt.commit import remove_stale_temps
from tests._helpers import wait_for
from tests.faults._faults import child_env, module_cmd, pid_gone, stop, tmp_leftovers
from tests.faults._trials import TrialResult
from tests.faults.resave_worker import check_state, state

VERSIONS = 4
RECOVERY_VERSION = 99


def complete_version(path: str) -> int | None:
    """The version both ranks' parts of ``path`` verifiably hold; None when nothing is there.

    Raises:
        Exception: something is at ``path`` that is not one complete checkpoint (torn).
    """
    if not os.path.lexists(path):
        return None
    versions = {check_state(lc.CheckpointReader(lc.RankInfo(r, 2)).read(path, weights_only=True)[0], r)
                for r in range(2)}
    if len(versions) != 1:
        raise AssertionError(f"{path} mixes versions {sorted(versions)}")
    return versions.pop()


def resave_kill_trial(directory: str, seed: int, **fixed: object) -> TrialResult:
    """Two ranks re-save ``<directory>/ck`` ``VERSIONS`` times; one process dies during a re-save; check the disk,
    run the next writer's cleanup, check again, then save once more and check that.

    ``fixed`` pins any of the random choices: ``mode``, ``how``, ``no_exchange``, ``kill_version``, ``kill_step``.
    """
    rng = random.Random(seed)
    mode, how, no_exchange = rng.choice(["sync", "async"]), rng.choice(["rename", "time"]), rng.random() < 0.5
    kill_version = rng.randint(2, VERSIONS)  # version 1 is committed before any fault
    mode, how = fixed.get("mode", mode), fixed.get("how", how)
    no_exchange, kill_version = fixed.get("no_exchange", no_exchange), fixed.get("kill_version", kill_version)
    kill_step = fixed.get("kill_step", rng.randint(0, 3 if no_exchange else 2))
    result = TrialResult(notes=dict(mode=mode, how=how, no_exchange=no_exchange, kill_version=kill_version))
    os.makedirs(directory, exist_ok=True)
    path, progress = os.path.join(directory, "ck"), f"{directory}.progress"
    extra = ["--no-exchange"] if no_exchange else []
    if how == "rename":
        extra += ["--kill-version", kill_version, "--kill-step", kill_step]
        result.notes["kill_step"] = kill_step
    port = _free_port()
    with open(f"{progress}.log", "ab") as log:
        procs = [subprocess.Popen(module_cmd("tests.faults.resave_worker", "--rank", r, "--port", port, "--path", path,
                                             "--versions", VERSIONS, "--mode", mode, "--progress", progress, *extra),
                                  env=child_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log) for r in range(2)]
        try:
            _kill_and_reap(procs, progress, how, kill_version, rng, result)
        finally:
            for p in procs:
                stop(p)
    lines = open(progress).read().split("\n") if os.path.exists(progress) else []
    committed = [int(line.split()[1]) for line in lines if line.startswith("committed ")]
    if f"saving {kill_version}" not in lines:
        result.problems.append(f"the ranks ended before the fault (see {progress}.log)")
    last = max(committed, default=0)
    result.notes["last_committed"] = last
    _check(path, last, result, "after the kill")
    result.notes["gap"] = last > 0 and not os.path.lexists(path)  # the fallback's instant, repaired below
    remove_stale_temps(directory)  # what the next writer does first
    _check(path, last, result, "after the next writer's cleanup")
    if last > 0 and not os.path.lexists(path):
        result.lost.append("ck")
    _save_recovery(path, result)
    if tmp_leftovers(directory):
        result.problems.append(f"temp leftovers after the next save: {tmp_leftovers(directory)}")
    return result


def _kill_and_reap(procs: list[subprocess.Popen], progress: str, how: str, kill_version: int, rng: random.Random,
                   result: TrialResult) -> None:
    """Wait for the fault (or inject it at a random instant), then SIGKILL whatever still runs."""
    def saving() -> bool:
        return os.path.exists(progress) and f"saving {kill_version}\n" in open(progress).read()

    wait_for(lambda: saving() or any(p.poll() is not None for p in procs), 120, f"rank 0 to save {kill_version}")
    writers = [c.pid for p in procs for c in _children(p.pid)]
    if how == "time":
        time.sleep(rng.uniform(0.0, 0.05))  # the random instant of the fault
        victim = rng.choice([p.pid for p in procs] + writers)
        result.notes["victim"] = "writer" if victim in writers else f"trainer {[p.pid for p in procs].index(victim)}"
        _kill(victim)
    wait_for(lambda: any(p.poll() is not None for p in procs) or any(pid_gone(w) for w in writers), 120,
             "a rank process or writer to die")
    for pid in [p.pid for p in procs] + writers:  # the job is gone: every rank and writer with it
        _kill(pid)
    for pid in [p.pid for p in procs] + writers:
        wait_for(lambda pid=pid: pid_gone(pid) or _reap(procs, pid), 60, f"process {pid} to go")


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(procs: list[subprocess.Popen], pid: int) -> bool:
    for p in procs:
        if p.pid == pid:
            return p.poll() is not None
    return False


def _check(path: str, last: int, result: TrialResult, when: str) -> None:
    """A final path holds one complete checkpoint, never older than the last committed one."""
    try:
        version = complete_version(path)
    except Exception as e:  # noqa: BLE001 - anything unreadable at the final path is torn
        result.torn.append(f"ck {when}: {type(e).__name__}: {e}")
        return
    if version is not None and version < last:
        result.lost.append(f"ck {when}: holds version {version}, {last} was committed")


def _save_recovery(path: str, result: TrialResult) -> None:
    """The next job's save over the same path (2 ranks on threads) commits and reads back."""
    from torch.distributed import TCPStore

    port = _free_port()
    master = TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        info = lc.RankInfo(rank, 2)
        try:
            barrier = lc.TCPStoreBarrier(rank_info=info, tcpstore_port=port, master_address="127.0.0.1",
                                         timeout_secs=30, is_master=False)
            lc.CheckpointWriter(rank_info=info, barrier=barrier).write(path, state(rank, RECOVERY_VERSION))
        except BaseException as e:  # noqa: BLE001 - reported as a problem
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    del master
    if errors or any(t.is_alive() for t in threads):
        result.problems.append(f"the next save failed: {errors}")
        return
    try:
        result.identical = complete_version(path) == RECOVERY_VERSION
    except Exception as e:  # noqa: BLE001
        result.torn.append(f"ck after the next save: {type(e).__name__}: {e}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
