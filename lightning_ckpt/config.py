"""``CheckpointerConfig``: the one config tree (dataclasses only, so LightningCLI can build it from YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from lightning_ckpt.barriers import BarrierConfig
from lightning_ckpt.checkpoint_process import CheckpointProcessConfig
from lightning_ckpt.checkpoint_writer import CheckpointWriterConfig
from lightning_ckpt.config_fields import AT_LEAST_ONE, TIMEOUT, Range, as_config, check_fields
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

    FIELD_RANGES: ClassVar[dict[str, Range]] = {"max_in_flight": AT_LEAST_ONE, "wait_timeout_secs": TIMEOUT}

    def __post_init__(self) -> None:
        for name, cls in _SUB_CONFIGS.items():
            setattr(self, name, as_config(cls, getattr(self, name), f"CheckpointerConfig.{name}"))
        check_fields(self)

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
