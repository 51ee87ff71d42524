"""Barriers that synchronise the ranks writing one checkpoint: over torch.distributed or over a TCPStore."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Protocol, runtime_checkable

from lightning_ckpt.errors import BarrierPeerError, BarrierTimeoutError, CheckpointError
from lightning_ckpt.types import RankInfo

log = logging.getLogger(__name__)

STORE_PORT_ENV = "LIGHTNING_CKPT_STORE_PORT"
_POLL_SECS = 0.005


@runtime_checkable
class Barrier(Protocol):
    """Blocks until every rank of the checkpoint reached the same barrier."""

    def execute_barrier(self) -> None: ...


def barrier_wait(barrier: Barrier, key: str) -> None:
    """Run ``barrier`` for the barrier point ``key`` (keyed barriers use it; plain ones ignore it)."""
    if isinstance(barrier, KeyedBarrier):
        barrier.execute_barrier(key=key)
    else:
        barrier.execute_barrier()


def barrier_report_error(barrier: Barrier, key: str, message: str) -> None:
    """Tell the peers at barrier point ``key`` that this rank failed, where the barrier can."""
    if isinstance(barrier, KeyedBarrier):
        try:
            barrier.report_error(message, key=key)
        except Exception:  # noqa: BLE001 - reporting is best effort; the original error is what matters
            log.exception("could not report a failure to the other ranks at barrier %s", key)


class KeyedBarrier:
    """A barrier whose points are named, which can tell peers that this rank failed, and which can carry a value
    from rank 0 to every rank (the writer shares the unguessable name of a checkpoint's temp directory)."""

    def execute_barrier(self, key: str | None = None) -> None:
        raise NotImplementedError

    def report_error(self, message: str, key: str | None = None) -> None:
        raise NotImplementedError

    def share(self, value: str | None, key: str) -> str:
        """Meet at barrier point ``key``; every rank returns the ``value`` that rank 0 passed (others pass None)."""
        raise NotImplementedError


class DistBarrier(KeyedBarrier):
    """A barrier over the default ``torch.distributed`` group; call it from the main thread only.

    Better than a bare ``dist.barrier()``: each rank contributes ok/failed through one ``all_gather``, so a rank
    whose write failed releases its peers with ``BarrierPeerError`` naming it instead of leaving them hanging; the
    wait is bounded by ``timeout_secs`` (not the process group's timeout), and a timeout or a vanished peer raises
    an error naming the ranks that never arrived (recorded in the process group's store).
    """

    def __init__(self, rank_info: RankInfo | None = None, timeout_secs: float = 600.0) -> None:
        self.rank_info = rank_info
        self.timeout_secs = timeout_secs
        self._seq = 0

    def execute_barrier(self, key: str | None = None) -> None:
        name = self._name(key)
        failed = self._vote(ok=True, name=name)
        if failed:
            raise BarrierPeerError(f"barrier '{name}': ranks {failed} failed before it")

    def report_error(self, message: str, key: str | None = None) -> None:
        self._vote(ok=False, name=self._name(key))

    def share(self, value: str | None, key: str) -> str:
        import torch.distributed as dist

        store = _default_store()
        if store is None or not (dist.is_available() and dist.is_initialized()):  # no process group: one rank
            return value
        name = f"{self._name(key)}/value"
        if dist.get_rank() == 0:
            store.set(name, value)
        self.execute_barrier(key)
        return store.get(name).decode()

    def _name(self, key: str | None) -> str:
        if key is None:
            self._seq += 1
            key = f"seq-{self._seq}"
        return f"lightning_ckpt/dist/{key}"

    def _vote(self, ok: bool, name: str) -> list[int]:
        """All-gather this rank's flag within ``timeout_secs``; returns the ranks that voted failed."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return [] if ok else [0]
        rank, world = dist.get_rank(), dist.get_world_size()
        store = _default_store()
        arrivals = store.add(f"{name}/arrived/{rank}", 1) if store is not None else 0
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        flags = [torch.zeros_like(flag) for _ in range(world)]
        start = time.monotonic()
        try:
            dist.all_gather(flags, flag, async_op=True).wait(timeout=timedelta(seconds=self.timeout_secs))
        except RuntimeError as e:
            missing = _missing_ranks(store, name, arrivals, world)
            waited = time.monotonic() - start
            if waited >= self.timeout_secs:
                raise BarrierTimeoutError(
                    f"barrier '{name}' timed out after {self.timeout_secs}s on rank {rank}: "
                    f"ranks {missing} of {world} never arrived"
                ) from e
            raise BarrierPeerError(
                f"barrier '{name}' failed on rank {rank} after {waited:.1f}s: ranks {missing} of {world} never "
                f"arrived ({e})"
            ) from e
        return [r for r, f in enumerate(flags) if int(f.item()) == 0]


def _default_store() -> Any:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001 - naming missing ranks is best effort
        return None


def _missing_ranks(store: Any, name: str, arrivals: int, world: int) -> list[int] | str:
    """Ranks that reached barrier ``name`` fewer times than this rank (counters survive reused names)."""
    if store is None:
        return "unknown"
    try:
        return [r for r in range(world) if store.add(f"{name}/arrived/{r}", 0) < arrivals]
    except Exception:  # noqa: BLE001 - the store may be gone with rank 0
        return "unknown"


class TCPStoreBarrier(KeyedBarrier):
    """A barrier over a TCPStore, usable from any thread or process (the writer subprocess uses it).

    Each barrier point is a key ``<prefix>/<key>``: a rank arrives by setting ``arrived/<rank>``; a failing rank
    sets ``error`` so that peers raise ``BarrierPeerError`` at once; a timeout names the missing ranks.

    Args:
        rank_info: this rank and the number of ranks that meet at each barrier.
        master_port: port of the store served by rank 0 (see ``host_barrier_store``).
        master_addr: host of that store.
        prefix: namespace of the keys, so several checkpointers can share a store.
        timeout_secs: how long one barrier waits for its peers.
        init_timeout_secs: how long connecting to the store may take.
        store: an existing store to use instead of connecting.
    """

    def __init__(self, rank_info: RankInfo, master_port: int | None = None, master_addr: str | None = None,
                 prefix: str = "lightning_ckpt", timeout_secs: float = 600.0, init_timeout_secs: float = 120.0,
                 store: Any = None) -> None:
        self.rank_info = rank_info
        self.prefix = prefix
        self.timeout_secs = timeout_secs
        self._seq = 0
        self._store = store if store is not None else self._connect(master_addr, master_port, init_timeout_secs)

    def _connect(self, addr: str | None, port: int | None, init_timeout_secs: float) -> Any:
        from torch.distributed import TCPStore

        addr, port = resolve_store_address(addr, port)
        try:
            return TCPStore(addr, port, self.rank_info.global_world_size, is_master=False,
                            timeout=timedelta(seconds=init_timeout_secs), wait_for_workers=False)
        except Exception as e:
            raise CheckpointError(
                f"TCPStoreBarrier (rank {self.rank_info.global_rank}) could not reach the store at {addr}:{port} "
                f"within {init_timeout_secs}s: {e}"
            ) from e

    def _next_key(self, key: str | None) -> str:
        if key is None:
            self._seq += 1
            key = f"seq-{self._seq}"
        return f"{self.prefix}/{key}"

    def execute_barrier(self, key: str | None = None) -> None:
        base = self._next_key(key)
        rank, world = self.rank_info.global_rank, self.rank_info.global_world_size
        self._store.set(f"{base}/arrived/{rank}", "1")
        arrived = [f"{base}/arrived/{r}" for r in range(world)]
        deadline = time.monotonic() + self.timeout_secs
        while True:
            if self._store.check([f"{base}/error"]):
                raise BarrierPeerError(f"barrier '{base}': {self._store.get(f'{base}/error').decode()}")
            if self._store.check(arrived):
                return
            if time.monotonic() >= deadline:
                missing = [r for r in range(world) if not self._store.check([arrived[r]])]
                raise BarrierTimeoutError(
                    f"barrier '{base}' (prefix '{self.prefix}') timed out after {self.timeout_secs}s on rank {rank}: "
                    f"ranks {missing} of {world} never arrived"
                )
            time.sleep(_POLL_SECS)

    def report_error(self, message: str, key: str | None = None) -> None:
        base = self._next_key(key)
        self._store.set(f"{base}/error", f"rank {self.rank_info.global_rank} failed: {message}")

    def share(self, value: str | None, key: str) -> str:
        name = f"{self._next_key(key)}/value"
        if self.rank_info.global_rank == 0:
            self._store.set(name, value)
        self.execute_barrier(key)
        return self._store.get(name).decode()


def resolve_store_address(addr: str | None, port: int | None) -> tuple[str, int]:
    addr = addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    if port is None and os.environ.get(STORE_PORT_ENV):
        port = int(os.environ[STORE_PORT_ENV])
    if port is None:
        raise ValueError(
            f"TCPStoreBarrier needs a port: set barrier_args['master_port'] or the {STORE_PORT_ENV} environment variable"
        )
    return addr, int(port)


def host_barrier_store(barrier_config: "BarrierConfig", rank_info: RankInfo) -> Any:
    """On rank 0, serve the TCPStore that ``tcp_store`` barriers of every rank connect to; else None.

    The store lives in the training process (not in a writer subprocess), so a replaced writer finds it again.
    """
    if barrier_config.barrier_type != "tcp_store" or rank_info.global_rank != 0:
        return None
    from torch.distributed import TCPStore

    args = barrier_config.barrier_args
    addr, port = resolve_store_address(args.get("master_addr"), args.get("master_port"))
    return TCPStore(addr, port, rank_info.global_world_size, is_master=True, wait_for_workers=False,
                    timeout=timedelta(seconds=float(args.get("init_timeout_secs", 120.0))))


BARRIER_REGISTRY: dict[str, Callable[..., Barrier]] = {
    "dist": DistBarrier,
    "tcp_store": TCPStoreBarrier,
}


def register_barrier(name: str, factory: Callable[..., Barrier]) -> None:
    """Make ``factory(rank_info=..., **barrier_args)`` available as ``BarrierConfig(barrier_type=name)``."""
    BARRIER_REGISTRY[name] = factory


@dataclass
class BarrierConfig:
    """Which barrier the ranks of one checkpoint meet at.

    Args:
        barrier_type: a name in ``BARRIER_REGISTRY`` (``"dist"``, ``"tcp_store"``), or None for no barrier.
        barrier_args: keyword arguments of that barrier (``tcp_store``: ``master_port``, ``master_addr``,
            ``prefix``, ``timeout_secs``, ``init_timeout_secs``).
    """

    barrier_type: str | None = None
    barrier_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.barrier_type is not None and self.barrier_type not in BARRIER_REGISTRY:
            raise ValueError(
                f"BarrierConfig.barrier_type must be one of {sorted(BARRIER_REGISTRY)} or None, got {self.barrier_type!r}"
            )
        timeout = self.barrier_args.get("timeout_secs")
        if timeout is not None and not float(timeout) > 0:  # NaN too
            raise ValueError(f"BarrierConfig.barrier_args['timeout_secs'] must be > 0, got {timeout}")


def create_barrier_from_config(config: BarrierConfig | None, rank_info: RankInfo) -> Barrier | None:
    """Build the barrier ``config`` names, or None when it names none."""
    if config is None or config.barrier_type is None:
        return None
    return BARRIER_REGISTRY[config.barrier_type](rank_info=rank_info, **config.barrier_args)
