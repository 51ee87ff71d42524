"""``CheckpointerConfig``: the one config tree (dataclasses only, so LightningCLI can build it from YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
        if self.max_in_flight < 1:
            raise ValueError(f"CheckpointerConfig.max_in_flight must be >= 1, got {self.max_in_flight}")
        if not self.wait_timeout_secs > 0:  # NaN too
            raise ValueError(f"CheckpointerConfig.wait_timeout_secs must be > 0, got {self.wait_timeout_secs}")
        budget = self.staging_config.budget_bytes
        if budget is not None and self.max_in_flight > 1 and self.staging_config.use_shared_memory is False:
            raise ValueError("CheckpointerConfig: the async checkpointer needs staging_config.use_shared_memory=True")
