"""Remote checkpoint layouts: a rank's object (uploaded from the local cache or streamed from staging memory) and
multi-rank directories whose ``MANIFEST.json``, written last in one PUT, names the generation of rank objects.

A multi-rank remote checkpoint at ``<ckpt>`` is ``<ckpt>/MANIFEST.json`` plus ``<ckpt>/<generation>/checkpoint_<r>.pt``
per rank. Every save writes a fresh generation (a random name rank 0 shares through the barrier), so the objects of
the checkpoint in place are never touched: it stays loadable until the new manifest replaces it in one PUT. Then the
generations it no longer names (the old one, and leftovers of failed saves) are deleted. Removal deletes the
manifest first: from then on readers see no checkpoint, never a torn one.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any, Callable

from lightning_ckpt import layout, paths, remote, remote_files, remote_stream
from lightning_ckpt.errors import CheckpointError, CorruptCheckpointError, IncompleteCheckpointError
from lightning_ckpt.manifest import Manifest, ManifestFile
from lightning_ckpt.paths import RemotePath
from lightning_ckpt.remote import RemoteConfig, RemoteUpload

log = logging.getLogger(__name__)

GENERATION_RE = re.compile(r"^gen-[0-9a-f]{16}$")  # only names like this are ever deleted as old generations
_READ_ATTEMPTS = 3  # a checkpoint re-saved while it is read is read again (the new manifest names what is there)
SYNC_REMOTE_TIMEOUT_SECS = 600.0  # a synchronous save's remote deadline (an async writer's comes from its config)


def new_generation() -> str:
    return f"gen-{secrets.token_hex(8)}"


def remote_destination(path: Any, after_commit: Any, timeout_secs: float) -> tuple[Any, Any]:
    """For a checkpointer's ``save``: ``(local path, after_commit)``. A remote ``path`` becomes its local cache
    path and a ``RemoteUpload`` to it within ``timeout_secs`` (default ``RemoteConfig``; pass your own
    ``RemoteUpload`` as ``after_commit`` for other settings); a local one is returned as is (``timeout_secs``
    is then not used).

    Raises:
        ValueError: ``after_commit`` is a ``RemoteUpload`` to another place than ``path``.
    """
    location = paths.resolve(path)
    if not isinstance(location, RemotePath):
        return location, after_commit
    if isinstance(after_commit, RemoteUpload):
        if after_commit.target.url != location.url:
            raise ValueError(f"after_commit uploads to {after_commit.target.url}, but the save is of {location.url}")
        return location.cache_path(), after_commit
    if after_commit is not None:
        raise ValueError(f"a save to {location.url} uploads after the commit itself; after_commit must be None or "
                         "a RemoteUpload to that path")
    return location.cache_path(), RemoteUpload(location, RemoteConfig(), timeout_secs)


# ---------------------------------------------------------------------- one rank's object


def stream_prepared(upload: RemoteUpload, prepared: Any, buffer: memoryview | None,
                    before_complete: Callable[[], None] | None = None) -> int:
    """Upload ``prepared`` (records in ``buffer``, the staging memory) as one object, serialized straight into
    the upload's parts, with nothing written locally. Returns the object's size.

    Args:
        before_complete: called once every byte is serialized, before the upload completes; if it raises,
            nothing is published.

    Raises:
        CheckpointWriteError, CheckpointTimeoutError, FileExistsError: as ``remote.upload_file``; nothing is
            published (the upload is aborted), also when serializing fails after any number of parts.
    """
    from lightning_ckpt.checkpoint_file import write_file

    def produce(opener: Callable[[int], int]) -> Any:
        record = write_file(upload.target.url, prepared, buffer, opener=opener)
        if before_complete is not None:
            before_complete()
        return record

    _, nbytes = remote_stream.upload_stream(upload, prepared.nbytes, produce)
    return nbytes


def rank_upload(upload: RemoteUpload, generation: str, rank: int) -> RemoteUpload:
    """The upload of rank ``rank``'s object in ``generation`` of the checkpoint ``upload`` writes (a fresh prefix:
    nothing stale in it, and the peers' live uploads are never swept)."""
    target = upload.target.child(f"{generation}/{layout.rank_file_name(rank)}")
    return RemoteUpload(target, upload.config, upload.timeout_secs, sweep_stale=False)


# ---------------------------------------------------------------------- the manifest (rank 0)


def collect_files(upload: RemoteUpload, generation: str, world: int) -> dict[str, ManifestFile]:
    """Every rank's object in ``generation``, with its size and pickle digest (read from its checksum record).

    Raises:
        IncompleteCheckpointError: a rank's object is missing.
    """
    directory = upload.target.child(generation)
    listed = {o.path.name: o for o in remote_files.list_dir(directory, upload.config, upload.timeout_secs)}
    expected = [layout.rank_file_name(r) for r in range(world)]
    missing = [name for name in expected if name not in listed]
    if missing:
        raise IncompleteCheckpointError(f"rank objects {missing} missing from {directory.url} after the barrier")
    files = {}
    for name in expected:
        record = remote_files.read_checksum_record(directory.child(name), upload.config, upload.timeout_secs)
        digest = record.data_pkl_xxh3 if record is not None else None
        files[f"{generation}/{name}"] = ManifestFile(listed[name].nbytes, digest)
    return files


def publish_manifest(upload: RemoteUpload, manifest: Manifest) -> None:
    """The commit of a multi-rank remote checkpoint: its manifest, in one PUT; for a step-named checkpoint
    (``RemoteConfig.no_overwrite_pattern``) only if it has none yet, as for a single object.

    Raises:
        FileExistsError: a step-named checkpoint is there already (another run's); this save's generation is
            deleted, theirs is untouched.
    """
    target = upload.target
    try:
        remote_files.put_bytes(target.child(layout.MANIFEST_NAME), manifest.to_json(), upload.config,
                               upload.timeout_secs, no_overwrite=upload.config.no_overwrite(target.name))
    except FileExistsError:
        generation = generation_of(manifest, target.url)
        for name in manifest.files:  # ours alone: a fresh random generation that no manifest names
            remote_files.delete(target.child(name), upload.config, upload.timeout_secs)
        log.warning("%s exists already: deleted this save's generation %s", target.url, generation)
        raise
    finally:
        remote_files.forget_listings(target)


def generation_of(manifest: Manifest, url: str) -> str:
    """The one generation that every file a manifest lists lives in.

    Raises:
        CorruptCheckpointError: names outside one generation.
    """
    generations = {name.split("/", 1)[0] for name in manifest.files}
    if len(generations) != 1 or not all(GENERATION_RE.match(g) for g in generations) \
            or not all(name.count("/") == 1 for name in manifest.files):
        raise CorruptCheckpointError(f"corrupt checkpoint {url}: manifest files {sorted(manifest.files)} are not "
                                     "the objects of one generation", path=url, key="files")
    return generations.pop()


@dataclass
class ReplacedGenerations:
    """What a newly published manifest replaced: the checkpoint's other generations. ``close`` deletes them and
    aborts the uploads killed ranks left in them (older than the write timeout); the writer calls it after
    answering, like freeing a replaced local checkpoint."""

    upload: RemoteUpload
    keep: str

    @property
    def final_path(self) -> str:
        return self.upload.target.url

    def close(self) -> None:
        target, config, timeout = self.upload.target, self.upload.config, self.upload.timeout_secs
        try:
            delete_generations(target, config, timeout, keep=self.keep)
            remote.abort_stale_uploads_below(target, config, timeout, lambda key: _in_generation(key, self.keep))
        except CheckpointError as e:  # the writer logs it; the next save of this checkpoint deletes them
            raise OSError(f"could not delete the replaced generations of {self.final_path}: {e}") from e


def delete_generations(location: RemotePath, config: RemoteConfig, timeout_secs: float,
                       keep: str | None = None) -> list[str]:
    """Delete every object of every generation under ``location`` but ``keep``; returns the keys deleted.

    Only names of our generations are touched (``GENERATION_RE``): nothing else under the prefix is deleted.
    """
    deleted = []
    for key, _, _ in remote.list_tree(location, config, timeout_secs):
        if _in_generation(key, keep):
            remote_files.delete(location.child(key), config, timeout_secs)
            deleted.append(key)
    return deleted


def _in_generation(key: str, other_than: str | None) -> bool:
    """``key`` (below a checkpoint) is an object of one of our generations other than ``other_than``."""
    generation, _, name = key.partition("/")
    return bool(name) and generation != other_than and GENERATION_RE.match(generation) is not None


def remove_checkpoint(path: Any, config: RemoteConfig | None = None,
                      timeout_secs: float = remote_files.LOOKUP_TIMEOUT_SECS) -> None:
    """Remove a multi-rank remote checkpoint: its manifest first (from then on it is not a checkpoint), then the
    objects of its generations. A missing checkpoint is not an error.

    Raises:
        OSError: the store refused a deletion (the manifest is gone first, so what is left is never loaded).
    """
    location = paths.resolve(path)
    if not isinstance(location, RemotePath):
        raise ValueError(f"{location} is not a remote path")
    config = config or RemoteConfig()
    remote_files.delete(location.child(layout.MANIFEST_NAME), config, timeout_secs)
    delete_generations(location, config, timeout_secs)


# ---------------------------------------------------------------------- reading


def read_manifest(location: RemotePath, config: RemoteConfig, timeout_secs: float) -> Manifest | None:
    """The manifest of the checkpoint at ``location``, or None when it has none."""
    target = location.child(layout.MANIFEST_NAME)
    try:
        data = remote_files.read_from_tail(target, _whole, config, timeout_secs)
    except FileNotFoundError:
        return None
    return Manifest.from_json(data, target.url)


def _whole(file: Any) -> bytes:
    file.seek(0)
    return file.read()


def fetch_for_read(location: RemotePath, rank: int, config: RemoteConfig | None = None,
                   timeout_secs: float = remote_files.LOOKUP_TIMEOUT_SECS,
                   fetch: Callable[[RemotePath, RemoteConfig, float], Any] | None = None,
                   ) -> tuple[Any, str, dict | None]:
    """Fetch what rank ``rank`` reads of the remote checkpoint at ``location``: by default, download it into the
    local cache.

    Args:
        fetch: ``(object, config, timeout_secs) -> fetched`` instead of the download (``remote_partial``: only
            some ranges); it raises FileNotFoundError for a missing object.

    Returns:
        ``(fetched, URL of the object, manifest entry)``: a directory's rank object with its manifest entry
        (``nbytes``, ``data_pkl_xxh3``), or a single object with None; ``fetched`` is by default the local file,
        which the caller removes.

    Raises:
        FileNotFoundError: nothing at ``location``.
        IncompleteCheckpointError: objects under ``location`` but no manifest, or no object for this rank.
    """
    config = config or RemoteConfig()
    fetch = fetch or _download
    for attempt in range(_READ_ATTEMPTS):
        manifest = read_manifest(location, config, timeout_secs)
        if manifest is None:
            return _fetch_single(location, config, timeout_secs, fetch)
        name = _rank_entry(manifest, location, rank)
        target = location.child(name)
        try:
            fetched = fetch(target, config, timeout_secs)
        except FileNotFoundError:
            again = read_manifest(location, config, timeout_secs)
            if again is not None and again.files != manifest.files and attempt + 1 < _READ_ATTEMPTS:
                log.info("%s was re-saved while it was read; reading the new checkpoint", location.url)
                continue
            raise IncompleteCheckpointError(
                f"incomplete checkpoint: {location.url} lacks {name}, which its manifest lists") from None
        entry = manifest.files[name]
        return fetched, target.url, {"nbytes": entry.nbytes, "data_pkl_xxh3": entry.data_pkl_xxh3}
    raise AssertionError("unreachable")


def _download(target: RemotePath, config: RemoteConfig, timeout_secs: float) -> str:
    return remote_files.download(target, paths.download_path(target.url, target.name), config, timeout_secs)


def _rank_entry(manifest: Manifest, location: RemotePath, rank: int) -> str:
    generation_of(manifest, location.url)
    wanted = layout.rank_file_name(rank)
    for name in manifest.files:
        if name.split("/", 1)[1] == wanted:
            return name
    raise IncompleteCheckpointError(f"incomplete checkpoint: {location.url} has no object for rank {rank} "
                                    f"(manifest lists {sorted(manifest.files)})")


def _fetch_single(location: RemotePath, config: RemoteConfig, timeout_secs: float,
                  fetch: Callable[[RemotePath, RemoteConfig, float], Any]) -> tuple[Any, str, None]:
    try:
        return fetch(location, config, timeout_secs), location.url, None
    except FileNotFoundError:
        if remote.list_tree(location, config, timeout_secs):
            raise IncompleteCheckpointError(
                f"incomplete checkpoint: {location.url} has objects but no {layout.MANIFEST_NAME} (its save never "
                "committed)") from None
        raise FileNotFoundError(f"checkpoint not found: {location.url}") from None


# ---------------------------------------------------------------------- finding checkpoints


def list_checkpoints(directory: RemotePath) -> list[remote_files.RemoteObject]:
    """The objects directly under ``directory`` and its multi-rank checkpoints (a prefix holding a generation
    or a manifest; ``nbytes`` 0, modified when its newest object was)."""
    config, timeout = RemoteConfig(), remote_files.LOOKUP_TIMEOUT_SECS
    found, dirs = [], {}
    for key, size, modified in remote.list_tree(directory, config, timeout):
        name, _, rest = key.partition("/")
        if not rest:
            found.append(remote_files.RemoteObject(directory.child(name), size, modified))
        elif rest == layout.MANIFEST_NAME or GENERATION_RE.match(rest.split("/", 1)[0]):
            dirs[name] = max(dirs.get(name, 0.0), modified)
    return found + [remote_files.RemoteObject(directory.child(n), 0, m) for n, m in dirs.items()]


def is_complete(location: RemotePath, verify: bool = False) -> bool:
    """True iff ``location`` is a complete remote checkpoint: an object of ours, or a manifest whose every rank
    object is listed with its size (``verify``: and every rank object's tensors check). A damaged object costs
    one listing more, never a read of a manifest that is not there.

    Raises:
        CheckpointError: the store could not be read (``remote_files.is_complete``).
    """
    if remote_files.is_complete(location, verify):
        return True
    config, timeout = RemoteConfig(), remote_files.LOOKUP_TIMEOUT_SECS
    try:
        listed = {key: size for key, size, _ in remote.list_tree(location, config, timeout)}
        if layout.MANIFEST_NAME not in listed:
            return False
        manifest = read_manifest(location, config, timeout)
        if manifest is None:
            return False
        generation_of(manifest, location.url)
        for name, entry in manifest.files.items():
            if listed.get(name) != entry.nbytes:
                log.warning("skipping %s: %s is missing or not the size its manifest says", location.url, name)
                return False
            if verify and not remote_files.is_complete(location.child(name), verify=True):
                return False
    except remote_files.NOT_A_CHECKPOINT as e:  # a store that cannot be read raises: unknown is not "no"
        log.warning("skipping %s: not a complete checkpoint (%s)", location.url, e)
        return False
    return True
