"""One writer's lease: the fence that travels with the store, renewing in a thread, and what the
recipe calls (``acquire``, ``prepare_key``)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Callable

from hello_ray.store import RAY_DIR, LocalStore, S3Store, StoreError, _check_key, _is_partial

if TYPE_CHECKING:
    from hello_ray.store import Store

from hello_ray.lease.backends import (
    DEFAULT_TTL_S,
    LeaseHeld,
    LeaseInfo,
    LeaseLost,
    _backend,
    log,
    read_lease,
)


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
                token = self._still_mine(data)
            self._token = token

    def _still_mine(self, data: bytes) -> str:
        """The token of our lease after a conditional write was refused, or LeaseLost.

        The stored version is still ours when it carries our owner: either this very write landed and
        only a retry of it was refused (it holds our new expiry), or an earlier renewal landed after
        all, though its caller saw an error (a timeout while the store was paused, a 503 on the
        answer): that version holds an older expiry and is written over once more, on its token."""
        for _ in range(2):
            mine = self._mine()
            if mine is None:
                break
            if abs(mine.expires - self._expires) <= 1e-6:
                return mine.token
            token = self._backend.replace(self.key, data, mine.token)
            if token is not None:
                return token
        info = read_lease(self.store, self.key)
        who = "released by someone else" if info is None else f"taken over by {info.describe()}"
        raise LeaseLost(f"artifact {self.key}: the lease of this writer ({self.host} pid "
                        f"{self.pid}, lease {self.owner[:8]}) was {who}")

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
