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

from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

# The package's one face: every name its users import comes from here (keys.py: names, rules and
# errors; base.py: the interface and manifests; local.py and s3.py: the backends).
from hello_ray.store.base import Store
from hello_ray.store.keys import (  # noqa: F401 (re-exported)
    _TIMEOUTS,
    FORMAT_VERSION,
    LEASE_DIR,
    MANIFEST,
    RAY_DIR,
    ArtifactNotFound,
    IntegrityError,
    StoreError,
    _check_key,
    _check_name,
    _is_partial,
    artifact_key,
    atomic_write,
    cache_root,
    is_artifact_key,
    key_stage,
    library_versions,
    rm_hint,
)
from hello_ray.store.local import LocalStore
from hello_ray.store.s3 import (  # noqa: F401 (re-exported)
    S3RetryingFileSystem,
    S3Store,
    _check_network,
    _default_region,
    _parse_s3,
    _s3_filesystem,
    resolve_endpoint,
)

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
