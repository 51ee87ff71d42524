"""Fault-injection helpers: the on-disk invariant, faulty writer hooks, a small tmpfs, and process checks."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Iterator

import torch
import xxhash

import lightning_ckpt as lc
from lightning_ckpt import WriterHook
from lightning_ckpt.layout import TMP_MARKER
from tests._helpers import wait_for

TRIALS_ENV = "LCKPT_FAULT_TRIALS"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_ranks_in_threads(rank_main: Any, world: int = 2, timeout_secs: float = 60.0) -> None:
    """Run ``rank_main(rank)`` for every rank on its own thread and join them all (each within ``timeout_secs``)."""
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_secs)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"rank threads still running after {timeout_secs}s: {stuck}"


def fault_trials(default: int) -> int:
    """Trials per randomized fault test: ``default`` in CI, more via ``LCKPT_FAULT_TRIALS``."""
    return max(1, int(os.environ.get(TRIALS_ENV, default)))


# ---------------------------------------------------------------- the on-disk invariant


def final_names(directory: str) -> list[str]:
    """Entries at final paths (everything that is not one of our temp names)."""
    return sorted(n for n in os.listdir(directory) if TMP_MARKER not in n)


def tmp_leftovers(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if TMP_MARKER in n)


def load_verified(path: str, rank_info: lc.RankInfo | None = None) -> Any:
    """Load with checksum verification (raises on a torn or damaged checkpoint)."""
    state, _ = lc.CheckpointReader(rank_info).read(path, weights_only=True)
    return state


def torn_entries(directory: str) -> dict[str, str]:
    """Final-path entries of ``directory`` that fail to load and verify, with the error text."""
    torn = {}
    for name in final_names(directory):
        try:
            load_verified(os.path.join(directory, name))
        except Exception as e:  # noqa: BLE001 - any failure at a final path is a torn checkpoint
            torn[name] = f"{type(e).__name__}: {e}"
    return torn


def assert_invariant(directory: str, committed: dict[str, Any]) -> None:
    """Every final path loads and verifies, and each previously committed checkpoint is there, unchanged.

    Args:
        directory: the checkpoint directory.
        committed: final name -> the state saved there (compared bit for bit).
    """
    from tests._helpers import assert_equal_state

    assert torn_entries(directory) == {}, f"torn checkpoints in {directory}"
    for name, expected in committed.items():
        path = os.path.join(directory, name)
        assert os.path.exists(path), f"committed checkpoint {path} was lost"
        assert_equal_state(load_verified(path), expected, name)


def state_digest(state: Any) -> str:
    """xxh3 over the dtype, shape and bytes of every tensor and the repr of every other leaf, in order."""
    h = xxhash.xxh3_64()
    from lightning_ckpt.tree import iter_leaves

    for path, leaf in iter_leaves(state):
        h.update(repr(path).encode())
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(leaf).encode())
    return h.hexdigest()


def random_state(seed: int, nbytes: int = 2 << 20) -> dict[str, Any]:
    """A model-like state of about ``nbytes`` bytes (float32), different for every seed."""
    g = torch.Generator().manual_seed(seed)
    n = nbytes // 4
    return {
        "model": {"w1": torch.randn(n // 2, generator=g).view(-1, 256), "w2": torch.randn(n // 2, generator=g)},
        "optimizer": {"step": torch.tensor(float(seed)), "lr": 0.1},
        "step": seed,
    }


# ---------------------------------------------------------------- faulty writer hooks (imported by the writer)


class SlowHook(WriterHook):
    """A slow disk: every commit waits ``secs`` in ``pre_commit`` (the sleep is the injected fault)."""

    def __init__(self, secs: float) -> None:
        self.secs = secs

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        time.sleep(self.secs)


class FileSizeLimitHook(WriterHook):
    """A full disk without a mount: unpickling this hook (in the writer process) lowers RLIMIT_FSIZE there.

    SIGXFSZ is ignored so that a write past the limit fails with EFBIG instead of killing the writer.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit_bytes, hard))


class PathGateHook(WriterHook):
    """Blocks ``pre_commit`` of paths containing ``needle`` until ``release_file`` exists (touching ``entered_file``)."""

    def __init__(self, needle: str, entered_file: str, release_file: str, timeout_secs: float = 60.0) -> None:
        self.needle = needle
        self.entered_file = entered_file
        self.release_file = release_file
        self.timeout_secs = timeout_secs

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        if self.needle in os.path.basename(path):
            open(self.entered_file, "w").close()
            wait_for(lambda: os.path.exists(self.release_file), self.timeout_secs, f"release file {self.release_file}")


class RankFailHook(WriterHook):
    """Fails ``pre_commit`` on one rank only (the others must fail fast at the barrier, naming it)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        if kwargs["rank_info"].global_rank == self.rank:
            raise OSError(5, f"injected I/O error on rank {self.rank} for {path}")


class RankStallHook(WriterHook):
    """Stalls ``pre_commit`` on one rank for ``secs`` (longer than the barrier timeout of its peers)."""

    def __init__(self, rank: int, secs: float) -> None:
        self.rank = rank
        self.secs = secs

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        if kwargs["rank_info"].global_rank == self.rank:
            time.sleep(self.secs)


# ---------------------------------------------------------------- a small full disk


@contextlib.contextmanager
def small_tmpfs(parent: str, size: str = "1m") -> Iterator[str | None]:
    """A tmpfs of ``size`` mounted under ``parent``; yields None where mounting is not permitted."""
    mount_point = os.path.join(parent, f"tmpfs-{uuid.uuid4().hex[:6]}")
    os.makedirs(mount_point)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mount_point],
                          capture_output=True, timeout=30)
    if proc.returncode != 0:
        os.rmdir(mount_point)
        yield None
        return
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", mount_point], capture_output=True, timeout=30)
        os.rmdir(mount_point)


@contextlib.contextmanager
def immutable_dir(path: str) -> Iterator[bool]:
    """``chattr +i`` on ``path`` (even root cannot create files in it); yields whether it took effect."""
    ok = subprocess.run(["chattr", "+i", path], capture_output=True, timeout=30).returncode == 0
    if ok:
        probe = os.path.join(path, "probe")
        try:
            open(probe, "w").close()
            os.remove(probe)
            ok = False  # the filesystem ignores the flag
        except PermissionError:
            pass
    try:
        yield ok
    finally:
        subprocess.run(["chattr", "-i", path], capture_output=True, timeout=30)


# ---------------------------------------------------------------- processes


def pid_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie awaiting its reaper counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2:].split()[0] in ("Z", "X")


def wait_pid_gone(pid: int, timeout_secs: float, what: str) -> None:
    wait_for(lambda: pid_gone(pid), timeout_secs, what)


def module_cmd(module: str, *args: Any) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def start_with_writer(module: str, args: list, directory: Any, log_path: Any, what: str) -> tuple[subprocess.Popen, str]:
    """Run ``python -m module *args`` (stdout and stderr to ``log_path``) until it writes ``directory/pids`` (the
    pids of the writer it started, and any more); returns the process and that file's text."""
    with open(log_path, "w") as log_file:  # the child (and the writer it starts) hold their own copies
        proc = subprocess.Popen(module_cmd(module, *args), env=child_env(), stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=log_file)
    pids = os.path.join(str(directory), "pids")
    try:
        wait_for(lambda: os.path.exists(pids) or proc.poll() is not None, 120, what)
        assert proc.poll() is None, open(log_path).read()
    except BaseException:
        stop(proc)
        raise
    with open(pids) as f:
        return proc, f.read()


def stop(proc: subprocess.Popen, timeout_secs: float = 30.0) -> None:
    """Kill ``proc`` if it still runs and reap it (for ``finally`` blocks)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=timeout_secs)
