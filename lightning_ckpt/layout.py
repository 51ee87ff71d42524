"""On-disk names of a checkpoint: record and marker names, the rank file name, the temp name pattern."""

from __future__ import annotations

# Record inside every checkpoint file (a torch zip) that holds our per-record checksums.
CHECKSUM_RECORD = "lightning_ckpt/checksums.json"
# Commit marker of a checkpoint directory, written last by rank 0.
MANIFEST_NAME = "MANIFEST.json"
# One file per rank inside a checkpoint directory (the layout of torch's ``_experimental`` writer).
RANK_FILE_TEMPLATE = "checkpoint_{rank}.pt"
# Every temp name starts with this (``.lckpt-<16 hex>.tmp``, see ``commit.is_temp_name``); scans skip such names.
TMP_MARKER = ".lckpt-"
# Format version of CHECKSUM_RECORD and MANIFEST_NAME.
FORMAT_VERSION = 1
# CheckpointWriterConfig.layout values: a directory of rank files plus manifest, or one file (one rank).
LAYOUT_DIR = "dir"
LAYOUT_FILE = "file"


def rank_file_name(rank: int) -> str:
    return RANK_FILE_TEMPLATE.format(rank=rank)
