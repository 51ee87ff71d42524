"""``CheckpointerConfig``: the one config tree (dataclasses only, so LightningCLI can build it from YAML)."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

from lightning_ckpt.barriers import BarrierConfig
from lightning_ckpt.checkpoint_process import CheckpointProcessConfig
from lightning_ckpt.checkpoint_writer import CheckpointWriterConfig
from lightning_ckpt.staging import CheckpointStagerConfig


@dataclass
class CheckpointerConfig:
    """Everything a checkpointer is built from.

    Args:
        writer_config: fsync and cleanup of the writer.
        barrier_config: where the ranks of a multi-rank checkpoint meet (None type: chosen by the factory).
        staging_config: staging buffers (async staging, pinned/shared memory, budget).
        process_config: timeouts of the writer subprocess.
        max_in_flight: async saves that may be pending at once; each holds one staging buffer.
        wait_timeout_secs: longest wait for a pending save (in ``save``, ``wait``, ``load`` and ``close``).
        verify_on_load: check checksums when loading.
    """

    writer_config: CheckpointWriterConfig = field(default_factory=CheckpointWriterConfig)
    barrier_config: BarrierConfig = field(default_factory=BarrierConfig)
    staging_config: CheckpointStagerConfig = field(default_factory=CheckpointStagerConfig)
    process_config: CheckpointProcessConfig = field(default_factory=CheckpointProcessConfig)
    max_in_flight: int = 1
    wait_timeout_secs: float = 3600.0
    verify_on_load: bool = True

    def __post_init__(self) -> None:
        for name, cls in _SUB_CONFIGS.items():
            setattr(self, name, _sub_config(name, getattr(self, name), cls))
        _check_number("max_in_flight", self.max_in_flight, int)
        _check_number("wait_timeout_secs", self.wait_timeout_secs, float)
        if not isinstance(self.verify_on_load, bool):
            raise ValueError(f"CheckpointerConfig.verify_on_load must be a bool, got {self.verify_on_load!r}")
        if self.max_in_flight < 1:
            raise ValueError(f"CheckpointerConfig.max_in_flight must be >= 1, got {self.max_in_flight}")
        if not 0 < self.wait_timeout_secs <= threading.TIMEOUT_MAX:  # NaN and inf too (a wait could not be bounded)
            raise ValueError(f"CheckpointerConfig.wait_timeout_secs must be > 0 and at most {threading.TIMEOUT_MAX:.0f},"
                             f" got {self.wait_timeout_secs}")

    def check_async(self, where: str = "CheckpointerConfig") -> None:
        """Refuse what the async checkpointer cannot run with (its writer process maps the staging memory).

        Raises:
            ValueError: ``staging_config.use_shared_memory`` is False.
        """
        if self.staging_config.use_shared_memory is False:
            raise ValueError(f"{where}: the async checkpointer needs staging_config.use_shared_memory=True (its writer "
                             "process reads the staged tensors from shared memory), got False")


_SUB_CONFIGS: dict[str, type] = {"writer_config": CheckpointWriterConfig, "barrier_config": BarrierConfig,
                                 "staging_config": CheckpointStagerConfig, "process_config": CheckpointProcessConfig}


def _sub_config(name: str, value: Any, cls: type) -> Any:
    """``value`` as a ``cls``: a dict (from YAML) is converted; anything else is refused naming the field."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"CheckpointerConfig.{name} has unknown keys {unknown}; {cls.__name__} takes "
                             f"{sorted(known)}")
        return cls(**value)
    raise ValueError(f"CheckpointerConfig.{name} must be a {cls.__name__} (or a dict of its fields), "
                     f"got {value!r}")


def _check_number(name: str, value: Any, kind: type) -> None:
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise ValueError(f"CheckpointerConfig.{name} must be {'an int' if kind is int else 'a number'}, "
                         f"got {value!r}")
