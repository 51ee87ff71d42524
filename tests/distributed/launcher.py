"""One way to launch N real gloo ranks on CPU for a test: ``run_ranks(fn, world_size, *args)``, or ``RankPool``.

``RankPool(world_size)`` starts the ranks once and runs several functions on them (starting a rank costs
seconds: torch's import); ``run_ranks`` starts fresh ranks for one function (for code that sets up
``torch.distributed`` itself, such as a Lightning ``Trainer``). Each rank is a fresh ``spawn`` process with the torchrun-style environment (``MASTER_ADDR``/``MASTER_PORT``,
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), so Lightning's ``Trainer`` in a rank finds its place by itself; with
``init_process_group=True`` the default gloo group is initialised before ``fn`` runs and destroyed after. ``fn``
must be importable (module level) and its arguments and return value picklable. Every launch has a deadline:
a rank that hangs is killed and the test fails naming it, with every rank's traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

RANK_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK",
            "GROUP_RANK")
# How long the other ranks may take to notice that one rank failed before they are killed.
FAILURE_GRACE_SECS = 30.0


class RanksFailed(AssertionError):
    """At least one rank raised, hung or died; the message holds each rank's traceback or fate."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_secs: float = 120.0,
              init_process_group: bool = True, env: dict[str, str] | None = None,
              may_die: frozenset[int] = frozenset()) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns their results by rank.

    ``may_die``: ranks that are expected to be killed (a fault test's victims); such a rank that dies without a
    result gets ``None`` as its result instead of failing the launch.

    Raises:
        RanksFailed: a rank raised (its traceback is in the message), died, or ran past ``timeout_secs``.
    """
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    out_dir = tempfile.mkdtemp(prefix="lckpt-ranks-")
    procs = []
    try:
        for rank in range(world_size):
            rank_env = _rank_env(rank, world_size, port, env)
            procs.append(ctx.Process(target=_rank_main, name=f"rank{rank}",
                                     args=(fn, rank, world_size, args, rank_env, init_process_group, out_dir)))
        for proc in procs:
            proc.start()
        fates = _wait_all(procs, out_dir, timeout_secs)
        return _results(fates, out_dir, world_size, may_die)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            if proc.pid is not None:
                proc.join(timeout=30)
        shutil.rmtree(out_dir, ignore_errors=True)


def _rank_env(rank: int, world_size: int, port: int, extra: dict[str, str] | None) -> dict[str, str]:
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
           "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size), "NODE_RANK": "0", "GROUP_RANK": "0"}
    env.update(extra or {})
    return env


def _wait_all(procs: list, out_dir: str, timeout_secs: float) -> dict[int, str]:
    """Wait for every rank; once one failed, give the others ``FAILURE_GRACE_SECS``. Returns rank -> fate."""
    deadline = time.monotonic() + timeout_secs
    fates: dict[int, str] = {}
    while len(fates) < len(procs):
        for rank, proc in enumerate(procs):
            if rank not in fates and not proc.is_alive():
                proc.join()
                fates[rank] = "exited" if proc.exitcode == 0 else f"died with exit code {proc.exitcode}"
                if proc.exitcode != 0 or os.path.exists(os.path.join(out_dir, f"{rank}.error")):
                    deadline = min(deadline, time.monotonic() + FAILURE_GRACE_SECS)
        if len(fates) < len(procs) and time.monotonic() > deadline:
            for rank, proc in enumerate(procs):
                if rank not in fates:
                    proc.kill()
                    proc.join(timeout=30)
                    fates[rank] = f"killed: still running after the deadline ({timeout_secs}s, or a peer failed)"
        time.sleep(0.02)
    return fates


def _results(fates: dict[int, str], out_dir: str, world_size: int,
             may_die: frozenset[int] = frozenset()) -> list[Any]:
    results, problems = [], []
    for rank in range(world_size):
        error_file = os.path.join(out_dir, f"{rank}.error")
        result_file = os.path.join(out_dir, f"{rank}.result")
        if os.path.exists(error_file):
            with open(error_file) as f:
                problems.append(f"--- rank {rank} raised:\n{f.read()}")
        elif os.path.exists(result_file):
            with open(result_file, "rb") as f:
                results.append(pickle.load(f))
            continue
        elif rank not in may_die or not fates.get(rank, "").startswith("died"):
            problems.append(f"--- rank {rank}: {fates.get(rank, 'unknown')} without a result")
        results.append(None)
    if problems:
        raise RanksFailed("\n".join(problems))
    return results


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, args: tuple, env: dict[str, str],
               init_process_group: bool, out_dir: str) -> None:
    os.environ.update(env)
    import torch.distributed as dist

    try:
        if init_process_group:
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
        try:
            result = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        _write(os.path.join(out_dir, f"{rank}.result"), pickle.dumps(result))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        _write(os.path.join(out_dir, f"{rank}.error"), traceback.format_exc().encode())
        raise SystemExit(1)


class RankPool:
    """``world_size`` spawned ranks with the default gloo group initialised, running functions on request.

    ``run(fn, *args)`` calls ``fn(rank, world_size, *args)`` on every rank and returns the results by rank. A
    rank that raises, dies or hangs fails the call with ``RanksFailed``; then the pool is restarted at the next
    call (a rank stuck in a collective cannot be trusted). ``close()`` stops the ranks; use it as a context manager.
    """

    def __init__(self, world_size: int, timeout_secs: float = 120.0) -> None:
        self.world_size = world_size
        self.timeout_secs = timeout_secs
        self._procs: list = []
        self._conns: list = []

    def __enter__(self) -> "RankPool":
        self._start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> None:
        if self._procs:
            return
        ctx = multiprocessing.get_context("spawn")
        port = free_port()
        for rank in range(self.world_size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_pool_main, name=f"pool-rank{rank}",
                               args=(rank, self.world_size, _rank_env(rank, self.world_size, port, None), child_end))
            proc.start()
            child_end.close()
            self._procs.append(proc)
            self._conns.append(parent_end)

    def run(self, fn: Callable[..., Any], *args: Any, timeout_secs: float | None = None) -> list[Any]:
        """Run ``fn(rank, world_size, *args)`` on every rank; returns the results by rank.

        Raises:
            RanksFailed: a rank raised (traceback in the message), died, or ran past the deadline.
        """
        self._start()
        for conn in self._conns:
            conn.send((fn, args))
        replies = self._collect(time.monotonic() + (timeout_secs or self.timeout_secs))
        problems = [f"--- rank {r}: {text}" for r, (kind, text) in sorted(replies.items()) if kind != "ok"]
        if problems or len(replies) < self.world_size:
            self.close()
            raise RanksFailed("\n".join(problems) or "a rank gave no reply")
        return [replies[r][1] for r in range(self.world_size)]

    def _collect(self, deadline: float) -> dict[int, tuple[str, Any]]:
        replies: dict[int, tuple[str, Any]] = {}
        while len(replies) < self.world_size:
            for rank, (proc, conn) in enumerate(zip(self._procs, self._conns)):
                if rank in replies:
                    continue
                if conn.poll(0.02):
                    try:
                        replies[rank] = conn.recv()
                    except EOFError:
                        replies[rank] = ("died", f"exit code {proc.exitcode}")
                elif not proc.is_alive():
                    replies[rank] = ("died", f"exit code {proc.exitcode}")
                if rank in replies and replies[rank][0] != "ok":
                    deadline = min(deadline, time.monotonic() + FAILURE_GRACE_SECS)
            if time.monotonic() > deadline:
                for rank in range(self.world_size):
                    replies.setdefault(rank, ("hung", "killed: no reply before the deadline (or a peer failed)"))
        return replies

    def close(self) -> None:
        """Stop the ranks (asking first, then killing); idempotent."""
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=30)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []


def _pool_main(rank: int, world_size: int, env: dict[str, str], conn: Any) -> None:
    os.environ.update(env)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        while True:
            request = conn.recv()
            if request is None:
                break
            fn, args = request
            try:
                reply = ("ok", fn(rank, world_size, *args))
            except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
                reply = ("error", traceback.format_exc())
            conn.send(reply)
    finally:
        dist.destroy_process_group()


def _write(path: str, data: bytes) -> None:
    tmp = f"{path}.partial"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
