"""Leases as stored: the lease record (``LeaseInfo``), and its two backends (a local lock file, a
conditional S3 object), read and checked without holding one."""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from hello_ray.store import LEASE_DIR, LocalStore, S3Store, StoreError, _check_key, atomic_write

if TYPE_CHECKING:
    from hello_ray.store import Store

log = logging.getLogger("hello_ray.lease")

DEFAULT_TTL_S = 60.0


class LeaseHeld(StoreError):
    """Another live driver holds the key's lease and the caller asked not to wait."""


class LeaseLost(StoreError):
    """This writer's lease was taken over (after it expired) or could not be renewed in time."""


@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    """A lease object as read from the store; ``token`` is its version (S3 ETag, local sha256)."""
    owner: str
    host: str
    pid: int
    expires: float
    stage: str
    token: str = ""

    @classmethod
    def parse(cls, data: bytes, token: str) -> "LeaseInfo":
        """A garbled object (a foreign tool, a torn copy) counts as an expired lease of nobody,
        so it can be taken over instead of blocking the key forever."""
        try:
            d = json.loads(data)
            return cls(str(d["owner"]), str(d["host"]), int(d["pid"]), float(d["expires"]),
                       str(d["stage"]), token)
        except (ValueError, KeyError, TypeError):
            return cls("?", "?", 0, 0.0, "?", token)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires

    def describe(self, now: float | None = None) -> str:
        left = self.expires - (time.time() if now is None else now)
        when = time.strftime("%H:%M:%S", time.localtime(self.expires))
        state = f"expires {when}, in {left:.0f} s" if left > 0 else f"expired {when}, {-left:.0f} s ago"
        return f"host {self.host} pid {self.pid} ({self.stage}, lease {self.owner[:8]}, {state})"


# ---------------------------------------------------------------------------- backends

class _LocalLeases:
    """Lease objects as files; compare-and-swap under one lock file of the lease folder."""

    def __init__(self, root: Path):
        self.dir = root / LEASE_DIR

    def _path(self, key: str) -> Path:
        return self.dir / f"{_check_key(key)}.json"

    def where(self, key: str) -> str:
        return str(self._path(key))

    def read(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # A lock file, not the folder: flock on NFS needs a file opened for writing.
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def create(self, key: str, data: bytes) -> str | None:
        path = self._path(key)
        with self._locked():
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, path)  # fails when the name exists, and the content is already whole
            except FileExistsError:
                return None
            finally:
                tmp.unlink(missing_ok=True)
        return hashlib.sha256(data).hexdigest()

    def replace(self, key: str, data: bytes, token: str) -> str | None:
        with self._locked():
            cur = self.read(key)
            if cur is None or cur[1] != token:
                return None
            atomic_write(self._path(key), lambda f: f.write(data), fsync=True)
        return hashlib.sha256(data).hexdigest()

    def delete(self, key: str, token: str) -> bool:
        with self._locked():
            cur = self.read(key)
            if cur is None or cur[1] != token:
                return False
            self._path(key).unlink()
        return True


class _S3Leases:
    """Lease objects on S3 with conditional writes (If-None-Match / If-Match on the ETag)."""

    _probed: set[str] = set()  # stores whose server was seen to honour the conditions

    def __init__(self, store: S3Store):
        self.store = store

    def _obj(self, key: str) -> str:
        return self.store._obj(f"{LEASE_DIR}/{_check_key(key)}.json")

    def where(self, key: str) -> str:
        return f"s3://{self.store.bucket}/{self._obj(key)}"

    @staticmethod
    def _code(exc: BaseException) -> str:
        from botocore.exceptions import ClientError

        return str(exc.response.get("Error", {}).get("Code", "")) if isinstance(exc, ClientError) else ""

    def _conditional(self, doing: str, fn: Callable, **kwargs):
        """``fn(**kwargs)``; None when its precondition failed (412, a 409 race, or the object is gone)."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.store.bucket, **kwargs)
        except ClientError as e:
            if self._code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409",
                                 "NoSuchKey", "404", "NotFound"):
                return None
            raise self.store._error(e, doing) from None
        except (BotoCoreError, Boto3Error) as e:
            raise self.store._error(e, doing) from None

    def read(self, key: str) -> tuple[bytes, str] | None:
        out = self._conditional(f"reading {self._obj(key)}", self.store._client.get_object, Key=self._obj(key))
        return None if out is None else (out["Body"].read(), out["ETag"])

    def create(self, key: str, data: bytes) -> str | None:
        self._probe()
        out = self._conditional(f"creating {self._obj(key)}", self.store._client.put_object,
                                Key=self._obj(key), Body=data, IfNoneMatch="*")
        return None if out is None else out["ETag"]

    def replace(self, key: str, data: bytes, token: str) -> str | None:
        out = self._conditional(f"renewing {self._obj(key)}", self.store._client.put_object,
                                Key=self._obj(key), Body=data, IfMatch=token)
        return None if out is None else out["ETag"]

    def delete(self, key: str, token: str) -> bool:
        out = self._conditional(f"releasing {self._obj(key)}", self.store._client.delete_object,
                                Key=self._obj(key), IfMatch=token)
        return out is not None

    def _probe(self) -> None:
        """Once per store and process: a server that ignores If-None-Match / If-Match would let two
        drivers both 'acquire' a key, so it is refused with a clear error instead."""
        ident = f"{self.store.endpoint_url}|{self.store.uri}"
        if ident in self._probed:
            return
        probe = self._obj(f"_probe-{uuid.uuid4().hex[:12]}")
        client = self.store._client
        first = self._conditional(f"creating {probe}", client.put_object, Key=probe, Body=b"1", IfNoneMatch="*")
        try:
            second = self._conditional(f"creating {probe}", client.put_object, Key=probe, Body=b"2",
                                       IfNoneMatch="*")
            stale = self._conditional(f"writing {probe}", client.put_object, Key=probe, Body=b"3",
                                      IfMatch='"00000000000000000000000000000000"')
        finally:
            self.store._call(f"deleting {probe}", client.delete_object, Bucket=self.store.bucket, Key=probe)
        if first is None or second is not None or stale is not None:
            raise StoreError(
                f"S3 store {self.store.uri} (endpoint {self.store.endpoint_url or 'AWS default'}): the "
                "server ignores conditional writes (If-None-Match / If-Match on PutObject), so two "
                "drivers could write one artifact at once. Use AWS S3, a MinIO release from 2024 on, "
                "or another server with conditional writes")
        self._probed.add(ident)


def _backend(store: "Store") -> _LocalLeases | _S3Leases:
    if isinstance(store, LocalStore):
        return _LocalLeases(store.root)
    if isinstance(store, S3Store):
        return _S3Leases(store)
    raise StoreError(f"{store!r}: no lease backend for {type(store).__name__}")


def read_lease(store: "Store", key: str) -> LeaseInfo | None:
    """The key's lease as stored (expired or not), or None when nobody holds or held it."""
    cur = _backend(store).read(key)
    return None if cur is None else LeaseInfo.parse(*cur)


def lease_active(store: "Store", key: str, now: float | None = None) -> bool:
    """True while a writer holds an unexpired lease on ``key`` (``hello-ray gc`` skips it, ``rm``
    refuses it)."""
    info = read_lease(store, key)
    return info is not None and not info.expired(now)
