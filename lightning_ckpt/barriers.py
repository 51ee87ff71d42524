"""Barriers that synchronise the ranks writing one checkpoint: over torch.distributed or over a TCPStore."""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from lightning_ckpt.barrier_base import (
    BARRIER_REGISTRY, Barrier, KeyedBarrier, barrier_report_error, barrier_wait, register_barrier,
)
from lightning_ckpt.config_fields import AT_LEAST_ONE, TIMEOUT, Range, check_call_args, check_fields, coerce_int_args
from lightning_ckpt.errors import BarrierPeerError, BarrierTimeoutError
from lightning_ckpt.tcp_store_barrier import STORE_PORT_ENV, TCPStoreBarrier, resolve_store_address
from lightning_ckpt.types import RankInfo

log = logging.getLogger(__name__)

__all__ = [
    "BARRIER_REGISTRY", "Barrier", "BarrierConfig", "DistBarrier", "KeyedBarrier", "STORE_PORT_ENV", "TCPStoreBarrier",
    "barrier_report_error", "barrier_wait", "canonical_barrier_args", "create_barrier_from_config",
    "host_barrier_store", "needs_main_thread", "register_barrier", "resolve_store_address", "tcp_store_port",
]

# Names this project used before it took the seed's; still accepted in BarrierConfig and create_barrier_from_config.
_TYPE_ALIASES = {"dist": "dist_barrier"}
_ARG_ALIASES = {
    "master_port": "tcpstore_port",
    "master_addr": "master_address",
    "prefix": "barrier_prefix",
    "init_timeout_secs": "timeout_barrier_init_secs",
}


@register_barrier
class DistBarrier(KeyedBarrier):
    """A barrier over the default ``torch.distributed`` group; call it from the main thread only.

    Better than a bare ``dist.barrier()``: each rank contributes ok/failed through one ``all_gather``, so a rank
    whose write failed releases its peers with ``BarrierPeerError`` naming it instead of leaving them hanging; the
    wait is bounded by ``timeout_secs`` (not the process group's timeout), and a timeout or a vanished peer raises
    an error naming the ranks that never arrived (recorded in the process group's store). Without an initialized
    process group (a single process) it returns at once.

    Args:
        timeout_secs: how long one barrier waits for its peers.
        rank_info: accepted for symmetry with the other barriers; the ranks come from the process group.
    """

    barrier_type = "dist_barrier"
    needs_main_thread = True  # it runs collectives

    def __init__(self, timeout_secs: float = 600.0, *, rank_info: RankInfo | None = None) -> None:
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
        name = self._name(key)

        def value_key(rounds: int) -> str:  # one per round at ``name``: a later share there never overwrites it
            return f"{name}/value/{rounds}"

        if dist.get_rank() == 0:  # for the round its vote is about to join (``_vote`` counts the rounds per rank)
            store.set(value_key(store.add(f"{name}/arrived/0", 0) + 1), value)
        self.execute_barrier(key)
        return store.get(value_key(store.add(f"{name}/arrived/{dist.get_rank()}", 0))).decode()

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


def canonical_barrier_args(barrier_args: dict[str, Any]) -> dict[str, Any]:
    """Returns ``barrier_args`` with this project's former names replaced by PyTorch's (``master_port`` ->
    ``tcpstore_port``, ...); ValueError when both spellings of one argument are given."""
    out = dict(barrier_args)
    for old, new in _ARG_ALIASES.items():
        if old in out:
            if new in out:
                raise ValueError(f"BarrierConfig.barrier_args gives both {old!r} and {new!r}; keep {new!r}")
            out[new] = out.pop(old)
    return out


def tcp_store_port(barrier_config: BarrierConfig | None) -> int | None:
    """The store port a ``tcp_store`` config names (either spelling), or None."""
    if barrier_config is None:
        return None
    return canonical_barrier_args(barrier_config.barrier_args).get("tcpstore_port")


def needs_main_thread(barrier_config: BarrierConfig | None) -> bool:
    """Whether the barrier ``barrier_config`` names runs collectives (so it cannot live in the writer process)."""
    if barrier_config is None or barrier_config.barrier_type is None:
        return False
    return bool(getattr(BARRIER_REGISTRY.get(barrier_config.barrier_type), "needs_main_thread", False))


def host_barrier_store(barrier_config: BarrierConfig, rank_info: RankInfo) -> Any:
    """On rank 0, serve the TCPStore that ``tcp_store`` barriers of every rank connect to; else None.

    The store lives in the training process (not in a writer subprocess), so a replaced writer finds it again.
    """
    if barrier_config.barrier_type != "tcp_store" or rank_info.global_rank != 0:
        return None
    from torch.distributed import TCPStore

    args = canonical_barrier_args(barrier_config.barrier_args)
    addr, port = resolve_store_address(args.get("master_address"), args.get("tcpstore_port"))
    return TCPStore(addr, port, rank_info.global_world_size, is_master=True, wait_for_workers=False,
                    timeout=timedelta(seconds=float(args.get("timeout_barrier_init_secs", 120.0))))


@dataclass
class BarrierConfig:
    """Which barrier the ranks of one checkpoint meet at.

    Args:
        barrier_type: a name in ``BARRIER_REGISTRY`` (``"dist_barrier"``, ``"tcp_store"``, or a class added with
            ``register_barrier``), or None for no barrier. ``"dist"`` is accepted for ``"dist_barrier"``.
        barrier_args: keyword arguments of that barrier's constructor (``tcp_store``: ``tcpstore_port``,
            ``master_address``, ``barrier_prefix``, ``timeout_secs``, ``timeout_barrier_init_secs``, ...).
    """

    barrier_type: str | None = None
    barrier_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)
        self.barrier_type = _TYPE_ALIASES.get(self.barrier_type, self.barrier_type)
        if self.barrier_type is None:
            return
        if self.barrier_type not in BARRIER_REGISTRY:
            raise ValueError(
                f"BarrierConfig.barrier_type must be one of {sorted(BARRIER_REGISTRY)} or None, got {self.barrier_type!r}"
            )
        barrier_class = BARRIER_REGISTRY[self.barrier_type]
        self.barrier_args = coerce_int_args(barrier_class, self.barrier_args, _ARG_ALIASES)  # "29600" -> 29600
        check_call_args(barrier_class, canonical_barrier_args(self.barrier_args), "BarrierConfig.barrier_args",
                        _BARRIER_ARG_RANGES)


_BARRIER_ARG_RANGES = {"timeout_secs": TIMEOUT, "timeout_barrier_init_secs": TIMEOUT,
                       "tcpstore_port": Range(ge=0, le=65535), "global_rank": Range(ge=0),
                       "global_world_size": AT_LEAST_ONE}


def create_barrier_from_config(barrier_config: BarrierConfig | None,
                               rank_info: RankInfo | None = None) -> Barrier | None:
    """Builds the barrier ``barrier_config`` names: ``cls(**barrier_args)``; None when it names none.

    Args:
        barrier_config: which barrier, with its constructor arguments.
        rank_info: ours: the ranks of a checkpointer's writer. They fill ``global_rank``/``global_world_size`` (or
            ``rank_info``) where the class takes them and ``barrier_args`` does not give them, and a ``tcp_store``
            barrier then connects to the store that ``host_barrier_store`` serves instead of serving one itself.

    Raises:
        ValueError: the type is not registered.
    """
    if barrier_config is None or barrier_config.barrier_type is None:
        return None
    barrier_type = _TYPE_ALIASES.get(barrier_config.barrier_type, barrier_config.barrier_type)
    if barrier_type not in BARRIER_REGISTRY:
        raise ValueError(f"unknown barrier type {barrier_type!r}; registered: {sorted(BARRIER_REGISTRY)}")
    cls = BARRIER_REGISTRY[barrier_type]
    args = canonical_barrier_args(barrier_config.barrier_args)
    if rank_info is not None:
        params = inspect.signature(cls).parameters
        if "global_rank" in params and "global_world_size" in params:
            args.setdefault("global_rank", rank_info.global_rank)
            args.setdefault("global_world_size", rank_info.global_world_size)
        elif "rank_info" in params:
            args.setdefault("rank_info", rank_info)
        if issubclass(cls, TCPStoreBarrier):
            args.setdefault("is_master", False)
    return cls(**args)
