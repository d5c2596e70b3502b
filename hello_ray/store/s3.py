"""The S3 backend (boto3 for objects, a retrying ``pyarrow.fs.S3FileSystem`` for Ray)."""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

from hello_ray.store.keys import (
    ArtifactNotFound,
    IntegrityError,
    MANIFEST,
    RAY_DIR,
    StoreError,
    _CHUNK,
    _TIMEOUTS,
    _check_key,
    _check_name,
    _sha256_file,
    atomic_write,
)
from hello_ray.store.base import Store, _Manifest, _local_matches, _stamp_ok, _stat

_DELETE_BATCH = 1000  # S3 DeleteObjects takes at most 1,000 keys per call


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
        for i in range(0, len(keys)):
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
