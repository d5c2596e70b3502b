"""The store's names and rules: key derivation, file-name checks, constants, errors, atomic local writes."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import sys
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, Callable


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


def key_stage(key: str) -> str:
    """The stage an artifact key names (:func:`artifact_key`'s ``stage``: everything before its
    last '-'); a helper key (``_preflight``) names none and is returned whole."""
    return key.rsplit("-", 1)[0]


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
