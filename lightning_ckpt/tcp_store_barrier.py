"""``TCPStoreBarrier``: a barrier over a TCPStore, usable from any thread or process (the writer subprocess).

Registered as ``BarrierConfig(barrier_type="tcp_store")`` and exported from ``lightning_ckpt.barriers``, where
PyTorch's design keeps it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from lightning_ckpt.barrier_base import KeyedBarrier, register_barrier
from lightning_ckpt.errors import BarrierPeerError, BarrierTimeoutError, CheckpointError
from lightning_ckpt.types import RankInfo

log = logging.getLogger("lightning_ckpt.barriers")

STORE_PORT_ENV = "LIGHTNING_CKPT_STORE_PORT"
_POLL_SECS = 0.005
_ARRIVED = 1  # a TCPStoreBarrier rank's place in a round, once it arrived there
_CLOSED = "-1"  # ... closed before it arrived (it failed, or a peer gave up waiting): adding 1 never reads _ARRIVED


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
    round completes for every rank or for none: a rank arriving late at a round a peer gave up on fails at once, and
    its next arrival meets its peers' next one. So each rank must take every round at a point it meets again:
    arrive (``execute_barrier``/``share``) or report a failure instead (``report_error``, which takes the round);
    after ``execute_barrier`` raised, that round already failed for every rank and takes no report. A rank that
    skips a meeting at a reused point meets its peers one round apart from then on; points named per save (as the
    writer's are) are never met again.

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
        ``BarrierPeerError`` carrying ``message`` (call it instead of ``execute_barrier`` there, as ``DistBarrier``;
        not after ``execute_barrier`` at ``key`` raised: that round already failed for every rank)."""
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
                reason = f"rank {self.global_rank} stopped waiting ({type(e).__name__}: {e})"
                if not self._close_round(meeting, reason):
                    self._check_in(meeting)  # every rank had arrived: the round is complete for the others
            raise
        # every rank arrived: PyTorch's store barrier for this round returns at once (called as PyTorch's does)
        try:
            store_util.barrier(store=self._store, world_size=self.global_world_size,
                               key_prefix=meeting.pytorch_prefix)
        except Exception as e:  # noqa: BLE001 - torch raises its store's own errors here
            raise BarrierTimeoutError(
                f"{self._describe(meeting, label)}: every rank arrived, but not every rank finished it on rank "
                f"{self.global_rank}: {type(e).__name__}: {e}") from e
        return meeting

    def _check_in(self, meeting: _Round) -> None:
        """This rank's arrival in PyTorch's store barrier of ``meeting``, without waiting there: a rank that fails
        after every rank arrived leaves its peers nothing to wait for (PyTorch's barrier would hold them 300 s)."""
        import torch.distributed.elastic.utils.store as store_util

        check_in = getattr(store_util, "_barrier_nonblocking", None)  # private in torch 2.13; absent: they wait
        if check_in is not None:
            check_in(store=self._store, world_size=self.global_world_size, key_prefix=meeting.pytorch_prefix)

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
