"""Finding the newest complete checkpoint of a directory (for ``ckpt_path``) and matching filename patterns."""

from __future__ import annotations

import logging
import os
import re

from lightning_ckpt import layout
from lightning_ckpt.checkpoint_reader import CheckpointReader
from lightning_ckpt.errors import CheckpointError
from lightning_ckpt.checkpoint_file import read_checksum_record

log = logging.getLogger(__name__)

CKPT_SUFFIX = ".ckpt"


def pattern_regex(filename: str) -> re.Pattern:
    """A regex for the file names ``filename`` (``"step={step}"``, ``"{epoch}-{step}"``) produces, with groups."""
    parts = re.split(r"(\{step\}|\{epoch\})", filename)
    body = "".join(
        "(?P<step>\\d+)" if p == "{step}" else "(?P<epoch>\\d+)" if p == "{epoch}" else re.escape(p) for p in parts
    )
    return re.compile(f"^{body}{re.escape(CKPT_SUFFIX)}$")


def is_complete(path: str, verify: bool = False) -> bool:
    """True iff ``path`` is a committed checkpoint of ours: a readable zip holding its checksum record.

    Writes are atomic, so this is enough to rule out torn files; ``verify=True`` also reads and checks every tensor.
    """
    if layout.TMP_MARKER in os.path.basename(path) or not os.path.isfile(path):
        return False
    try:
        if read_checksum_record(path) is None:
            return False
        if verify:
            CheckpointReader(verify=True).read(path, weights_only=False)
    except (RuntimeError, OSError, ValueError, CheckpointError) as e:
        log.warning("skipping %s: not a complete checkpoint (%s)", path, e)
        return False
    return True


def matching_checkpoints(dirpath: str, filename: str) -> list[tuple[int, str]]:
    """``(step, path)`` of files in ``dirpath`` named by ``filename``, oldest first (temp names never match)."""
    regex = pattern_regex(filename)
    try:
        names = os.listdir(dirpath)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = regex.match(name)
        if match is None or layout.TMP_MARKER in name:
            continue
        groups = match.groupdict()
        key = int(groups.get("step") or 0), int(groups.get("epoch") or 0)
        found.append((key, os.path.join(dirpath, name)))
    found.sort(key=lambda kv: (kv[0], os.path.getmtime(kv[1])))
    return [(key[0], path) for key, path in found]


def find_latest_checkpoint(dirpath: str, filename: str = "step={step}", verify: bool = False) -> str | None:
    """The newest complete checkpoint in ``dirpath`` named by ``filename``, or None (usable as ``ckpt_path``)."""
    for _, path in reversed(matching_checkpoints(dirpath, filename)):
        if is_complete(path, verify=verify):
            return path
    return None
