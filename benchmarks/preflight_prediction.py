"""Is the preflight's prediction right? Predicted per-stage times for this machine vs a real demo run.

    python benchmarks/preflight_prediction.py --store /tmp/demo-store          # runs the demo there first
    python benchmarks/preflight_prediction.py --store /tmp/demo-store --reuse  # a finished demo run's store

In one run on one machine: ``hello-ray preflight --preset demo`` (checks, rehearsal, cost model) against
the store, then the demo itself (``pipeline.distill``, unless ``--reuse``) into the same store, then,
per stage, the measured time (the stage manifest's ``summary.wall_s``, what ``Run.done`` records) next
to the predicted ``seconds_here`` of the cost model, and their ratio predicted / actual (goal: every
stage within 0.65-1.5x). The figures are printed and written to ``benchmarks/results/`` as JSON.

The prediction counts each stage's steps (timed in one thread on CPU, as the run's workers run), a
start-up term measured on the live Ray (a no-op Ray Train run and a no-op actor pool) and the
teachers' checkpoint writes. What it leaves out (the ratios show how much it matters): Ray Data's
read/decode, which runs again every epoch, per-epoch validation passes other than the teachers', and
the store's other writes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measured_times(store, keys: dict[str, str]) -> dict[str, float]:
    """stage -> summary.wall_s of its manifest (the demo's own measured stage times)."""
    out = {}
    for stage, key in keys.items():
        if stage == "images" or not store.exists(key):
            continue
        wall = (store.manifest(key).get("summary") or {}).get("wall_s")
        if wall is not None:
            out[stage] = float(wall)
    return out


def latest_keys(store) -> dict[str, str]:
    """The newest finished artifact of each stage in the store (for --reuse)."""
    keys = {}
    for stage in ("teachers", "select", "recover", "transfer", "refine", "evaluate"):
        found = [(store.manifest(k).get("created", ""), k) for k in store.list_artifacts(stage)]
        if found:
            keys[stage] = max(found)[1]
    return keys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="store of the demo run (local path or s3://)")
    ap.add_argument("--reuse", action="store_true", help="read the stage times of a demo run already in --store")
    ap.add_argument("--steps", type=int, default=3, help="rehearsal steps per stage")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "preflight_prediction.json"))
    args = ap.parse_args(argv)

    from hello_ray.config import load_config
    from hello_ray.pipeline import distill, open_run_store
    from hello_ray.preflight.checks import run_checks
    from hello_ray.preflight.run import rehearse
    from hello_ray.runtime import setup_logging

    setup_logging()
    cfg = load_config("demo", None, [f"store={args.store}"])
    t0 = time.perf_counter()
    report, store = run_checks(cfg, probe_network=False)
    if not report.ok:
        print("preflight checks failed:", [c.detail for c in report.failures()], file=sys.stderr)
        return 1
    table = rehearse(cfg, store, report, args.steps, None, None)
    if table is None:
        print("rehearsal failed:", [c.detail for c in report.failures()], file=sys.stderr)
        return 1
    preflight_s = time.perf_counter() - t0
    if args.reuse:
        keys = latest_keys(open_run_store(cfg))
    else:
        keys = distill(cfg).keys
    actual = measured_times(open_run_store(cfg), keys)
    rows = []
    for s in table["stages"]:
        a = actual.get(s["stage"])
        rows.append({"stage": s["stage"], "predicted_s": round(s["seconds_here"], 1), "actual_s": a,
                     "ratio": round(s["seconds_here"] / a, 2) if a else None,
                     "within_goal": bool(a) and 0.65 <= s["seconds_here"] / a <= 1.5})
    print(f"\npreflight (checks + rehearsal) {preflight_s:.1f} s; demo stage times from {store.uri}\n")
    print(f"{'stage':10s} {'predicted s':>12s} {'actual s':>10s} {'pred/actual':>12s}")
    for r in rows:
        print(f"{r['stage']:10s} {r['predicted_s']:12.1f} {r['actual_s'] or float('nan'):10.1f} "
              f"{r['ratio'] if r['ratio'] is not None else float('nan'):12.2f}"
              f"{'' if r['within_goal'] else '  (outside 0.65-1.5)'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "preflight_s": preflight_s, "keys": keys,
                                          "load_avg": os.getloadavg(), "cost": table}, indent=1, default=str))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
