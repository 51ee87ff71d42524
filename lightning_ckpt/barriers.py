"""Barriers that synchronise the ranks writing one checkpoint: over torch.distributed or over a TCPStore."""

from __future__ import annotations

import abc
import contextlib
import inspect
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from lightning_ckpt.config_fields import AT_LEAST_ONE, TIMEOUT, Range, check_call_args, check_fields
from lightning_ckpt.errors import BarrierPeerError, BarrierTimeoutError, CheckpointError
from lightning_ckpt.types import RankInfo

log = logging.getLogger(__name__)

STORE_PORT_ENV = "LIGHTNING_CKPT_STORE_PORT"
_POLL_SECS = 0.005
_ARRIVED = 1  # a TCPStoreBarrier rank's place in a round, once it arrived there
_CLOSED = "-1"  # ... closed before it arrived (it failed, or a peer gave up waiting): adding 1 never reads _ARRIVED

# Names this project used before it took the seed's; still accepted in BarrierConfig and create_barrier_from_config.
_TYPE_ALIASES = {"dist": "dist_barrier"}
_ARG_ALIASES = {
    "master_port": "tcpstore_port",
    "master_addr": "master_address",
    "prefix": "barrier_prefix",
    "init_timeout_secs": "timeout_barrier_init_secs",
}


class Barrier(abc.ABC):
    """Blocks until every rank of the checkpoint reached the same barrier.

    Any object with an ``execute_barrier()`` method counts as a ``Barrier`` (``isinstance`` checks the method).
    """

    @abc.abstractmethod
    def execute_barrier(self) -> None:
        """Returns once every rank reached this barrier."""

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        if cls is Barrier and any("execute_barrier" in vars(base) for base in other.__mro__):
            return True
        return NotImplemented


class KeyedBarrier(Barrier):
    """Ours: a barrier whose points may be named, and which can tell the peers that this rank failed."""

    @abc.abstractmethod
    def execute_barrier(self, key: str | None = None) -> None:
        """Returns once every rank reached barrier point ``key`` (None: the next in sequence)."""

    @abc.abstractmethod
    def report_error(self, message: str, key: str | None = None) -> None:
        """Makes the peers waiting at ``key`` fail at once with ``BarrierPeerError`` carrying ``message``."""

    def share(self, value: str | None, key: str) -> str:
        """Meets at barrier point ``key``; every rank returns the ``value`` rank 0 passed (the others pass None).

        The writer shares the unguessable name of a checkpoint's temp directory this way.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot share values between ranks")


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


BARRIER_REGISTRY: dict[str, type] = {}


def register_barrier(barrier_class: type) -> type:
    """Class decorator: makes ``barrier_class`` available as ``BarrierConfig(barrier_type=barrier_class.barrier_type)``.

    Returns the class unchanged; a class without a ``barrier_type`` attribute is not registered.
    """
    name = getattr(barrier_class, "barrier_type", None)
    if name is not None:
        BARRIER_REGISTRY[name] = barrier_class
    return barrier_class


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


@register_barrier
class TCPStoreBarrier(KeyedBarrier):
    """A barrier over a TCPStore, usable from any thread or process (the writer subprocess uses it).

    Barrier points are sequence-numbered per prefix, as in PyTorch's: the n-th ``execute_barrier()`` meets at
    ``<barrier_prefix><n>``; ours may also be named (``execute_barrier(key=...)`` meets at ``<barrier_prefix>/<key>``).
    Better than PyTorch's: a failing rank's ``report_error`` makes its peers raise ``BarrierPeerError`` at once
    instead of waiting; the wait is bounded by ``timeout_secs`` and a timeout raises ``BarrierTimeoutError`` naming
    prefix, sequence, round, the missing ranks and the last barrier each of them reached. And a point met again (the
    same key twice, or a rebuilt barrier on the same store and prefix, whose sequence restarts) waits for every rank
    again, where PyTorch's returns at once: each meeting at a point is a round of its own, a rank's n-th arrival
    there meeting the others' n-th, with one place per rank (a second caller acting as a waiting rank is refused, not
    counted as another rank) and its own error and shared value, so those of an earlier round are never seen. A
    round completes for every rank or for none: a rank arriving late at a round a peer gave up on fails at once.

    Args:
        global_rank: this rank.
        global_world_size: the number of ranks that meet at each barrier.
        barrier_prefix: namespace of the keys, so several checkpointers can share a store.
        timeout_barrier_init_secs: how long creating or reaching the store may take.
        use_checkpoint_barrier_tcpstore_libuv: kept for PyTorch's signature; the store uses torch's default backend.
        tcpstore_port: port of the store (default: the ``LIGHTNING_CKPT_STORE_PORT`` environment variable).
        master_address: host of the store (default: ``MASTER_ADDR``, else 127.0.0.1).
        timeout_secs: how long one barrier waits for its peers.
        is_master: ours: whether this barrier serves the store; default: rank 0 does (as PyTorch's). The
            checkpointer's writers pass False: the training process of rank 0 serves it (``host_barrier_store``).
        store: ours: an existing store to use instead of creating one.
        rank_info: ours: ``global_rank`` and ``global_world_size`` as one ``RankInfo``.
    """

    barrier_type = "tcp_store"
    needs_main_thread = False

    def __init__(self, global_rank: int | None = None, global_world_size: int | None = None,
                 barrier_prefix: str = "lightning_ckpt", timeout_barrier_init_secs: float = 120.0,
                 use_checkpoint_barrier_tcpstore_libuv: bool = True, tcpstore_port: int | None = None,
                 master_address: str | None = None, timeout_secs: float = 600.0, *, is_master: bool | None = None,
                 store: Any = None, rank_info: RankInfo | None = None) -> None:
        if rank_info is not None:
            global_rank = rank_info.global_rank if global_rank is None else global_rank
            global_world_size = rank_info.global_world_size if global_world_size is None else global_world_size
        if global_rank is None or global_world_size is None:
            raise ValueError(
                f"TCPStoreBarrier needs global_rank and global_world_size, got {global_rank!r}, {global_world_size!r}"
            )
        self.global_rank, self.global_world_size = int(global_rank), int(global_world_size)
        self.barrier_prefix = barrier_prefix
        self.timeout_secs = float(timeout_secs)
        self.use_checkpoint_barrier_tcpstore_libuv = use_checkpoint_barrier_tcpstore_libuv
        self._seq: Counter = Counter()
        if store is None:
            is_master = self.global_rank == 0 if is_master is None else is_master
            store = self._connect(master_address, tcpstore_port, timeout_barrier_init_secs, is_master)
        self._store = store

    def _connect(self, addr: str | None, port: int | None, init_secs: float, is_master: bool) -> Any:
        import torch.distributed as dist

        addr, port = resolve_store_address(addr, port)
        log.debug("TCPStoreBarrier rank %d: %s the store at %s:%d (prefix %r)", self.global_rank,
                  "serving" if is_master else "connecting to", addr, port, self.barrier_prefix)
        try:
            return dist.TCPStore(addr, port, world_size=self.global_world_size,
                                 timeout=timedelta(seconds=init_secs), is_master=is_master)
        except Exception as e:
            raise CheckpointError(
                f"TCPStoreBarrier (rank {self.global_rank}, prefix '{self.barrier_prefix}') could not "
                f"{'serve' if is_master else 'reach'} the store at {addr}:{port} within {init_secs}s: {e}"
            ) from e

    def _point(self, key: str | None) -> tuple[str, str]:
        """Returns (keys of the next barrier point, its sequence label) and advances the sequence."""
        if key is not None:
            return f"{self.barrier_prefix}/{key}", key
        seq = self._seq[self.barrier_prefix]
        self._seq[self.barrier_prefix] += 1
        return f"{self.barrier_prefix}{seq}", str(seq)

    def execute_barrier(self, key: str | None = None) -> None:
        self._meet(*self._point(key))

    def report_error(self, message: str, key: str | None = None) -> None:
        """Takes this rank's place in its next round at ``key`` as failed: the peers of that round raise
        ``BarrierPeerError`` carrying ``message`` (call it instead of ``execute_barrier`` there, as ``DistBarrier``)."""
        point, _ = self._point(key)
        meeting = self._next_round(point)
        self._store.set(meeting.error_key, f"rank {self.global_rank} failed: {message}")  # first: read with the place
        self._store.compare_set(meeting.place(self.global_rank), "", _CLOSED)

    def share(self, value: str | None, key: str) -> str:
        meeting = self._meet(*self._point(key), value=value, sharing=True)
        return self._store.get(meeting.value_key).decode()

    def _meet(self, point: str, label: str, value: str | None = None, sharing: bool = False) -> _Round:
        """Arrives at ``point`` in this rank's next round there and waits for the other ranks; returns the round."""
        import torch.distributed.elastic.utils.store as store_util

        self._store.set(f"rank{self.global_rank}", label)  # the last barrier each rank reached, for timeouts
        meeting = self._next_round(point, refuse_duplicate=True)
        try:
            if sharing and self.global_rank == 0:
                self._store.set(meeting.value_key, value)  # before the place: whoever sees the round complete finds it
            if int(self._store.add(meeting.place(self.global_rank), 1)) != _ARRIVED:
                raise BarrierPeerError(self._failure(meeting, label, [self.global_rank]))
            self._wait_for_peers(meeting, label)
        except (BarrierPeerError, BarrierTimeoutError):
            raise
        except BaseException as e:
            with contextlib.suppress(Exception):  # the store may be what failed
                self._close_round(meeting, f"rank {self.global_rank} stopped waiting ({type(e).__name__}: {e})")
            raise
        # every rank arrived: PyTorch's store barrier for this round returns at once
        store_util.barrier(store=self._store, world_size=self.global_world_size, key_prefix=meeting.pytorch_prefix)
        return meeting

    def _next_round(self, point: str, refuse_duplicate: bool = False) -> _Round:
        """Takes this rank's next round at ``point``: its n-th arrival there meets the other ranks' n-th.

        With ``refuse_duplicate``, a second caller acting as this rank, while this rank's arrival in the previous round
        still waits there, is refused (CheckpointError) and takes no round, instead of waiting for a later one.
        """
        counter = _arrivals_key(point, self.global_rank)
        meeting = _Round(point, int(self._store.add(counter, 1)) - 1, self.global_world_size)
        if refuse_duplicate and meeting.number > 0:
            earlier = _Round(point, meeting.number - 1, self.global_world_size)
            if self._still_waiting(earlier):
                self._store.add(counter, -1)  # give the round back: the waiting arrival's next one takes it
                raise CheckpointError(
                    f"rank {self.global_rank} reached barrier point '{point}' again while its arrival in round "
                    f"{earlier.number} still waits for the other ranks: two callers act as rank {self.global_rank} "
                    f"(threads, processes, or barriers on the same store with barrier_prefix '{self.barrier_prefix}')"
                )
        return meeting

    def _still_waiting(self, meeting: _Round) -> bool:
        """Whether this rank arrived in ``meeting`` and that round is neither complete nor failed."""
        own = meeting.place(self.global_rank)
        if self._store.check(meeting.places) or self._store.check([meeting.error_key]) or not self._store.check([own]):
            return False
        return int(self._store.get(own)) == _ARRIVED

    def _wait_for_peers(self, meeting: _Round, label: str) -> None:
        rank, world = self.global_rank, self.global_world_size
        deadline = time.monotonic() + self.timeout_secs
        while True:
            if self._store.check(meeting.places):
                failed = [r for r, v in enumerate(self._store.multi_get(meeting.places)) if int(v) != _ARRIVED]
                if not failed:
                    return
                raise BarrierPeerError(self._failure(meeting, label, failed))
            if self._store.check([meeting.error_key]):
                raise BarrierPeerError(self._failure(meeting, label))
            if time.monotonic() >= deadline:
                missing = self._close_round(meeting, f"rank {rank} gave up waiting after {self.timeout_secs}s")
                if not missing:
                    continue  # the last ranks arrived just in time
                raise BarrierTimeoutError(
                    f"{self._describe(meeting, label)} timed out after {self.timeout_secs}s on rank {rank}: ranks "
                    f"{missing} of {world} never arrived ({self._last_reached(meeting, missing)})"
                )
            time.sleep(_POLL_SECS)

    def _close_round(self, meeting: _Round, reason: str) -> list[int]:
        """Closes the places of the ranks not arrived in ``meeting``, so that the round fails for every rank, late
        ones included, and records ``reason``; returns those ranks (none: the round completed after all)."""
        missing = [r for r in range(meeting.world)
                   if int(self._store.compare_set(meeting.place(r), "", _CLOSED)) != _ARRIVED]
        if missing:  # a failure a rank reported stays the round's error
            self._store.compare_set(meeting.error_key, "", f"{reason}; ranks {missing} had not arrived")
        return missing

    def _describe(self, meeting: _Round, label: str) -> str:
        return f"barrier '{meeting.point}' (prefix '{self.barrier_prefix}', sequence {label}, round {meeting.number})"

    def _failure(self, meeting: _Round, label: str, failed: list[int] | None = None) -> str:
        """Why ``meeting`` failed: the error recorded there, else which ranks' places were closed."""
        if self._store.check([meeting.error_key]):
            return f"{self._describe(meeting, label)}: {self._store.get(meeting.error_key).decode()}"
        return f"{self._describe(meeting, label)}: a peer gave up waiting for ranks {failed} before they arrived"

    def _last_reached(self, meeting: _Round, ranks: list[int]) -> str:
        parts = []
        for r in ranks:
            try:
                last = self._store.get(f"rank{r}").decode() if self._store.check([f"rank{r}"]) else None
                joined = int(self._store.add(_arrivals_key(meeting.point, r), 0))
            except Exception:  # noqa: BLE001 - only for the message
                last, joined = "?", "?"
            reached = f"last reached {last!r}" if last is not None else "reached none"
            parts.append(f"rank {r} {reached}, joined {joined} of {meeting.number + 1} rounds here")
        return "; ".join(parts)


@dataclass(frozen=True)
class _Round:
    """The store keys of one round at a barrier point: a place per rank, the round's error, rank 0's shared value.

    A place is written once per rank and round: ``_ARRIVED`` when the rank arrives first, ``_CLOSED`` when the rank
    reported a failure or a peer gave up waiting before it came (it then never reads ``_ARRIVED``). So a round
    either completes for every rank or for none.
    """

    point: str
    number: int
    world: int

    def place(self, rank: int) -> str:
        return f"{self.point}/{self.number}/arrived/{rank}"

    @property
    def places(self) -> list[str]:
        return [self.place(r) for r in range(self.world)]

    @property
    def error_key(self) -> str:
        return f"{self.point}/{self.number}/error"

    @property
    def value_key(self) -> str:
        return f"{self.point}/{self.number}/value"

    @property
    def pytorch_prefix(self) -> str:
        """Key prefix of PyTorch's store barrier in this round; round 0 uses the point itself, as PyTorch's does."""
        return self.point if self.number == 0 else f"{self.point}/{self.number}"


def _arrivals_key(point: str, rank: int) -> str:
    """How many rounds ``rank`` joined at ``point`` (arrived in, or reported a failure in)."""
    return f"{point}/arrivals/{rank}"


def resolve_store_address(addr: str | None, port: int | None) -> tuple[str, int]:
    """Fills a missing host from ``MASTER_ADDR`` (else 127.0.0.1) and a missing port from ``LIGHTNING_CKPT_STORE_PORT``."""
    addr = addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    if port is None and os.environ.get(STORE_PORT_ENV):
        port = int(os.environ[STORE_PORT_ENV])
    if port is None:
        raise ValueError(
            f"TCPStoreBarrier needs a port: set barrier_args['tcpstore_port'] or the {STORE_PORT_ENV} environment "
            "variable"
        )
    return addr, int(port)


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
        check_call_args(BARRIER_REGISTRY[self.barrier_type], canonical_barrier_args(self.barrier_args),
                        "BarrierConfig.barrier_args", _BARRIER_ARG_RANGES)


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
