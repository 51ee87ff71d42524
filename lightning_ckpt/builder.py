"""Factories with defaults that work anywhere: ``make_sync_checkpointer`` and ``make_async_checkpointer``."""

from __future__ import annotations

import dataclasses
import socket

from lightning_ckpt.barriers import BarrierConfig, create_barrier_from_config, tcp_store_port
from lightning_ckpt.checkpoint_process import CheckpointProcess
from lightning_ckpt.checkpoint_reader import CheckpointReader
from lightning_ckpt.checkpoint_writer import CheckpointWriter, WriterHook
from lightning_ckpt.checkpointer import AsyncCheckpointer, SyncCheckpointer
from lightning_ckpt.config import CheckpointerConfig
from lightning_ckpt.error_store import ErrorStore
from lightning_ckpt.staging import DefaultStager
from lightning_ckpt.types import RankInfo


def make_sync_checkpointer(config: CheckpointerConfig | None = None, rank_info: RankInfo | None = None,
                           commit_hook: WriterHook | None = None) -> SyncCheckpointer:
    """A checkpointer that writes in the caller's thread.

    Args:
        config: the config tree; defaults throughout when None.
        rank_info: defaults to the ``torch.distributed`` rank when initialised, else ``RankInfo(0, 1)``.
        commit_hook: called around each commit.

    With several ranks and no barrier configured, the ``dist`` barrier is used (main thread only).
    """
    config = config or CheckpointerConfig()
    rank_info = rank_info or RankInfo.from_env()
    barrier_config = config.barrier_config
    if rank_info.global_world_size > 1 and barrier_config.barrier_type is None:
        barrier_config = BarrierConfig("dist")
    barrier = create_barrier_from_config(barrier_config, rank_info)
    writer = CheckpointWriter(config.writer_config, rank_info, barrier, commit_hook)
    return SyncCheckpointer(writer, CheckpointReader(rank_info, verify=config.verify_on_load))


def make_async_checkpointer(config: CheckpointerConfig | None = None, rank_info: RankInfo | None = None,
                            commit_hook: WriterHook | None = None, *,
                            error_store: ErrorStore | None = None) -> AsyncCheckpointer:
    """A checkpointer that stages into shared memory and writes in a persistent subprocess.

    Args:
        config: the config tree; defaults throughout when None.
        rank_info: defaults to the ``torch.distributed`` rank when initialised, else ``RankInfo(0, 1)``.
        commit_hook: a ``WriterHook`` importable by module path (it runs in the writer process).
        error_store: where failed saves wait to be raised (shared with the caller's layer); a private one if None.

    With several ranks and no barrier configured, a ``tcp_store`` barrier is used; when ``torch.distributed`` is
    initialised and no port is given, rank 0 picks a free port and broadcasts it (a collective: call this on
    every rank, from the main thread).
    """
    config = config or CheckpointerConfig()
    rank_info = rank_info or RankInfo.from_env()
    barrier_config = _async_barrier_config(config.barrier_config, rank_info)
    process = CheckpointProcess(rank_info, config.process_config, writer_config=config.writer_config,
                                barrier_config=barrier_config, commit_hook=commit_hook)
    return AsyncCheckpointer(DefaultStager(config.staging_config), process,
                             CheckpointReader(rank_info, verify=config.verify_on_load),
                             max_in_flight=config.max_in_flight, wait_timeout_secs=config.wait_timeout_secs,
                             error_store=error_store)


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
