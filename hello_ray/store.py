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
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import uuid
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, Callable
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

MANIFEST = "manifest.json"
# Bump when the key derivation or the manifest layout changes: old artifacts then stop matching.
FORMAT_VERSION = 1
RAY_DIR = "_ray"
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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _is_partial(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".") and base.endswith(_PARTIAL)


# ---------------------------------------------------------------------------------------------
# the store


class Store(ABC):
    """Common logic of both backends; subclasses provide the object primitives.

    Picklable: Ray tasks and workers receive it and talk to the same storage.
    """

    uri: str

    # -- primitives (per backend); ``rel`` is "<key>/<name>" ---------------------------------
    @abstractmethod
    def _write(self, rel: str, data: bytes) -> None: ...

    @abstractmethod
    def _write_file(self, rel: str, path: Path) -> None: ...

    @abstractmethod
    def _read(self, rel: str) -> bytes:
        """The object's bytes; ArtifactNotFound when absent."""

    @abstractmethod
    def _exists(self, rel: str) -> bool: ...

    @abstractmethod
    def _list(self, key: str) -> dict[str, int]:
        """name -> size of the artifact's data files (no manifest, no temp files)."""

    @abstractmethod
    def _children(self) -> list[str]:
        """Names of the top-level folders of the store."""

    @abstractmethod
    def _digests(self, key: str, files: dict[str, int]) -> dict[str, str]:
        """name -> sha256 of the listed files."""

    @abstractmethod
    def uri_for(self, key: str, name: str = "") -> str: ...

    @abstractmethod
    def download(self, key: str) -> Path:
        """A local folder holding the finished artifact."""

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

    def put_bytes(self, key: str, name: str, data: bytes) -> None:
        self._write(f"{_check_key(key)}/{_check_name(key, name)}", bytes(data))

    def put_file(self, key: str, name: str, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"artifact {key}: cannot store {name!r}: {path} is not a file")
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
        return self._read(f"{_check_key(key)}/{_check_name(key, name)}")

    def list_files(self, key: str) -> list[str]:
        """Names (relative to the artifact) of its data files, without the manifest."""
        return sorted(self._list(_check_key(key)))

    def _read_manifest_bytes(self, key: str) -> bytes:
        try:
            return self._read(f"{_check_key(key)}/{MANIFEST}")
        except ArtifactNotFound:
            raise ArtifactNotFound(f"artifact {key} not found in {self.uri}: no {MANIFEST} "
                                   "(never run, or its run stopped before finishing)") from None

    def manifest(self, key: str) -> dict:
        text = self._read_manifest_bytes(key)
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise StoreError(f"{self.uri_for(key, MANIFEST)} is not valid JSON: {e}") from None

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
        self._write(f"{key}/{MANIFEST}", text.encode())
        return json.loads(text)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


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
        atomic_write(self._path(rel), lambda f: f.write(data), fsync=rel.endswith(MANIFEST))

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
                        out[name] = (Path(dirpath) / fn).stat().st_size
                    except FileNotFoundError:  # a concurrent writer replaced it; list the rest
                        continue
        return out

    def _children(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.is_dir()]

    def _digests(self, key: str, files: dict[str, int]) -> dict[str, str]:
        base = self._path(key)
        # Leftover temp files of killed writers are not part of the artifact: tidy them away.
        for p in base.rglob(f".*{_PARTIAL}"):
            p.unlink(missing_ok=True)
        return {n: _sha256_file(base / n) for n in files}

    def uri_for(self, key: str, name: str = "") -> str:
        path = self._path(_check_key(key))
        return (path / _check_name(key, name) if name else path).as_uri()

    def download(self, key: str) -> Path:
        """A local store's artifact is already a local folder: return it (if finished)."""
        self.manifest(key)
        return self._path(key)

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

    def _list(self, key: str) -> dict[str, int]:
        base = self._obj(f"{key}/")
        out: dict[str, int] = {}
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
        for page in self._call(f"listing {base}", list, pages):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(base):]
                if name and not name.endswith("/") and name != MANIFEST:  # '/' = folder markers
                    out[name] = obj["Size"]
        return out

    def _children(self) -> list[str]:
        base = self._obj("")
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base, Delimiter="/")
        names = []
        for page in self._call(f"listing {self.uri}", list, pages):
            names += [p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return names

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
    def cache_dir(self, key: str) -> Path:
        root = cache_root()
        ident = hashlib.sha256(f"{self.endpoint_url}|{self.uri}".encode()).hexdigest()[:16]
        return root / ident / _check_key(key)

    def download(self, key: str) -> Path:
        """Copy a finished artifact into the local cache, verified against its manifest.

        A complete, unchanged copy is reused without reading it again (sizes + mtimes recorded
        after the last verification); anything else is re-checked by sha256 and re-fetched.
        Concurrent callers on one machine (Ray workers) serialise on a lock file.
        """
        raw = self._read_manifest_bytes(key)
        manifest = json.loads(raw)
        dest = self.cache_dir(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        stamp_path = dest.parent / f"{key}.verified.json"
        with open(dest.parent / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Names come from the bucket: the write rule applies before any touches a local path
            # (a hostile '../../x' or '/abs' would otherwise be written outside the cache).
            want = {_check_name(key, f.get("name") if isinstance(f, dict) else None): f
                    for f in manifest.get("files", [])}
            stamp = {"manifest": hashlib.sha256(raw).hexdigest()}
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
            atomic_write(dest / MANIFEST, lambda f: f.write(raw))
            stamp["files"] = {n: _stat(dest / n) for n in want}
            atomic_write(stamp_path, lambda f: f.write(json.dumps(stamp).encode()))
        return dest

    def _fetch_verified(self, key: str, entry: dict, path: Path) -> None:
        rel = f"{key}/{entry['name']}"

        def fetch(f: BinaryIO) -> None:
            body = self._call(f"reading {self._obj(rel)}", self._client.get_object,
                              Bucket=self.bucket, Key=self._obj(rel))["Body"]
            h = hashlib.sha256()
            for chunk in iter(lambda: body.read(_CHUNK), b""):
                h.update(chunk)
                f.write(chunk)
            if h.hexdigest() != entry["sha256"]:
                raise StoreError(
                    f"{self.uri_for(key, entry['name'])}: sha256 {h.hexdigest()[:16]}... does not "
                    f"match the manifest's {entry['sha256'][:16]}... (size {f.tell()} vs "
                    f"{entry['size']}): the object was changed or corrupted after the artifact was "
                    "finished. Re-run its stage or delete the artifact")

        atomic_write(path, fetch)


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

