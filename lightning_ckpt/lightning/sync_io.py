"""``SyncCheckpointIO``: Lightning saves written atomically, with checksums, before ``save_checkpoint`` returns."""

from __future__ import annotations

from lightning_ckpt.lightning.base_io import LightningCkptIO


class SyncCheckpointIO(LightningCkptIO):
    """A drop-in ``TorchCheckpointIO`` that writes in the training thread but never leaves a torn file.

    Same file format as ``AsyncCheckpointIO`` (``torch.load``-compatible plus checksums, verified on load); unlike
    ``TorchCheckpointIO`` a refused write (e.g. ``PermissionError``) is raised, never swallowed. Useful where a
    writer process is unwelcome, or as the baseline the async plugin is measured against.

    Args: see ``LightningCkptIO`` (``config``, ``error_policy``, ``commit_hook``).
    """
