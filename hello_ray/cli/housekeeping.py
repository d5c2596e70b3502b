"""``hello-ray ls | rm | gc``: a store's artifacts listed, removed with their Ray run state and
caches, and leftovers collected (:mod:`hello_ray.housekeeping`)."""
from __future__ import annotations

import argparse
import sys

from hello_ray.cli.common import store_args
from hello_ray.housekeeping import DEFAULT_MIN_AGE_H, collect, format_entries, list_entries, remove
from hello_ray.store import StoreError, open_store
from hello_ray.tables import human_bytes


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"hello-ray {prog}", description=description)
    store_args(ap)
    return ap


def _run(prog: str, fn) -> int:
    try:
        return fn()
    except StoreError as e:
        print(f"hello-ray {prog}: error: {e}", file=sys.stderr)
        return 1


def ls_main(argv: list[str] | None = None) -> int:
    """``hello-ray ls``: the store's artifacts as a table."""
    ap = _parser("ls", "list the artifacts of a store, finished or not")
    ap.add_argument("--stage", default=None, help="only this stage's artifacts")
    args = ap.parse_args(argv)

    def go() -> int:
        store = open_store(args.store, args.s3_endpoint)
        entries = [e for e in list_entries(store) if args.stage in (None, e.stage)]
        print(format_entries(entries))
        done = sum(e.finished for e in entries)
        print(f"\n{len(entries)} keys in {store.uri}: {done} finished, {len(entries) - done} unfinished, "
              f"{human_bytes(sum(e.bytes for e in entries))}")
        return 0
    return _run("ls", go)


def rm_main(argv: list[str] | None = None) -> int:
    """``hello-ray rm <key>...``: remove artifacts with their Ray run state and local caches."""
    ap = _parser("rm", "remove artifacts together with their Ray run state (_ray/<key>) and this "
                 "machine's download cache; the next run recomputes them from scratch")
    ap.add_argument("keys", nargs="+", metavar="key", help="artifact key, e.g. teachers-0123456789ab")
    ap.add_argument("--force", action="store_true", help="remove even a key under an active writer lease")
    args = ap.parse_args(argv)

    def go() -> int:
        store = open_store(args.store, args.s3_endpoint)
        for key in args.keys:
            for line in remove(store, key, force=args.force):
                print(line)
        return 0
    return _run("rm", go)


def gc_main(argv: list[str] | None = None) -> int:
    """``hello-ray gc``: collect unfinished leftovers, orphan run state and stale caches."""
    ap = _parser("gc", "remove unfinished artifacts, Ray run state no artifact needs, and stale "
                 "download caches; keys under a writer lease or written recently are kept")
    ap.add_argument("--min-age", type=float, default=DEFAULT_MIN_AGE_H, metavar="HOURS",
                    help=f"keep anything written within this many hours (default {DEFAULT_MIN_AGE_H:g}; "
                    "0 collects everything not under a lease)")
    ap.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    args = ap.parse_args(argv)
    if args.min_age < 0:
        ap.exit(2, "hello-ray gc: error: --min-age must be >= 0 hours\n")

    def go() -> int:
        store = open_store(args.store, args.s3_endpoint)
        lines = collect(store, args.min_age * 3600, args.dry_run)
        print("\n".join(lines) if lines else f"nothing to collect in {store.uri}")
        return 0
    return _run("gc", go)
