"""Artifact store: one interface over local folders (``path``, ``file://``) and ``s3://bucket/prefix``.

An artifact is a folder ``<root>/<key>/...`` whose ``manifest.json`` is written last. Readers
only believe the manifest: a folder without one (a crash between data and manifest) does not
exist to ``exists``/``manifest``/``list_artifacts``, and a re-run simply overwrites it.

S3 goes through boto3 for object IO and through ``pyarrow.fs.S3FileSystem`` for the filesystem
handed to Ray (Train storage, Data readers). The endpoint comes from the caller, else from the
standard ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables (MinIO, Ceph, R2), else AWS.
Both clients retry alike: boto3's "standard" mode and pyarrow's ``AwsStandardS3RetryStrategy``,
with the same attempts and timeouts (``s3_max_attempts`` / ``s3_timeout``).

Credentials come from the standard AWS chain *in every process that talks to S3* (env, config
files, instance profile, web identity): a store or filesystem shipped to a Ray worker carries
the endpoint, region, timeouts and attempts, never a key, so refreshable credentials stay
refreshable. They are never logged, never put into an error message and never written into an
artifact.
"""
from __future__ import annotations

import concurrent.futures as cf
import copy
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Callable, Iterator
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from hello_ray.failures import disk_full_error

MANIFEST = "manifest.json"
# Bump when the key derivation or the manifest layout changes: old artifacts then stop matching.
FORMAT_VERSION = 1
RAY_DIR = "_ray"
# Per-key writer leases: ``<store>/_leases/<key>.json`` = {"owner", "host", "pid", "expires"}.
LEASE_DIR = "_leases"
_PARTIAL = ".partial"  # suffix of a local temp file; never listed, never part of an artifact
# Flat folder names; a leading "_" marks helper folders (never finalized), "_ray" is Ray's own.
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_CHUNK = 1 << 20
_DELETE_BATCH = 1000  # S3 DeleteObjects takes at most 1,000 keys per call
# Defaults of s3_timeout / s3_max_attempts: per request (connect at most 5 s), and attempts
# per request, retries included, for boto3 and pyarrow alike.
_TIMEOUTS = {"connect_timeout": 5, "read_timeout": 60, "max_attempts": 3}


class StoreError(RuntimeError):
    """The store cannot do what was asked (unreachable, no bucket, no credentials, bad key...)."""


class ArtifactNotFound(StoreError):
    """No finished artifact (or no such file in it) under the given key."""


class IntegrityError(StoreError):
    """A finished artifact's file does not match its manifest (size or sha256), or is missing."""


log = logging.getLogger("hello_ray.store")


def rm_hint(key: str, store_uri: str) -> str:
    """How a user removes a damaged or unwanted artifact (every error that says so points here)."""
    return f"`hello-ray rm {key} --store {store_uri}`"


# ---------------------------------------------------------------------------------------------
# keys, names, manifests


def _json_default(obj: Any) -> Any:
    """Let configs and summaries carry numpy scalars/arrays, paths and dataclasses."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _canonical_json(obj: Any, where: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default,
                          allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{where}: cannot be written as JSON ({e})") from None


def artifact_key(stage: str, config: dict, inputs: dict[str, str] | None = None) -> str:
    """``f"{stage}-{sha256(canonical json of config + inputs + format version)[:12]}"``.

    Deterministic across processes and dict orders: the same stage config and input keys
    always give the same key, so a finished stage is found and skipped.
    """
    if not isinstance(stage, str) or not _KEY_RE.match(stage):
        raise StoreError(f"stage name {stage!r} must match {_KEY_RE.pattern}")
    payload = {"format": FORMAT_VERSION, "stage": stage, "config": config, "inputs": inputs or {}}
    text = _canonical_json(payload, f"config/inputs of stage {stage!r}")
    return f"{stage}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key) or key == RAY_DIR:
        raise StoreError(f"artifact key {key!r} must match {_KEY_RE.pattern} (no '/'; "
                         f"{RAY_DIR!r} is reserved for Ray Train)")
    return key


def is_artifact_key(name: str) -> bool:
    """True for a store folder that holds an artifact (not a helper folder such as ``_ray``)."""
    return isinstance(name, str) and bool(_KEY_RE.match(name)) and not name.startswith("_")


def _check_name(key: str, name: str) -> str:
    """A file name inside an artifact: relative, '/'-separated, no '..', not the manifest."""
    parts = name.split("/") if isinstance(name, str) else [""]
    bad = (not name or name.startswith("/") or "\\" in name
           or any(p in ("", ".", "..") for p in parts) or name == MANIFEST
           or parts[-1].endswith(_PARTIAL))
    if bad:
        raise StoreError(f"artifact {key}: invalid file name {name!r} (relative '/'-separated path, "
                         f"no '..', not {MANIFEST!r})")
    return name


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Versions recorded in every manifest (read from package metadata: no heavy imports)."""
    out = {"python": sys.version.split()[0]}
    for dist in ("hello_ray", "torch", "torchvision", "ray", "pyarrow", "numpy", "open_clip_torch",
                 "peft", "boto3"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _sha256_file(path: Path, fsync: bool = False) -> str:
    """sha256 of a local file; with ``fsync`` its data is also forced to disk (same open, no
    second pass: a just-written file's pages are still in the page cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (creations, renames) durable: an fsync on the folder itself."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cache_root() -> Path:
    """hello_ray's local cache root: ``$HELLO_RAY_CACHE`` or ``~/.cache/hello_ray`` (downloaded
    artifacts here, the random-init CLIP weights in models/clip.py)."""
    return Path(os.environ.get("HELLO_RAY_CACHE") or Path.home() / ".cache" / "hello_ray")


def atomic_write(path: Path, write: Callable[[BinaryIO], None], fsync: bool = False) -> None:
    """Write through a temp file + os.replace: a killed process never leaves a truncated file
    under the final name (at worst a hidden ``.*.partial`` file that nobody lists). Several
    writers of one path (Ray workers filling a cache) each get their own temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{_PARTIAL}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = disk_full_error(e, str(path))  # a bare ENOSPC names no file: say which one
        if full is not None:
            raise full from e
        raise


def _is_partial(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".") and base.endswith(_PARTIAL)


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
                and (stage is None or k.rsplit("-", 1)[0] == stage)]
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


class LocalStore(Store):
    """Artifacts in a local (or network-mounted) folder."""

    def __init__(self, root: Path):
        self.root = root
        self.uri = root.as_uri()

    def _path(self, rel: str) -> Path:
        return self.root / rel

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the store folder {self.root}: {e}") from None
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"store folder {self.root} is not writable")

    def _write(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        manifest = rel.endswith(MANIFEST)
        atomic_write(path, lambda f: f.write(data), fsync=manifest)
        if manifest:  # the rename that publishes the manifest must itself survive a power loss
            _fsync_dir(path.parent)

    def _write_file(self, rel: str, path: Path) -> None:
        def copy(f: BinaryIO) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, _CHUNK)
        atomic_write(self._path(rel), copy)

    def _read(self, rel: str) -> bytes:
        try:
            return self._path(rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ArtifactNotFound(f"{self._path(rel)} not found") from None

    def _chunks(self, rel: str, chunk: int = _CHUNK) -> Iterator[bytes]:
        try:
            f = open(self._path(rel), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ArtifactNotFound(f"{self._path(rel)} not found") from None
        with f:
            while part := f.read(chunk):
                yield part

    def _exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def _list(self, key: str) -> dict[str, int]:
        base = self._path(key)
        out: dict[str, int] = {}
        for dirpath, _, filenames in os.walk(base):
            for fn in filenames:
                name = (Path(dirpath) / fn).relative_to(base).as_posix()
                if name != MANIFEST and not _is_partial(name):
                    try:
                        out[_check_name(key, name)] = (Path(dirpath) / fn).stat().st_size
                    except FileNotFoundError:  # a concurrent writer replaced it; list the rest
                        continue
        return out

    def _children(self, under: str = "") -> list[str]:
        folder = self.root / under if under else self.root
        if not folder.is_dir():
            return []
        return [p.name for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]

    def _tree(self, folder: str) -> dict[str, tuple[int, float]]:
        base = self._path(folder)
        out: dict[str, tuple[int, float]] = {}
        for dirpath, _, filenames in os.walk(base):
            for fn in filenames:
                try:
                    st = (Path(dirpath) / fn).lstat()
                except FileNotFoundError:
                    continue
                out[(Path(dirpath) / fn).relative_to(base).as_posix()] = (st.st_size, st.st_mtime)
        return out

    def _delete(self, rel: str) -> None:
        self._path(rel).unlink(missing_ok=True)

    def _delete_tree(self, folder: str) -> int:
        path = self._path(folder)
        if not path.is_dir():
            return 0
        n = sum(len(files) for _, _, files in os.walk(path))
        shutil.rmtree(path)
        return n

    def _digests(self, key: str, files: dict[str, int]) -> dict[str, str]:
        """sha256 of every data file, each fsynced in the same read, then every folder of the
        artifact up to the store root: after a power loss the manifest written next never names
        an empty or missing file."""
        base = self._path(key)
        # Leftover temp files of killed writers are not part of the artifact: tidy them away.
        for p in base.rglob(f".*{_PARTIAL}"):
            p.unlink(missing_ok=True)
        digests = {n: _sha256_file(base / n, fsync=True) for n in files}
        folders = {self.root, base}
        for n in files:
            folders.update(p for p in (base / n).parents if p.is_relative_to(base))
        for folder in sorted(folders, key=lambda p: -len(p.parts)):  # deepest first
            _fsync_dir(folder)
        return digests

    def _manifest_signature(self, key: str) -> Any:
        try:
            st = self._path(f"{key}/{MANIFEST}").stat()
        except (FileNotFoundError, NotADirectoryError):
            return _NO_MANIFEST
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _cache_ident(self) -> str:
        return hashlib.sha256(self.uri.encode()).hexdigest()[:16]

    def uri_for(self, key: str, name: str = "") -> str:
        path = self._path(_check_key(key))
        return (path / _check_name(key, name) if name else path).as_uri()

    def download(self, key: str) -> Path:
        """A local artifact is already a local folder: return it once every file matches the
        manifest. The check is streamed once; afterwards sizes and mtimes recorded in a stamp
        under ``cache_root()`` let an unchanged folder through without reading it again."""
        manifest = self._finished(key)
        if manifest is None:
            self.manifest(key)  # raises ArtifactNotFound, saying why
            raise AssertionError("unreachable")
        dest = self._path(key)
        stamp = {"manifest": hashlib.sha256(manifest.raw).hexdigest()}
        with self._cache_lock(key) as stamp_path:
            if _stamp_ok(stamp_path, stamp, dest, manifest.files):
                return dest
            stamp_path.unlink(missing_ok=True)
            stats = {}
            for name, entry in manifest.files.items():
                if (dest / name).is_file():  # stat before reading: a later change re-checks
                    stats[name] = _stat(dest / name)
                self._verify_stream(key, entry)  # a missing file is named here
            stamp["files"] = stats
            atomic_write(stamp_path, lambda f: f.write(json.dumps(stamp).encode()))
        return dest

    def verify(self, key: str) -> None:
        self.download(key)  # checks in place, and stamps the folder so the next check is a stat

    def ray_storage(self) -> tuple[str, pafs.FileSystem | None]:
        return str(self.root / RAY_DIR), None


# ---------------------------------------------------------------------------------------------
# S3


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint: the argument, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else AWS."""
    return (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def _default_region() -> str | None:
    import boto3

    return boto3.session.Session().region_name


def _check_network(timeout: float, max_attempts: int) -> tuple[float, int]:
    if not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
        raise StoreError(f"S3 timeout must be a positive number of seconds, got {timeout!r} "
                         "(config key s3_timeout)")
    if not (isinstance(max_attempts, int) and max_attempts >= 1):
        raise StoreError(f"S3 max attempts must be an integer >= 1, got {max_attempts!r} "
                         "(config key s3_max_attempts)")
    return float(timeout), max_attempts


class S3RetryingFileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with boto3's "standard" retry mode and our timeouts, that keeps
    them across pickling (pyarrow's own pickle drops the retry strategy) and pickles without
    credentials: the process that unpickles it resolves its own from the standard AWS chain."""

    def __init__(self, *, max_attempts: int, **settings: Any):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
                         **settings)
        self._settings = dict(settings, max_attempts=max_attempts)

    def __reduce__(self):
        return _rebuild_filesystem, (self._settings,)

    @property
    def max_attempts(self) -> int:
        return self._settings["max_attempts"]


def _rebuild_filesystem(settings: dict[str, Any]) -> S3RetryingFileSystem:
    return S3RetryingFileSystem(**settings)


def _s3_filesystem(endpoint: str | None, region: str | None, bucket: str,
                   timeout: float = _TIMEOUTS["read_timeout"],
                   max_attempts: int = _TIMEOUTS["max_attempts"]) -> S3RetryingFileSystem:
    """pyarrow S3 filesystem carrying endpoint, region, timeouts and retries explicitly (no
    credentials), so the Ray processes it is shipped to need none of the driver's settings."""
    # request_timeout: on Linux, curl gives up after this long without a byte (a hung server).
    # allow_delayed_open: a file smaller than one part goes up in one PutObject, not a multipart
    # upload, whose CompleteMultipartUpload pyarrow cannot retry when S3 throttles it (its check
    # for errors embedded in a 200 keeps the 503's <Error> after the SDK's successful retry).
    kwargs: dict[str, Any] = {"connect_timeout": min(_TIMEOUTS["connect_timeout"], timeout),
                              "request_timeout": timeout, "allow_delayed_open": True}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["scheme"] = parsed.scheme or "https"
        kwargs["endpoint_override"] = (parsed.netloc + parsed.path.rstrip("/")) or endpoint
        kwargs["region"] = region or "us-east-1"  # S3-compatible servers ignore it but sign with it
    else:  # AWS: the bucket's own region (pyarrow does not follow region redirects)
        try:
            kwargs["region"] = pafs.resolve_s3_region(bucket)
        except (OSError, ValueError):
            if region:
                kwargs["region"] = region
    return S3RetryingFileSystem(max_attempts=max_attempts, **kwargs)


def _parse_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    if not bucket:
        raise StoreError(f"{uri!r}: an S3 URI needs a bucket: s3://bucket/prefix")
    return bucket, prefix


class S3Store(Store):
    """Artifacts under ``s3://bucket/prefix`` on AWS or any S3-compatible server."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None, region: str | None,
                 timeout: float = _TIMEOUTS["read_timeout"],
                 max_attempts: int = _TIMEOUTS["max_attempts"]):
        self.bucket, self.prefix = bucket, prefix
        self.endpoint_url, self.region = endpoint_url, region
        self.timeout, self.max_attempts = _check_network(timeout, max_attempts)
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._client_obj = None

    # Pickling: no client (not picklable, and it holds resolved credentials); the copy resolves
    # its own credentials from the standard chain where it lands.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_client_obj"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._client_obj = None

    @property
    def _client(self):
        if self._client_obj is None:
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=min(_TIMEOUTS["connect_timeout"], self.timeout),
                read_timeout=self.timeout,
                retries={"max_attempts": self.max_attempts, "mode": "standard"},
                # Path-style and no default CRC checksums: what MinIO/Ceph/R2 accept everywhere.
                s3={"addressing_style": "path"} if self.endpoint_url else None,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=32,
            )
            session = boto3.session.Session(region_name=self.region)
            self._client_obj = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client_obj

    def _obj(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _error(self, exc: BaseException, doing: str) -> StoreError:
        """Turn a botocore exception into a StoreError that says what to check (no secrets)."""
        from boto3.exceptions import S3UploadFailedError
        from botocore import exceptions as bx

        where = f"S3 store {self.uri} (endpoint {self.endpoint_url or 'AWS default'})"
        if isinstance(exc, S3UploadFailedError):
            exc = exc.__context__ or exc
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            why = ("no AWS credentials found. Set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                   "AWS_PROFILE or ~/.aws/credentials (or run where an instance role applies)")
        elif isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError,
                              bx.ReadTimeoutError, bx.ConnectionClosedError)):
            why = (f"cannot reach the endpoint ({type(exc).__name__} after {self.max_attempts} "
                   f"attempts of up to {self.timeout:g} s). Check that the server is up and that "
                   "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or the s3_endpoint config points at it "
                   "(s3_timeout / s3_max_attempts set how long to wait)")
        elif isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "?"))
            if code in ("NoSuchBucket",) or (code == "404" and doing == "check"):
                why = (f"bucket {self.bucket!r} does not exist there. Create it or fix the store "
                       "URI / endpoint")
            elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                          "ExpiredToken", "InvalidToken"):
                why = (f"access refused ({code}). Check the AWS credentials (AWS_ACCESS_KEY_ID, "
                       f"AWS_PROFILE, ~/.aws/credentials) and the bucket policy of {self.bucket!r}")
            else:
                why = f"{code}: {err.get('Message', '')}"
        else:
            why = f"{type(exc).__name__}"
        return StoreError(f"{where}: {doing} failed: {why}")

    def _call(self, doing: str, fn: Callable, *args, **kwargs):
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError, Boto3Error) as e:
            raise self._error(e, doing) from None

    @staticmethod
    def _missing(exc: BaseException) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
            "404", "NoSuchKey", "NotFound")

    def check(self) -> None:
        self._call("check", self._client.head_bucket, Bucket=self.bucket)

    def _write(self, rel: str, data: bytes) -> None:
        sha = hashlib.sha256(data).hexdigest()
        self._call(f"writing {self._obj(rel)}", self._client.put_object, Bucket=self.bucket,
                   Key=self._obj(rel), Body=data, Metadata={"sha256": sha})

    def _write_file(self, rel: str, path: Path) -> None:
        # The digest rides along as object metadata, so finalize need not read the data back.
        extra = {"Metadata": {"sha256": _sha256_file(path)}}
        self._call(f"uploading {path} to {self._obj(rel)}", self._client.upload_file, str(path),
                   self.bucket, self._obj(rel), ExtraArgs=extra)

    def _read(self, rel: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._obj(rel))["Body"].read()
        except (BotoCoreError, ClientError) as e:
            if self._missing(e):
                raise ArtifactNotFound(f"s3://{self.bucket}/{self._obj(rel)} not found") from None
            raise self._error(e, f"reading {self._obj(rel)}") from None

    def _head(self, rel: str) -> dict | None:
        """The object's metadata, or None when there is no such object."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._client.head_object(Bucket=self.bucket, Key=self._obj(rel))
        except (BotoCoreError, ClientError) as e:
            if self._missing(e):
                return None
            raise self._error(e, f"reading {self._obj(rel)}") from None

    def _exists(self, rel: str) -> bool:
        return self._head(rel) is not None

    def _chunks(self, rel: str, chunk: int = _CHUNK) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._obj(rel))["Body"]
        except (BotoCoreError, ClientError) as e:
            if self._missing(e):
                raise ArtifactNotFound(f"s3://{self.bucket}/{self._obj(rel)} not found") from None
            raise self._error(e, f"reading {self._obj(rel)}") from None
        try:
            while part := body.read(chunk):
                yield part
        except BotoCoreError as e:  # the connection broke mid-object
            raise self._error(e, f"reading {self._obj(rel)}") from None
        finally:
            body.close()

    def _objects(self, folder: str) -> Iterator[dict]:
        """Every object under ``folder/`` (paginated listing)."""
        base = self._obj(f"{folder}/")
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
        for page in self._call(f"listing {base}", list, pages):
            yield from page.get("Contents", [])

    def _list(self, key: str) -> dict[str, int]:
        base = self._obj(f"{key}/")
        out: dict[str, int] = {}
        for obj in self._objects(key):
            name = obj["Key"][len(base):]
            if name and not name.endswith("/") and name != MANIFEST:  # '/' = folder markers
                # Names come from the bucket and end up in manifests and local paths: the write
                # rule applies ('../x', '/abs', 'a//b' are refused here, naming the object).
                try:
                    out[_check_name(key, name)] = obj["Size"]
                except StoreError as e:
                    raise StoreError(f"listing of {self.uri_for(key)}: refusing object "
                                     f"s3://{self.bucket}/{obj['Key']}: {e}") from None
        return out

    def _children(self, under: str = "") -> list[str]:
        base = self._obj(f"{under}/") if under else self._obj("")
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base, Delimiter="/")
        names = []
        for page in self._call(f"listing {self.uri}", list, pages):
            names += [p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return names

    def _tree(self, folder: str) -> dict[str, tuple[int, float]]:
        base = self._obj(f"{folder}/")
        return {o["Key"][len(base):]: (int(o["Size"]), o["LastModified"].timestamp())
                for o in self._objects(folder)}

    def _delete(self, rel: str) -> None:
        self._call(f"deleting {self._obj(rel)}", self._client.delete_object, Bucket=self.bucket,
                   Key=self._obj(rel))

    def _delete_tree(self, folder: str) -> int:
        keys = [o["Key"] for o in self._objects(folder)]
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": k} for k in keys[i:i + _DELETE_BATCH]]
            out = self._call(f"deleting {self._obj(folder)}/", self._client.delete_objects,
                             Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if out.get("Errors"):
                err = out["Errors"][0]
                raise StoreError(f"S3 store {self.uri}: deleting {self._obj(folder)}/ failed for "
                                 f"{len(out['Errors'])} objects, e.g. {err.get('Key')}: "
                                 f"{err.get('Code')} {err.get('Message', '')}")
        return len(keys)

    def _manifest_signature(self, key: str) -> Any:
        return None  # trusted: a re-made artifact is noticed when a file stops matching

    def _cache_ident(self) -> str:
        return hashlib.sha256(f"{self.endpoint_url}|{self.uri}".encode()).hexdigest()[:16]

    def _digest(self, rel: str, size: int) -> str:
        head = self._head(rel)
        sha = (head or {}).get("Metadata", {}).get("sha256")
        if head is not None and sha and head.get("ContentLength") == size:
            return sha
        # Written by another tool (Ray, pyarrow): stream it once.
        body = self._call(f"reading {self._obj(rel)}", self._client.get_object,
                          Bucket=self.bucket, Key=self._obj(rel))["Body"]
        h = hashlib.sha256()
        for chunk in iter(lambda: body.read(_CHUNK), b""):
            h.update(chunk)
        return h.hexdigest()

    def _digests(self, key: str, files: dict[str, int]) -> dict[str, str]:
        with cf.ThreadPoolExecutor(16) as pool:
            futs = {n: pool.submit(self._digest, f"{key}/{n}", s) for n, s in files.items()}
            return {n: f.result() for n, f in futs.items()}

    def uri_for(self, key: str, name: str = "") -> str:
        rel = f"{_check_key(key)}/{_check_name(key, name)}" if name else _check_key(key)
        return f"s3://{self.bucket}/{self._obj(rel)}"

    def ray_storage(self) -> tuple[str, pafs.FileSystem | None]:
        fs = _s3_filesystem(self.endpoint_url, self.region, self.bucket, self.timeout, self.max_attempts)
        return f"{self.bucket}/{self._obj(RAY_DIR)}", fs

    def upload_ray_dir(self, local_dir: Path, fs_path: str) -> None:
        """Upload a Ray Train checkpoint folder to ``fs_path`` (``bucket/prefix/_ray/...``, as
        Ray names it) through boto3, whose multipart uploads survive throttling (pyarrow's do not,
        see ``_s3_filesystem``)."""
        root = f"{self.bucket}/{self._obj(RAY_DIR)}/"
        if not fs_path.startswith(root) or ".." in fs_path.split("/"):
            raise StoreError(f"{fs_path!r} is not under this store's Ray folder {root}")
        base = fs_path[len(self.bucket) + 1:].rstrip("/")
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            key = f"{base}/{path.relative_to(local_dir).as_posix()}"
            self._call(f"uploading {path} to {key}", self._client.upload_file, str(path), self.bucket, key)

    # -- download into the local cache --------------------------------------------------------
    def download(self, key: str) -> Path:
        """Copy a finished artifact into the local cache, verified against its manifest.

        A complete, unchanged copy is reused without reading it again (sizes + mtimes recorded
        after the last verification); anything else is re-checked by sha256 and re-fetched, each
        object hashed as it streams to disk. Concurrent callers on one machine (Ray workers)
        serialise on a lock file.
        """
        manifest = self._finished(key)
        if manifest is None:
            self.manifest(key)  # raises ArtifactNotFound, saying why
            raise AssertionError("unreachable")
        try:
            return self._download(key, manifest)
        except IntegrityError:
            fresh = self._finished(key, refresh=True)  # re-made since this process cached it?
            if fresh is None or fresh.raw == manifest.raw:
                raise
            return self._download(key, fresh)

    def _download(self, key: str, manifest: _Manifest) -> Path:
        dest = self.cache_dir(key)
        # Every name passed the write rule when the manifest was parsed, before it touches a path
        # here (a hostile '../../x' or '/abs' would otherwise be written outside the cache).
        want = manifest.files
        with self._cache_lock(key) as stamp_path:
            stamp = {"manifest": hashlib.sha256(manifest.raw).hexdigest()}
            if _stamp_ok(stamp_path, stamp, dest, want):
                return dest
            stamp_path.unlink(missing_ok=True)
            stale = [n for n, f in want.items() if not _local_matches(dest / n, f)]
            with cf.ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda n: self._fetch_verified(key, want[n], dest / n), stale))
            for path in [p for p in dest.rglob("*") if p.is_file()]:
                rel = path.relative_to(dest).as_posix()
                if rel != MANIFEST and rel not in want:  # from an older version of this key
                    path.unlink()
            atomic_write(dest / MANIFEST, lambda f: f.write(manifest.raw))
            stamp["files"] = {n: _stat(dest / n) for n in want}
            atomic_write(stamp_path, lambda f: f.write(json.dumps(stamp).encode()))
        return dest

    def _fetch_verified(self, key: str, entry: dict, path: Path) -> None:
        """One object into ``path``, hashed as it streams; nothing is kept when it mismatches."""
        atomic_write(path, lambda f: self._verify_stream(key, entry, f.write))


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


# ---------------------------------------------------------------------------------------------
# entry points


def _local_path(uri: str) -> Path:
    if uri.startswith("file:"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"{uri!r}: a file:// URI must name an absolute local path "
                             "(file:///abs/path)")
        return Path(unquote(parsed.path)).resolve()
    return Path(uri).expanduser().resolve()


def open_store(uri: str, endpoint_url: str | None = None, *, check: bool = True,
               timeout: float = _TIMEOUTS["read_timeout"],
               max_attempts: int = _TIMEOUTS["max_attempts"]) -> Store:
    """The store at ``uri``: a local path, ``file:///abs/path`` or ``s3://bucket/prefix``.

    ``endpoint_url`` (S3 only) beats AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL. With ``check``
    (default) the store is reached once now, so a wrong endpoint, a missing bucket or missing
    credentials fail here with a StoreError instead of after the first stage computed.
    ``timeout`` (seconds per request) and ``max_attempts`` (per request, retries included)
    apply to S3, in boto3 and in the pyarrow filesystems handed to Ray alike.
    """
    if not uri:
        raise StoreError("empty store URI: give a local path, file:///abs/path or s3://bucket/prefix")
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        bucket, prefix = _parse_s3(uri)
        store: Store = S3Store(bucket, prefix, resolve_endpoint(endpoint_url), _default_region(),
                               timeout, max_attempts)
    elif scheme in ("", "file") or len(scheme) == 1:  # len 1: a Windows drive letter
        store = LocalStore(_local_path(uri))
    else:
        raise StoreError(f"{uri!r}: unsupported store scheme {scheme!r}; use a local path, "
                         "file:// or s3://bucket/prefix (S3-compatible servers via their endpoint)")
    if check:
        store.check()
    return store


def resolve_filesystem(uri: str, endpoint_url: str | None = None, *,
                       timeout: float = _TIMEOUTS["read_timeout"],
                       max_attempts: int = _TIMEOUTS["max_attempts"]) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) for a dataset or artifact URI, for Ray Data readers.

    S3 paths come back as ``bucket/prefix`` with a filesystem carrying the endpoint (argument,
    else the standard env vars), timeouts and retries; each process that unpickles it resolves
    credentials from its own standard chain.
    """
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        bucket, prefix = _parse_s3(uri)
        timeout, max_attempts = _check_network(timeout, max_attempts)
        fs = _s3_filesystem(resolve_endpoint(endpoint_url), _default_region(), bucket, timeout,
                            max_attempts)
        return fs, f"{bucket}/{prefix}".rstrip("/")
    if scheme in ("", "file") or len(scheme) == 1:
        return pafs.LocalFileSystem(), str(_local_path(uri))
    try:  # gs://, hdfs://, ... whatever this pyarrow build supports
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise StoreError(f"{uri!r}: no filesystem for scheme {scheme!r} ({e})") from None

