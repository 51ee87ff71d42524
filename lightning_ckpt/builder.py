"""Factories with defaults that work anywhere: ``make_sync_checkpointer`` and ``make_async_checkpointer``."""

from __future__ import annotations

import dataclasses
import socket
from typing import Any, Callable

from lightning_ckpt.barriers import BarrierConfig, create_barrier_from_config, host_barrier_store, tcp_store_port
from lightning_ckpt.checkpoint_process import CheckpointProcess
from lightning_ckpt.checkpoint_reader import CheckpointReader
from lightning_ckpt.checkpoint_writer import CheckpointWriter, CheckpointWriterConfig, WriterHook
from lightning_ckpt.checkpointer import AsyncCheckpointer, SyncCheckpointer
from lightning_ckpt.config import CheckpointerConfig
from lightning_ckpt.error_store import ErrorStore
from lightning_ckpt.staging import DefaultStager
from lightning_ckpt.types import RankInfo


def make_sync_checkpointer(config: CheckpointerConfig | None = None, rank_info: RankInfo | None = None,
                           commit_hook: WriterHook | None = None) -> SyncCheckpointer:
    """A checkpointer that writes in the caller's thread (PyTorch's signature).

    Args:
        config: the config tree; defaults throughout when None.
        rank_info: defaults to the ``torch.distributed`` rank when initialised, else ``RankInfo(0, 1)``.
        commit_hook: called around each commit.

    With several ranks and no barrier configured, the ``dist_barrier`` is used (main thread only).
    """
    config = config or CheckpointerConfig()
    rank_info = rank_info or RankInfo.from_env()
    barrier_config = config.barrier_config
    if rank_info.global_world_size > 1 and barrier_config.barrier_type is None:
        barrier_config = BarrierConfig("dist_barrier")
    barrier = create_barrier_from_config(barrier_config, rank_info)
    writer = CheckpointWriter(config.writer_config, rank_info, barrier, commit_hook)
    return SyncCheckpointer(writer, CheckpointReader(rank_info, verify=config.verify_on_load))


def make_async_checkpointer(config: CheckpointerConfig | None = None, rank_info: RankInfo | None = None,
                            subprocess_init_fn: Callable[..., None] | None = None,
                            subprocess_init_args: tuple[Any, ...] = (),
                            checkpoint_writer_init_fn: Callable[..., Any] | None = None,
                            checkpoint_writer_init_args: dict[str, Any] | None = None, *,
                            commit_hook: WriterHook | None = None,
                            error_store: ErrorStore | None = None) -> AsyncCheckpointer:
    """A checkpointer that stages into shared memory and writes in a persistent subprocess (PyTorch's signature).

    Wires every part: the stager (``max_in_flight`` buffers, each buffer it frees unmapped by the writer), the
    writer process, the TCPStore the ranks' barrier meets at (served here on rank 0), the synchronous writer of
    saves that do not fit in staging memory, and the reader.

    Args:
        config: the config tree; defaults throughout when None.
        rank_info: defaults to the ``torch.distributed`` rank when initialised, else ``RankInfo(0, 1)``.
        subprocess_init_fn: run first in the writer process, with ``subprocess_init_args``.
        subprocess_init_args: its arguments (picklable).
        checkpoint_writer_init_fn: builds the writer in the writer process from ``checkpoint_writer_init_args``
            (see ``CheckpointProcess`` for what a custom one costs); None: ours, from ``config.writer_config``,
            the barrier and ``commit_hook``.
        checkpoint_writer_init_args: keyword arguments of ``checkpoint_writer_init_fn``.
        commit_hook: ours: a ``WriterHook`` importable by module path (it runs in the writer process).
        error_store: ours: where failed saves wait to be raised (shared with the caller's layer).

    With several ranks and no barrier configured, a ``tcp_store`` barrier is used; when ``torch.distributed`` is
    initialised and no port is given, rank 0 picks a free port and broadcasts it (a collective: call this on
    every rank, from the main thread).
    """
    config = config or CheckpointerConfig()
    config.check_async("make_async_checkpointer")
    rank_info = rank_info or RankInfo.from_env()
    barrier_config = _async_barrier_config(config.barrier_config, rank_info)
    if checkpoint_writer_init_fn is None:
        writer_args: dict[str, Any] = {"writer_config": config.writer_config, "barrier_config": barrier_config,
                                       "commit_hook": commit_hook}
    else:
        writer_args = {}
    process = CheckpointProcess(rank_info, config.process_config, subprocess_init_fn, subprocess_init_args,
                                checkpoint_writer_init_fn, checkpoint_writer_init_args, **writer_args)
    stager = DefaultStager(config.staging_config, max_buffers=config.max_in_flight,
                           on_buffer_closed=process.drop_buffer)
    store = host_barrier_store(barrier_config, rank_info) if barrier_config is not None else None
    fallback = _FallbackWriter(config.writer_config, rank_info, barrier_config, commit_hook)
    return AsyncCheckpointer(stager, process, CheckpointReader(rank_info, verify=config.verify_on_load),
                             max_in_flight=config.max_in_flight, wait_timeout_secs=config.wait_timeout_secs,
                             error_store=error_store, fallback_writer=fallback,
                             resources=(store,) if store is not None else ())


class _FallbackWriter:
    """Builds, on first need, the in-process writer of saves that do not fit in staging memory (picklable)."""

    def __init__(self, writer_config: CheckpointWriterConfig, rank_info: RankInfo,
                 barrier_config: BarrierConfig | None, commit_hook: WriterHook | None) -> None:
        self.writer_config = writer_config
        self.rank_info = rank_info
        self.barrier_config = barrier_config
        self.commit_hook = commit_hook

    def __call__(self) -> CheckpointWriter:
        barrier = create_barrier_from_config(self.barrier_config, self.rank_info)
        return CheckpointWriter(self.writer_config, self.rank_info, barrier, self.commit_hook)


def _async_barrier_config(barrier_config: BarrierConfig, rank_info: RankInfo) -> BarrierConfig | None:
    if rank_info.global_world_size == 1:
        return barrier_config if barrier_config.barrier_type is not None else None
    if barrier_config.barrier_type is None:
        barrier_config = BarrierConfig("tcp_store")
    if barrier_config.barrier_type == "tcp_store" and tcp_store_port(barrier_config) is None:
        port = _broadcast_free_port(rank_info)
        if port is not None:
            barrier_config = dataclasses.replace(
                barrier_config, barrier_args={**barrier_config.barrier_args, "tcpstore_port": port}
            )
    return barrier_config


def _broadcast_free_port(rank_info: RankInfo) -> int | None:
    import os

    import torch.distributed as dist

    from lightning_ckpt.barriers import STORE_PORT_ENV

    if os.environ.get(STORE_PORT_ENV) or not (dist.is_available() and dist.is_initialized()):
        return None
    port = [free_port() if rank_info.global_rank == 0 else None]
    dist.broadcast_object_list(port, src=0)
    return int(port[0])


def free_port() -> int:
    """A TCP port that was free a moment ago on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]
