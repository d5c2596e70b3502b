"""``hello-ray ls`` / ``hello-ray rm <key>`` / ``hello-ray gc``: what a store holds, and removing it.

- ``ls``: every artifact folder, finished (a manifest) or not, with its files, bytes and when it
  was made, plus whether Ray Train run state (``_ray/<key>``) or a writer lease goes with it.
- ``rm <key>``: the artifact *with* its Ray run state and this machine's download cache of it.
  Ray Train reloads ``_ray/<run name>`` whenever a run name is reused, and the run name is the
  key: removing only the folder makes the re-run "resume" a run whose epoch files are gone.
  The manifest goes first, so nobody takes a half-removed artifact for a finished one.
- ``gc``: unfinished leftovers (folders without a manifest, with their run state), the run state
  of finished or absent artifacts, and this store's stale download caches. A key under an
  unexpired writer lease (``_leases/<key>.json``) is in use and skipped, and so, for writers that
  hold no lease, is anything written to within ``--min-age`` hours.

Helper folders (a leading ``_``: ``_ray``, ``_leases``, fault-drill markers) are not artifacts and
are never listed or collected as such.
"""
from __future__ import annotations

import concurrent.futures as cf
import fcntl
import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from hello_ray.lease import LeaseInfo, lease_active, read_lease
from hello_ray.store import (
    LEASE_DIR,
    MANIFEST,
    RAY_DIR,
    Store,
    StoreError,
    is_artifact_key,
    key_stage,
)
from hello_ray.tables import human_bytes, text_table

DEFAULT_MIN_AGE_H = 24.0


@dataclass
class Entry:
    """One key of a store as ``ls`` shows it."""
    key: str
    stage: str
    finished: bool
    files: int
    bytes: int
    created: str            # the manifest's time, or the last write of an unfinished folder
    ray_state: bool         # Ray Train run state under _ray/<key>
    lease: LeaseInfo | None  # the writer lease, if any (expired ones too)
    last_write: float       # unix seconds of the newest file (folder and run state)
    problem: str = ""       # a manifest that cannot be read (shown; rm still removes it)


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds") if t else "-"


def _artifact_keys(names: list[str]) -> list[str]:
    """Folder names that are artifact keys (helper folders and foreign names left out)."""
    return sorted(n for n in names if is_artifact_key(n))


def list_entries(store: Store) -> list[Entry]:
    """Every artifact folder and every run state of ``store`` (finished or not), by key."""
    folders = set(_artifact_keys(store.folders()))
    runs = set(_artifact_keys(store.folders(RAY_DIR)))

    def entry(key: str) -> Entry:
        tree = store.folder_files(key) if key in folders else {}
        run_tree = store.folder_files(f"{RAY_DIR}/{key}") if key in runs else {}
        last = max([m for _, m in tree.values()] + [m for _, m in run_tree.values()] + [0.0])
        finished, problem = MANIFEST in tree, ""
        stage, created = key_stage(key), f"{_iso(last)} (last write)" if last else "-"
        files, size = len(tree), sum(s for s, _ in tree.values())
        if finished:
            try:
                manifest = store.manifest(key)
                stage, created = str(manifest.get("stage", stage)), str(manifest.get("created", "-"))
                files, size = len(manifest["files"]), sum(int(f["size"]) for f in manifest["files"])
            except StoreError as e:
                problem = f"damaged manifest: {e}"
        return Entry(key, stage, finished, files, size, created, key in runs, read_lease(store, key),
                     last, problem)

    with cf.ThreadPoolExecutor(8) as pool:  # a few requests per key on S3: overlap them
        return list(pool.map(entry, sorted(folders | runs)))


def format_entries(entries: list[Entry], now: float | None = None) -> str:
    """The ``ls`` table."""
    now = time.time() if now is None else now
    body = []
    for e in entries:
        notes = []
        if e.ray_state:
            notes.append("ray run state")
        if e.lease is not None:
            notes.append(f"{'expired lease' if e.lease.expired(now) else 'leased'} ({e.lease.describe(now)})")
        if not e.finished and e.files == 0:
            notes.append("no folder")
        if e.problem:
            notes.append(e.problem)
        body.append([e.stage, e.key, "yes" if e.finished else "no", str(e.files), human_bytes(e.bytes),
                     e.created, ", ".join(notes)])
    return text_table(["stage", "key", "finished", "files", "bytes", "created", "notes"], body)


def remove(store: Store, key: str, force: bool = False) -> list[str]:
    """Remove artifact ``key``, its Ray run state and this machine's download cache of it.

    Refuses (StoreError) a key under an active writer lease unless ``force``, and a key of which
    nothing exists. Returns one line per thing removed.
    """
    if not is_artifact_key(key):
        raise StoreError(f"{key!r} is not an artifact key (helper folders such as {RAY_DIR!r} and "
                         f"{LEASE_DIR!r} are not removed by name)")
    info = read_lease(store, key)
    if not force and info is not None and not info.expired():
        raise StoreError(f"{key} is being written right now by {info.describe()}; "
                         "stop that run first, or pass --force")
    done = []
    n = store.remove_folder(key)  # the manifest first: nobody believes a half-removed artifact
    has_folder = n > 0
    if has_folder:
        done.append(f"removed {store.uri_for(key)} ({_files(n)})")
    n = store.remove_folder(f"{RAY_DIR}/{key}")
    if n:
        done.append(f"removed Ray run state {store.uri}/{RAY_DIR}/{key} ({_files(n)})")
    done += _remove_cache(store, key, wait=True)
    if not has_folder and not n:
        raise StoreError(f"nothing named {key} in {store.uri} (no artifact folder, no Ray run "
                         f"state under {RAY_DIR}/); 'hello-ray ls --store {store.uri}' lists what is there")
    return done


def _remove_cache(store: Store, key: str, wait: bool) -> list[str]:
    """This machine's download copy and verified stamp of ``key``; with ``wait=False`` a copy in
    use (its lock held by a download running now) is left alone."""
    dest = store.cache_dir(key)
    lock_path = dest.parent / f"{key}.lock"
    stamp = dest.parent / f"{key}.verified.json"
    if not (dest.exists() or stamp.exists() or lock_path.exists()):
        return []
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return []
        shutil.rmtree(dest, ignore_errors=True)
        stamp.unlink(missing_ok=True)
        lock_path.unlink(missing_ok=True)
    return [f"removed this machine's download cache of {key} ({dest.parent})"]


def collect(store: Store, min_age_s: float = DEFAULT_MIN_AGE_H * 3600, dry_run: bool = False,
            now: float | None = None) -> list[str]:
    """Remove what no finished artifact needs: unfinished folders (with their run state), run state
    of finished or absent artifacts, and stale download caches of this store. Keys under an
    active lease or written to within ``min_age_s`` are in use and skipped. Returns one line per
    thing removed (or, with ``dry_run``, that would be)."""
    now = time.time() if now is None else now
    verb = "would remove" if dry_run else "removed"
    done: list[str] = []
    for e in list_entries(store):
        leased = lease_active(store, e.key, now)
        if e.finished and not e.ray_state:
            continue
        if leased or now - e.last_write < min_age_s:
            why = ("under an active writer lease" if leased else
                   f"written {(now - e.last_write) / 3600:.1f} h ago, within --min-age")
            done.append(f"kept {e.key}: {why}")
            continue
        if not e.finished and e.files:
            if not dry_run:
                store.remove_folder(e.key)
            done.append(f"{verb} unfinished {store.uri_for(e.key)} ({_files(e.files)}, {human_bytes(e.bytes)})")
        if e.ray_state:
            if not dry_run:
                store.remove_folder(f"{RAY_DIR}/{e.key}")
            done.append(f"{verb} Ray run state {store.uri}/{RAY_DIR}/{e.key} "
                        f"({'finished' if e.finished else 'unfinished' if e.files else 'no'} artifact)")
    done += _collect_caches(store, dry_run, verb)
    return done


def _collect_caches(store: Store, dry_run: bool, verb: str) -> list[str]:
    """This store's download copies and stamps on this machine whose artifact is gone from the
    store or was re-made since (a stamp for another manifest)."""
    folder = store.cache_folder()
    if not folder.is_dir():
        return []
    names = {p.name if p.is_dir() else p.name.removesuffix(".lock").removesuffix(".verified.json")
             for p in folder.iterdir()}
    done = []
    for key in sorted(n for n in names if is_artifact_key(n)):
        if store.exists(key) and not _cache_outdated(store, key, folder):
            continue
        if dry_run:
            done.append(f"{verb} this machine's download cache of {key} ({folder})")
        else:
            done += _remove_cache(store, key, wait=False)
    return done


def _cache_outdated(store: Store, key: str, folder: Path) -> bool:
    """A stamp that records another manifest than the store holds now."""
    try:
        stamp = json.loads((folder / f"{key}.verified.json").read_text())
    except (OSError, ValueError):
        return False  # no stamp: nothing verified to be outdated (a download may be running)
    return stamp.get("manifest") != store.manifest_sha256(key)
