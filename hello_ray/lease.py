"""One writer per artifact: a lease per key, on S3 and on local disk.

A driver that is about to run a stage takes the lease of the stage's artifact key first; a second
driver (the same config twice, ``distill`` beside ``sweep``, a colleague) finds it held and waits,
then reuses the finished artifact, or takes over when the owner died; or, with
``compute.lease_wait=false``, refuses at once (:class:`LeaseHeld`).

The lease is one small object per key, ``<store root>/_leases/<key>.json``::

    {"owner": "<uuid4 hex>", "host": "...", "pid": 123, "expires": <unix seconds>, "stage": "teachers"}

- **Acquire** is a conditional create: S3 ``PutObject`` with ``If-None-Match: *`` (AWS, MinIO and
  moto's server refuse it with 412 when the object exists); local: a fully written temp file
  hard-linked to the name (``link`` fails when the name exists: ``O_EXCL`` semantics with the
  content already complete).
- **Renewal**: the owner's thread rewrites the object with a new ``expires`` every ``ttl/3``, as a
  conditional overwrite against the version it wrote last (S3 ``If-Match: <etag>``; local: a
  compare-and-replace of the content's sha256 under a lock file). A failed precondition means
  someone took the lease over after it expired (the owner was paused or cut off): the lease is
  *lost*, and the owner stops (see fencing) instead of writing on.
- **Expiry and takeover**: a lease whose ``expires`` has passed belongs to nobody: a crashed
  driver's lease frees itself after at most ``ttl``. Taking it over is again a conditional
  overwrite against the expired version as read, so of two drivers taking over at once one wins.
- **Release** after finalize (and after a failure) is a conditional delete of our version.

**Fencing.** The workers of a stage (Ray Train ranks, actors) write through pickled copies of the
store. The owner registers a :class:`Fence` on its store (``store.fences[key]``) before the stage
starts, so every ``put_*`` into the key and the final manifest write first check that the lease is
still this owner's and valid for at least another ``ttl/3`` (the lease is re-read at most once
per ``ttl/3``: the check is cached up to ``expires - ttl/3``, which nobody can take over before).
A writer that lost its lease therefore fails its next write with :class:`LeaseLost`, before a
taker-over can have started. The residual window is a write that passed its check and then took
longer than ``ttl/3`` to land (a paused process, a huge upload); hosts' clocks are assumed to agree
within a few seconds (NTP). The owner's driver learns of the loss from its renewal thread, and
``Run.done`` re-proves the lease (one conditional write) before finalizing. Ray Train's checkpoint
uploads go through Ray, not the store: teachers writes each epoch file *before* its checkpoint, so
a fenced rank stops before checkpointing; transfer and evaluate report checkpoints between store
writes, so a stale run of theirs may add checkpoints under ``_ray/<key>`` until its next write.
That never reaches the new owner's files; it matters only if the new owner dies too and a third
resumes (from a checkpoint of the same config either way).

**What a finished artifact holds.** Writers of a key follow each other, never overlap. When a
writer takes an unfinished key, whatever the earlier attempt left there is either resume state or
garbage, and :func:`prepare_key` decides which with one rule: if the key has Ray run state
(``<store>/_ray/<key>``: a Ray Train stage that got as far as starting its run), the files are the
state that run resumes with (teachers' epoch files up to its last checkpoint, evaluate's stored
labels) and are kept (so are the files of a stage that resumes from its own files: recover, whose
batches each write their images and then a marker), exactly as a Ray Train restart inside one driver keeps them, and the resumed
run rewrites everything after its checkpoint; otherwise (select, refine, or a run that never
started) every file is removed, so the new attempt starts clean. Stale ``.partial`` temp files
are removed in both cases (their writers are gone: the lease is ours). So the manifest lists the
files of one lineage of attempts, each continuing the previous one's Ray checkpoint, never files
of two writers at once.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from hello_ray.store import (LEASE_DIR, RAY_DIR, LocalStore, S3Store, StoreError, _check_key, _is_partial,
                             atomic_write)

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


# ---------------------------------------------------------------------------- fence (travels with the store)

@dataclasses.dataclass
class Fence:
    """Checked before every write into ``key`` by a store that carries it (pickled into workers)."""
    key: str
    owner: str
    margin: float                   # refuse once the lease has less than this left (ttl / 3)
    valid_until: float = 0.0        # cached: nobody can take the lease over before expires - margin

    def check(self, store: "Store") -> None:
        now = time.time()
        if now < self.valid_until:
            return
        info = read_lease(store, self.key)
        if info is None or info.owner != self.owner:
            who = "released" if info is None else f"taken over by {info.describe(now)}"
            raise LeaseLost(f"artifact {self.key}: this writer's lease {self.owner[:8]} was {who}; "
                            "stopping instead of writing into another writer's artifact")
        if info.expires - now <= self.margin:
            raise LeaseLost(f"artifact {self.key}: this writer's lease {self.owner[:8]} was not renewed "
                            f"in time ({info.describe(now)}); another driver may take it over, so this "
                            "one stops writing")
        self.valid_until = info.expires - self.margin


# ---------------------------------------------------------------------------- the lease of one writer

class Lease:
    """One writer's lease on one key: ``try_acquire``, then renewed by a thread until ``release``."""

    def __init__(self, store: "Store", key: str, stage: str, ttl: float = DEFAULT_TTL_S):
        if not ttl > 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {ttl!r}")
        self.store, self.key, self.stage, self.ttl = store, _check_key(key), stage, float(ttl)
        self.owner = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.took_over: LeaseInfo | None = None   # the expired lease this one replaced
        self.lost: str | None = None              # why the lease was lost, once it is
        self._backend = _backend(store)
        self._token: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._token is not None and self.lost is None

    @property
    def where(self) -> str:
        return self._backend.where(self.key)

    def _payload(self) -> bytes:
        self._expires = time.time() + self.ttl
        return json.dumps({"owner": self.owner, "host": self.host, "pid": self.pid,
                           "expires": self._expires, "stage": self.stage}, sort_keys=True).encode()

    def _mine(self) -> LeaseInfo | None:
        """Our lease as stored, when it is ours (a retried request may have landed before failing)."""
        info = read_lease(self.store, self.key)
        return info if info is not None and info.owner == self.owner else None

    def try_acquire(self) -> LeaseInfo | None:
        """Take the lease when it is free or expired and start renewing it: None. Otherwise the
        holder's lease as read (expired when a race was lost or it vanished meanwhile: try again)."""
        cur = read_lease(self.store, self.key)
        data = self._payload()
        if cur is None:
            token = self._backend.create(self.key, data)
        elif cur.expired():
            token = self._backend.replace(self.key, data, cur.token)
        else:
            return cur
        if token is None:                      # lost the race; or our own request landed twice
            mine = self._mine()
            if mine is None:
                return read_lease(self.store, self.key) or LeaseInfo("?", "?", 0, 0.0, "?")
            token = mine.token
        self._token, self.took_over, self.lost = token, cur, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.key}", daemon=True)
        self._thread.start()
        return None

    def renew(self) -> None:
        """Extend the lease by ``ttl`` from now; LeaseLost when someone else holds it now."""
        with self._lock:
            if self._token is None:
                raise LeaseLost(f"artifact {self.key}: lease {self.owner[:8]} is not held")
            data = self._payload()
            token = self._backend.replace(self.key, data, self._token)
            if token is None:
                mine = self._mine()
                if mine is None or abs(mine.expires - self._expires) > 1e-6:
                    info = read_lease(self.store, self.key)
                    who = "released by someone else" if info is None else f"taken over by {info.describe()}"
                    raise LeaseLost(f"artifact {self.key}: the lease of this writer ({self.host} pid "
                                    f"{self.pid}, lease {self.owner[:8]}) was {who}")
                token = mine.token
            self._token = token

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLost as e:
                self.lost = str(e)
                log.error("%s: this writer stops; its next write into the artifact fails", e)
                return
            except (StoreError, OSError) as e:  # the store is unreachable for now: retry until too late
                if time.time() >= self._expires - self.ttl / 3:
                    self.lost = f"artifact {self.key}: could not renew the lease before it ran out ({e})"
                    log.error("%s", self.lost)
                    return
                log.warning("artifact %s: renewing the lease failed, retrying: %s", self.key, e)

    def check(self) -> None:
        """LeaseLost when this lease is no longer ours (taken over, not renewed, released)."""
        if self.lost is not None:
            raise LeaseLost(self.lost)
        if self._token is None:
            raise LeaseLost(f"artifact {self.key}: lease {self.owner[:8]} is not held")
        try:
            self.renew()  # one conditional write: proves, now, that nobody took it over
        except LeaseLost:
            raise
        except (StoreError, OSError):
            # The store hiccuped: our last renewal still stands for a while, and finalize's
            # fence re-reads the lease before the manifest is written.
            if time.time() >= self._expires - self.ttl / 3:
                raise

    def fence(self) -> Fence:
        return Fence(self.key, self.owner, margin=self.ttl / 3)

    def release(self) -> None:
        """Stop renewing and delete the lease object (only our version of it). Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, self.ttl))
        with self._lock:
            token, self._token = self._token, None
        if token is None:
            return
        try:
            if not self._backend.delete(self.key, token) and self.lost is None:
                log.warning("artifact %s: the lease was no longer this writer's when releasing it", self.key)
        except (StoreError, OSError) as e:  # never hide the error a failed stage is raising
            log.warning("artifact %s: could not release the lease (%s); it frees itself when it "
                        "expires, within %.0f s", self.key, e, self.ttl)

    def record(self) -> dict:
        """Who wrote the artifact (into its manifest summary)."""
        prev = self.took_over
        return {"owner": self.owner, "host": self.host, "pid": self.pid,
                "took_over": None if prev is None else {"owner": prev.owner, "host": prev.host,
                                                        "pid": prev.pid, "expired": prev.expires}}


# ---------------------------------------------------------------------------- what the recipe calls

def acquire(store: "Store", key: str, stage: str, *, ttl: float = DEFAULT_TTL_S, wait: bool = True,
            finished: Callable[[], bool], poll_s: float | None = None,
            logger: logging.Logger = log) -> Lease | None:
    """The key's lease, held and renewing; or None when ``finished()`` became true while waiting
    for another driver (reuse its artifact). A live holder: with ``wait`` one log line naming it,
    then polling; without, :class:`LeaseHeld`. An expired holder is taken over (logged)."""
    lease = Lease(store, key, stage, ttl)
    poll = poll_s if poll_s is not None else max(0.05, min(5.0, ttl / 4))
    announced = None
    while True:
        try:
            holder = lease.try_acquire()
        except LeaseHeld:
            raise
        except (StoreError, OSError) as e:
            if announced is None:       # before any waiting: a store that cannot be used at all
                raise
            logger.warning("[%s] %s: the store failed while waiting (%s); still waiting", stage, key, e)
            time.sleep(poll)
            continue
        if holder is None:
            if finished():              # finished between our check and the acquire: reuse it
                lease.release()
                return None
            prev = lease.took_over
            if prev is not None:
                logger.warning("[%s] %s: taking over the lease of %s", stage, key, prev.describe())
            elif announced is not None:
                logger.warning("[%s] %s: the driver writing it stopped without finishing it (its "
                               "lease was released); this one runs the stage", stage, key)
            return lease
        if holder.expired():            # a race lost to another taker, or released meanwhile
            time.sleep(0.05)
            continue
        if not wait:
            raise LeaseHeld(f"artifact {key} ({stage}) is being written by {holder.describe()}; "
                            f"refusing to wait (compute.lease_wait=false / --no-wait). Run again when "
                            f"it is finished, or without --no-wait to wait and reuse it. Lease object: "
                            f"{lease.where}")
        if announced != holder.owner:
            logger.info("[%s] %s is being written by %s; waiting", stage, key, holder.describe())
            announced = holder.owner
        time.sleep(poll)
        try:
            if finished():
                return None
        except (StoreError, OSError) as e:
            logger.warning("[%s] %s: the store failed while waiting (%s); still waiting", stage, key, e)


def _ray_state_exists(store: "Store", key: str) -> bool:
    if isinstance(store, LocalStore):
        return (store.root / RAY_DIR / key).is_dir()
    if isinstance(store, S3Store):
        out = store._call(f"listing {RAY_DIR}/{key}", store._client.list_objects_v2, Bucket=store.bucket,
                          Prefix=store._obj(f"{RAY_DIR}/{key}/"), MaxKeys=1)
        return bool(out.get("KeyCount"))
    raise StoreError(f"{store!r}: unknown store type")


def prepare_key(store: "Store", key: str, resumable: bool = False) -> dict:
    """Before a lease holder runs the stage of an unfinished ``key``: drop stale temp files, and the
    earlier attempt's data files unless its Ray run resumes with them, or the stage itself resumes
    from them (``resumable``: recover's per-batch markers; module docstring).
    Returns what it did: ``{"resumes_ray_run": bool, "kept": n, "removed": n, "partials": n}``."""
    partials = 0
    if isinstance(store, LocalStore) and (store.root / key).is_dir():
        for p in (store.root / key).rglob("*"):
            if p.is_file() and _is_partial(p.name):
                p.unlink(missing_ok=True)
                partials += 1
    files = sorted(store._list(key))
    resumes = resumable or _ray_state_exists(store, key)
    if files and not resumes:
        store._delete_tree(key)  # unfinished: no manifest; the folder's files and nothing else
    return {"resumes_ray_run": resumes, "kept": len(files) if resumes else 0,
            "removed": 0 if resumes else len(files), "partials": partials}
