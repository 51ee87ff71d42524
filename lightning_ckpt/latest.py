"""Finding the newest complete checkpoint of a directory and matching filename patterns (no Lightning needed)."""

from __future__ import annotations

import logging
import os
import re
import string
from typing import Callable

from lightning_ckpt import paths, remote_dirs
from lightning_ckpt.integrity import check_checkpoint
from lightning_ckpt.paths import RemotePath
from lightning_ckpt.verification import is_temp

log = logging.getLogger(__name__)

CKPT_SUFFIX = ".ckpt"


PLACEHOLDERS = ("step", "epoch")  # what a name pattern may hold, and all that ``pattern_regex`` matches


def check_pattern(filename: str) -> None:
    """Refuse a name pattern whose files ``pattern_regex`` could never find: placeholders other than ``{step}`` and
    ``{epoch}``, a format spec or conversion (``{step:05d}``), or a malformed one (``step={step``).

    Raises:
        ValueError: naming the pattern and its first bad placeholder.
    """
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(filename) if name is not None]
    except ValueError as e:
        raise ValueError(f"{filename!r} is not a name pattern: {e}") from None
    for name, spec, conv in fields:
        if name not in PLACEHOLDERS or spec or conv:
            shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"{filename!r}: only {{step}} and {{epoch}} are filled in (no format spec), got {shown}")


def pattern_regex(filename: str) -> re.Pattern:
    """A regex for the file names ``filename`` (``"step={step}"``, ``"{epoch}-{step}"``) produces, with groups."""
    parts = re.split(r"(\{step\}|\{epoch\})", filename)
    body = "".join(
        "(?P<step>\\d+)" if p == "{step}" else "(?P<epoch>\\d+)" if p == "{epoch}" else re.escape(p) for p in parts
    )
    return re.compile(f"^{body}{re.escape(CKPT_SUFFIX)}$")


def is_complete(path: str, verify: bool = False, storage_options: dict | None = None) -> bool:
    """True iff ``path`` is a committed checkpoint of ours with valid checksums: a file, a directory of rank files,
    or a sharded (DCP) directory of ``lightning_ckpt.dcp.StorageWriter`` (FSDP/ModelParallel strategies).

    Nothing is unpickled: the pickle bytes and, with ``verify=True``, every storage are checked against the
    checksum record straight from the file. What cannot be used (a temp name, a dangling symlink, a file removed
    meanwhile, a malformed record, a mismatch) is False, logged. A remote object's record is read with ranged GETs
    of its tail (``verify`` downloads it); a remote directory's, from its manifest and a listing.

    Raises:
        CheckpointError: a remote store could not be read (denied, unreachable past the retries): that is not
            "incomplete", so ``find_latest`` never silently falls back to an older checkpoint.
    """
    location = paths.resolve(path, storage_options)
    if isinstance(location, RemotePath):
        return remote_dirs.is_complete(location, verify)
    if is_temp(os.path.basename(path.rstrip(os.sep))):
        return False
    result = check_checkpoint(path, deep=verify)
    if not result.ok:
        log.warning("skipping %s: %s (%s)", path, result.status, result.detail)
    return result.ok


def matching_checkpoints(dirpath: str, filename: str,
                         storage_options: dict | None = None) -> list[tuple[int, str]]:
    """``(step, path)`` of entries in ``dirpath`` (a local directory or a remote prefix) named by ``filename``,
    oldest first (temp names never match).

    An entry that vanishes while it is listed (pruned by another process, a dangling symlink) is skipped, logged.
    """
    regex = pattern_regex(filename)
    found = []
    for name, path, modified in _listing(dirpath, storage_options):
        match = regex.match(name)
        if match is None or is_temp(name):
            continue
        try:
            mtime = modified()
        except OSError as e:
            log.warning("skipping %s: %s", path, e)
            continue
        groups = match.groupdict()
        found.append(((int(groups.get("step") or 0), int(groups.get("epoch") or 0), mtime), path))
    found.sort(key=lambda kv: kv[0])
    return [(key[0], path) for key, path in found]


def _listing(dirpath: str, storage_options: dict | None) -> list[tuple[str, str, Callable[[], float]]]:
    """``(name, path, modified)`` of the entries of a local directory or of a remote prefix."""
    location = paths.resolve(dirpath, storage_options)
    if isinstance(location, RemotePath):
        return [(o.path.name, o.path.url, lambda o=o: o.modified) for o in remote_dirs.list_checkpoints(location)]
    try:
        names = os.listdir(location)
    except FileNotFoundError:
        return []
    return [(n, os.path.join(dirpath, n), lambda p=os.path.join(dirpath, n): os.stat(p).st_mtime) for n in names]


def find_latest_checkpoint(dirpath: str, filename: str = "step={step}", verify: bool = False,
                           storage_options: dict | None = None) -> str | None:
    """The newest complete checkpoint in ``dirpath`` named by ``filename``, or None (usable as ``ckpt_path``).

    ``dirpath`` may be a remote prefix (``s3://bucket/run``; ``storage_options`` as the plugin's). ``verify=True``
    also hashes every storage (every chunk of a sharded directory); neither unpickles anything from the files.
    A sharded directory without its manifest (never committed, or saved by plain DCP) is skipped, logged.
    """
    for _, path in reversed(matching_checkpoints(dirpath, filename, storage_options)):
        if is_complete(path, verify=verify, storage_options=storage_options):
            return path
    return None
