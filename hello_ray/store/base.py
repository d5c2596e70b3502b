"""The store's interface and the logic both backends share: manifests (read once per process, verified
reads), finalize, downloads with stamps."""
from __future__ import annotations

import concurrent.futures as cf
import copy
import dataclasses
import fcntl
import hashlib
import json
import re
from abc import ABC, abstractmethod
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator

import pyarrow.fs as pafs

from hello_ray.store.keys import (
    ArtifactNotFound,
    FORMAT_VERSION,
    IntegrityError,
    LEASE_DIR,
    MANIFEST,
    RAY_DIR,
    StoreError,
    _CHUNK,
    _KEY_RE,
    _check_key,
    _check_name,
    _json_default,
    _sha256_file,
    artifact_key,
    cache_root,
    key_stage,
    library_versions,
    log,
    rm_hint,
)


# ---------------------------------------------------------------------------------------------
# finished artifacts: parsed manifests, cached per process


@dataclasses.dataclass(frozen=True)
class _Manifest:
    """A finished artifact's manifest as read: its bytes, the decoded JSON and its files by name
    (every name already passed ``_check_name``)."""
    raw: bytes
    data: dict
    files: dict[str, dict]


# (store identity, key) -> (signature, manifest). Finished artifacts are immutable until removed,
# so a manifest is read once per process; a local store re-stats it (one syscall) and re-reads a
# replaced one, an S3 store trusts its copy and re-reads only when a file stops matching it.
_MANIFESTS: dict[tuple[str, str], tuple[Any, _Manifest]] = {}
_NO_MANIFEST = object()
# Library-version differences already warned about in this process (once each, not per read).
_WARNED_VERSIONS: set[tuple[str, ...]] = set()
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


# ---------------------------------------------------------------------------------------------
# the store


class Store(ABC):
    """Common logic of both backends; subclasses provide the object primitives.

    Picklable: Ray tasks and workers receive it and talk to the same storage.
    """

    uri: str
    # key -> hello_ray.lease.Fence of the lease this writer holds on the key: writes into the key
    # check it first. Replaced, never mutated (the default is shared); pickled copies carry it.
    fences: "MappingProxyType[str, Any] | dict[str, Any]" = MappingProxyType({})

    # -- primitives (per backend); ``rel`` is "<key>/<name>", a ``folder`` is "<key>" or "_ray/<key>"
    @abstractmethod
    def _write(self, rel: str, data: bytes) -> None: ...

    @abstractmethod
    def _write_file(self, rel: str, path: Path) -> None: ...

    @abstractmethod
    def _read(self, rel: str) -> bytes:
        """The object's bytes; ArtifactNotFound when absent."""

    @abstractmethod
    def _chunks(self, rel: str, chunk: int = _CHUNK) -> Iterator[bytes]:
        """The object's bytes as they arrive, in chunks of at most ``chunk`` bytes;
        ArtifactNotFound when absent."""

    @abstractmethod
    def _exists(self, rel: str) -> bool: ...

    @abstractmethod
    def _list(self, key: str) -> dict[str, int]:
        """name -> size of the artifact's data files (no manifest, no temp files); every name
        passed ``_check_name`` (a hostile listing is refused, naming the object)."""

    @abstractmethod
    def _children(self, under: str = "") -> list[str]:
        """Names of the folders at the top of the store (or directly under folder ``under``)."""

    @abstractmethod
    def _tree(self, folder: str) -> dict[str, tuple[int, float]]:
        """Everything under ``folder`` as it lies (manifest and temp files too): relative name ->
        (size, modification time in unix seconds). Names are shown, never used as paths."""

    @abstractmethod
    def _delete(self, rel: str) -> None:
        """Remove one object (absent: nothing to do)."""

    @abstractmethod
    def _delete_tree(self, folder: str) -> int:
        """Remove ``folder`` and everything under it; returns how many files went."""

    @abstractmethod
    def _digests(self, key: str, files: dict[str, int]) -> dict[str, str]:
        """name -> sha256 of the listed files (and, on local disk, the files made durable)."""

    @abstractmethod
    def _manifest_signature(self, key: str) -> Any:
        """What tells a cached manifest from a replaced one without reading it (``_NO_MANIFEST``
        when there is none); None: the backend trusts its cache."""

    @abstractmethod
    def _cache_ident(self) -> str:
        """This store's folder name under ``cache_root()`` (download copies, verified stamps)."""

    @abstractmethod
    def uri_for(self, key: str, name: str = "") -> str: ...

    @abstractmethod
    def download(self, key: str) -> Path:
        """A local folder holding the finished artifact, verified against its manifest."""

    @abstractmethod
    def ray_storage(self) -> tuple[str, pafs.FileSystem | None]:
        """(storage_path, storage_filesystem) for ``ray.train.RunConfig``: ``<store>/_ray``."""

    @abstractmethod
    def check(self) -> None:
        """Reach the store once; StoreError saying what to fix when that fails."""

    # -- public API ---------------------------------------------------------------------------
    def artifact_key(self, stage: str, config: dict, inputs: dict[str, str] | None = None) -> str:
        return artifact_key(stage, config, inputs)

    def exists(self, key: str) -> bool:
        """True only for a finished artifact (its manifest.json is present)."""
        return self._exists(f"{_check_key(key)}/{MANIFEST}")

    def _fenced(self, key: str) -> None:
        """A key under a lease of this writer: LeaseLost when the lease is no longer ours."""
        fence = self.fences.get(key)
        if fence is not None:
            fence.check(self)

    def put_bytes(self, key: str, name: str, data: bytes) -> None:
        self._fenced(key)
        self._write(f"{_check_key(key)}/{_check_name(key, name)}", bytes(data))

    def put_file(self, key: str, name: str, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"artifact {key}: cannot store {name!r}: {path} is not a file")
        self._fenced(key)
        self._write_file(f"{_check_key(key)}/{_check_name(key, name)}", path)

    def put_dir(self, key: str, local_dir: str | Path, prefix: str = "") -> None:
        """Upload every file under ``local_dir`` as ``<prefix>/<relative path>``."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StoreError(f"artifact {key}: {local_dir} is not a folder")
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            self.put_file(key, f"{prefix.strip('/')}/{rel}" if prefix.strip("/") else rel, path)

    def get_bytes(self, key: str, name: str) -> bytes:
        """The file's bytes. From a finished artifact they are checked against its manifest while
        they stream in (size and sha256; IntegrityError naming the file on a mismatch); from an
        artifact still being written (a stage reading its own files) there is nothing to check
        against yet."""
        rel = f"{_check_key(key)}/{_check_name(key, name)}"
        manifest = self._finished(key)
        if manifest is None:
            return self._read(rel)
        try:
            return self._read_verified(key, manifest, name)
        except IntegrityError:
            # The cached manifest may be older than the artifact (removed and re-made by another
            # process): believe the file only against the manifest the store holds now.
            fresh = self._finished(key, refresh=True)
            if fresh is None or fresh.raw == manifest.raw:
                raise
            return self._read_verified(key, fresh, name)

    def verify(self, key: str) -> None:
        """Check every file of finished artifact ``key`` against its manifest without keeping the
        bytes: for artifacts that other readers (Ray Data's parquet reader) open by URI. Each
        object is streamed once (a local store reuses ``download``'s verified stamp instead)."""
        manifest = self._finished(key)
        if manifest is None:
            self.manifest(key)  # raises ArtifactNotFound, saying why
            raise AssertionError("unreachable")
        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda entry: self._verify_stream(key, entry), manifest.files.values()))

    def list_files(self, key: str) -> list[str]:
        """Names (relative to the artifact) of its data files, without the manifest."""
        return sorted(self._list(_check_key(key)))

    def manifest(self, key: str) -> dict:
        """The finished artifact's manifest (a copy: callers may change it)."""
        found = self._finished(key)
        if found is None:
            raise ArtifactNotFound(f"artifact {key} not found in {self.uri}: no {MANIFEST} "
                                   "(never run, or its run stopped before finishing)")
        return copy.deepcopy(found.data)

    def check_reuse(self, key: str) -> dict:
        """The manifest of finished artifact ``key`` once it may be reused: written in this code's
        FORMAT_VERSION (StoreError otherwise). Library versions that differ from this process's
        are logged once as a warning (a result computed with other versions, not an error)."""
        manifest = self.manifest(key)
        found = manifest.get("format")
        if found != FORMAT_VERSION:
            raise StoreError(
                f"artifact {key} in {self.uri} has manifest format {found!r}, but this hello_ray "
                f"reads format {FORMAT_VERSION}: it cannot be reused. Remove it with "
                f"{rm_hint(key, self.uri)} and re-run to rebuild it (or use the hello_ray that wrote it)")
        now = library_versions()
        diffs = tuple(sorted(f"{dist} {old} -> {now[dist]}" for dist, old in
                             (manifest.get("versions") or {}).items() if now.get(dist, old) != old))
        if diffs and diffs not in _WARNED_VERSIONS:
            _WARNED_VERSIONS.add(diffs)
            log.warning("artifact %s was written with other library versions (%s); reusing it",
                        key, ", ".join(diffs))
        return manifest

    def list_artifacts(self, stage: str | None = None) -> list[str]:
        """Keys of finished artifacts, optionally only those of one stage."""
        keys = [k for k in self._children() if _KEY_RE.match(k) and k != RAY_DIR
                and (stage is None or key_stage(k) == stage)]
        with cf.ThreadPoolExecutor(8) as pool:
            done = list(pool.map(self.exists, keys))
        return sorted(k for k, ok in zip(keys, done) if ok)

    def finalize(self, key: str, stage: str, config: dict, inputs: dict[str, str] | None = None,
                 summary: dict | None = None) -> dict:
        """Write ``manifest.json`` last, listing every data file with size and sha256.

        Refuses an artifact without data files (a stage that wrote nothing is a bug, not a
        result). Returns the manifest as readers will see it.
        """
        files = self._list(_check_key(key))
        if not files:
            raise StoreError(f"artifact {key} ({stage}) has no data files in {self.uri_for(key)}: "
                             "refusing to finalize an empty artifact")
        digests = self._digests(key, files)
        manifest = {
            "format": FORMAT_VERSION,
            "stage": stage,
            "key": key,
            "config": config,
            "inputs": dict(inputs or {}),
            "files": [{"name": n, "size": files[n], "sha256": digests[n]} for n in sorted(files)],
            "versions": library_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "summary": summary or {},
        }
        try:  # fails before anything is written; NaN is allowed (a diverged run is still a result)
            text = json.dumps(manifest, indent=2, sort_keys=True, default=_json_default)
        except (TypeError, ValueError) as e:
            raise StoreError(f"artifact {key}: config/inputs/summary cannot be written as JSON "
                             f"({e})") from None
        self._fenced(key)  # the files listed above are this lease holder's: still ours, now
        self._write(f"{key}/{MANIFEST}", text.encode())
        self.forget(key)
        return json.loads(text)

    # -- housekeeping (``hello-ray ls / rm / gc``, hello_ray/housekeeping.py) --------------------
    def folders(self, under: str = "") -> list[str]:
        """Names of the store's top folders (or of those under ``under``, e.g. ``RAY_DIR``):
        artifact keys, helper folders, and whatever else lies there (shown, never used as paths)."""
        return self._children(under)

    def folder_files(self, folder: str) -> dict[str, tuple[int, float]]:
        """Everything under ``folder`` as it lies: relative name -> (size, mtime unix seconds)."""
        return self._tree(folder)

    def remove_folder(self, folder: str) -> int:
        """Remove an artifact folder ``<key>`` (its manifest first: from then on nobody takes the
        rest for a finished artifact) or a Ray run state ``_ray/<key>``; returns the files removed."""
        parts = folder.split("/")
        if len(parts) == 2 and parts[0] == RAY_DIR:
            _check_key(parts[1])
        elif len(parts) != 1 or _check_key(folder) == LEASE_DIR:
            raise StoreError(f"{folder!r} is neither an artifact key nor {RAY_DIR}/<key>")
        else:
            had_manifest = self._exists(f"{folder}/{MANIFEST}")
            self._delete(f"{folder}/{MANIFEST}")
            self.forget(folder)
            return self._delete_tree(folder) + had_manifest
        return self._delete_tree(folder)

    def manifest_sha256(self, key: str) -> str | None:
        """sha256 of the finished artifact's manifest bytes (what download stamps record), or None."""
        found = self._finished(key)
        return hashlib.sha256(found.raw).hexdigest() if found is not None else None

    def forget(self, key: str) -> None:
        """Drop this process's cached manifest of ``key`` (after finalize, rm)."""
        _MANIFESTS.pop((self._cache_ident(), key), None)

    def cache_folder(self) -> Path:
        """This store's folder under ``cache_root()`` on this machine."""
        return cache_root() / self._cache_ident()

    def cache_dir(self, key: str) -> Path:
        """Where this machine keeps its copy of ``key`` (S3) and, beside it, the verified stamp."""
        return self.cache_folder() / _check_key(key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    # -- verification -------------------------------------------------------------------------
    def _finished(self, key: str, refresh: bool = False) -> _Manifest | None:
        """The manifest of ``key`` if the artifact is finished, else None; cached per process."""
        slot = (self._cache_ident(), _check_key(key))
        signature = self._manifest_signature(key)
        if signature is _NO_MANIFEST:
            _MANIFESTS.pop(slot, None)
            return None
        hit = _MANIFESTS.get(slot)
        if hit is not None and not refresh and hit[0] == signature:
            return hit[1]
        try:
            raw = self._read(f"{key}/{MANIFEST}")
        except ArtifactNotFound:
            _MANIFESTS.pop(slot, None)
            return None
        manifest = self._parse_manifest(key, raw)
        _MANIFESTS[slot] = (signature, manifest)
        return manifest

    def _parse_manifest(self, key: str, raw: bytes) -> _Manifest:
        """Decode a manifest; every file name must pass the write rule before anyone uses it."""
        where = f"{self.uri_for(key)}/{MANIFEST}"
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{where} is not valid JSON ({e}). Remove the artifact with "
                             f"{rm_hint(key, self.uri)} and re-run its stage") from None
        entries = data.get("files") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise StoreError(f"{where}: no 'files' list; not a hello_ray manifest")
        files: dict[str, dict] = {}
        for entry in entries:
            name = entry.get("name") if isinstance(entry, dict) else None
            try:
                _check_name(key, name)
            except StoreError as e:
                raise StoreError(f"{where}: refusing the manifest: {e}") from None
            size, sha = entry.get("size"), entry.get("sha256")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 \
                    or not isinstance(sha, str) or not _SHA_RE.match(sha):
                raise StoreError(f"{where}: file {name!r} has no valid size and sha256 "
                                 f"({size!r}, {sha!r}); refusing the manifest")
            files[name] = {"name": name, "size": size, "sha256": sha}
        return _Manifest(raw=bytes(raw), data=data, files=files)

    def _read_verified(self, key: str, manifest: _Manifest, name: str) -> bytes:
        entry = manifest.files.get(name)
        if entry is None:
            raise ArtifactNotFound(f"artifact {key} is finished and its manifest lists no file "
                                   f"{name!r} ({len(manifest.files)} files in {self.uri_for(key)})")
        parts: list[bytes] = []
        # The bytes end up in memory anyway: read them in one piece (one allocation, no join copy;
        # 1 MiB chunks cost ~2x the time of a local read in allocation and page faults).
        self._verify_stream(key, entry, parts.append, chunk=entry["size"] + 1)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _verify_stream(self, key: str, entry: dict, sink: Callable[[bytes], Any] | None = None,
                       chunk: int = _CHUNK) -> int:
        """Stream one file of a finished artifact through sha256 (and into ``sink``) as it is
        read, so checking costs no extra pass; IntegrityError naming the file on a mismatch.
        Returns the bytes read."""
        name, size = entry["name"], entry["size"]
        h, n = hashlib.sha256(), 0
        try:
            for part in self._chunks(f"{key}/{name}", chunk):
                n += len(part)
                if n > size:  # longer than it was: stop reading, it cannot match
                    break
                h.update(part)
                if sink is not None:
                    sink(part)
        except ArtifactNotFound:
            raise IntegrityError(
                f"artifact {key}: file {name} is listed in its manifest but missing from the store "
                f"({self.uri_for(key, name)}). Remove the artifact with {rm_hint(key, self.uri)} "
                "and re-run its stage") from None
        got = h.hexdigest()
        if n != size or got != entry["sha256"]:
            found = (f"more than {size:,} bytes" if n > size else f"{n:,} bytes, sha256 {got[:16]}...")
            raise IntegrityError(
                f"artifact {key}: file {name} does not match its manifest: expected {size:,} bytes, "
                f"sha256 {entry['sha256'][:16]}...; found {found} ({self.uri_for(key, name)}). It was "
                f"changed or corrupted after the artifact was finished: remove the artifact with "
                f"{rm_hint(key, self.uri)} and re-run its stage")
        return n

    @contextmanager
    def _cache_lock(self, key: str) -> Iterator[Path]:
        """Hold this machine's lock on ``key``'s cache entry (Ray workers on one node share it);
        yields the verified-stamp path."""
        dest = self.cache_dir(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest.parent / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield dest.parent / f"{key}.verified.json"



def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _local_matches(path: Path, entry: dict) -> bool:
    return (path.is_file() and path.stat().st_size == entry["size"]
            and _sha256_file(path) == entry["sha256"])


def _stamp_ok(stamp_path: Path, stamp: dict, dest: Path, want: dict) -> bool:
    try:
        old = json.loads(stamp_path.read_text())
        return (old.get("manifest") == stamp["manifest"] and set(old["files"]) == set(want)
                and all(_stat(dest / n) == old["files"][n] for n in want))
    except (OSError, ValueError, KeyError, TypeError):
        return False
