"""Finding the newest complete checkpoint of a directory (for ``ckpt_path``) and matching filename patterns."""

from __future__ import annotations

import logging
import os
import re
from typing import Callable

from lightning_ckpt import layout, paths, remote_files
from lightning_ckpt.checkpoint_reader import CheckpointReader
from lightning_ckpt.errors import CheckpointError
from lightning_ckpt.checkpoint_file import read_checksum_record
from lightning_ckpt.paths import RemotePath

log = logging.getLogger(__name__)

CKPT_SUFFIX = ".ckpt"


def pattern_regex(filename: str) -> re.Pattern:
    """A regex for the file names ``filename`` (``"step={step}"``, ``"{epoch}-{step}"``) produces, with groups."""
    parts = re.split(r"(\{step\}|\{epoch\})", filename)
    body = "".join(
        "(?P<step>\\d+)" if p == "{step}" else "(?P<epoch>\\d+)" if p == "{epoch}" else re.escape(p) for p in parts
    )
    return re.compile(f"^{body}{re.escape(CKPT_SUFFIX)}$")


def is_complete(path: str, verify: bool = False, storage_options: dict | None = None) -> bool:
    """True iff ``path`` is a committed checkpoint of ours: a readable zip holding its checksum record.

    Writes are atomic, so this is enough to rule out torn files; ``verify=True`` also reads and checks every tensor.
    A remote object's record is read with one ranged GET of its tail (``verify`` downloads it).
    """
    location = paths.resolve(path, storage_options)
    if isinstance(location, RemotePath):
        return remote_files.is_complete(location, verify)
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


def matching_checkpoints(dirpath: str, filename: str,
                         storage_options: dict | None = None) -> list[tuple[int, str]]:
    """``(step, path)`` of files in ``dirpath`` (a local directory or a remote prefix) named by ``filename``,
    oldest first (temp names never match)."""
    regex = pattern_regex(filename)
    found = []
    for name, path, modified in _listing(dirpath, storage_options):
        match = regex.match(name)
        if match is None or layout.TMP_MARKER in name:
            continue
        groups = match.groupdict()
        key = int(groups.get("step") or 0), int(groups.get("epoch") or 0)
        found.append((key, modified(), path))
    found.sort(key=lambda kv: kv[:2])
    return [(key[0], path) for key, _, path in found]


def _listing(dirpath: str, storage_options: dict | None) -> list[tuple[str, str, Callable[[], float]]]:
    """``(name, path, modified)`` of the entries of a local directory or of a remote prefix."""
    location = paths.resolve(dirpath, storage_options)
    if isinstance(location, RemotePath):
        return [(o.path.name, o.path.url, lambda o=o: o.modified) for o in remote_files.list_checkpoints(location)]
    try:
        names = os.listdir(location)
    except FileNotFoundError:
        return []
    return [(n, os.path.join(dirpath, n), lambda p=os.path.join(dirpath, n): os.path.getmtime(p)) for n in names]


def find_latest_checkpoint(dirpath: str, filename: str = "step={step}", verify: bool = False,
                           storage_options: dict | None = None) -> str | None:
    """The newest complete checkpoint in ``dirpath`` named by ``filename``, or None (usable as ``ckpt_path``).

    ``dirpath`` may be a remote prefix (``s3://bucket/run``; ``storage_options`` as the plugin's)."""
    for _, path in reversed(matching_checkpoints(dirpath, filename, storage_options)):
        if is_complete(path, verify=verify, storage_options=storage_options):
            return path
    return None
