"""``hello-ray scores``: DD-Ranking's fair scores (LRS, ARS) of any evaluate artifact in a store.

An external distilled set (``images.source=external``, ``jobs/external.py``) is evaluated like our
own, so its evaluate artifact, with the random-image control rows (``evaluate.floor``), the ``+noaug``
rows and A(full, hard) (``evaluate.full_data`` or ``--full-top1``), is scored the same way.
"""
from __future__ import annotations

import argparse
import json
import sys

from hello_ray.cli.common import store_args
from hello_ray.formats.results import read_results
from hello_ray.scores import fair_scores, scores_table
from hello_ray.store import StoreError, open_store
from hello_ray.tables import text_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hello-ray scores", description=__doc__.split("\n\n")[0])
    store_args(ap)
    ap.add_argument("--key", default=None, help="an evaluate artifact key (default: every evaluate artifact)")
    ap.add_argument("--full-top1", type=float, default=0.0,
                    help="A(full, hard) as a fraction where no 'full' row measured it (0 = unknown)")
    ap.add_argument("--scale", choices=("percent", "fraction"), default="percent",
                    help="units of the accuracies in the scores (percent: DD-Ranking's code)")
    ap.add_argument("--weight", type=float, default=0.5, help="lrs_lambda / ars_lambda (default 0.5)")
    ap.add_argument("--json", action="store_true", help="one JSON object {key: [scores]}")
    args = ap.parse_args(argv)
    if not 0 <= args.full_top1 <= 1 or not 0 <= args.weight <= 1:
        print("hello-ray scores: error: --full-top1 and --weight are fractions in [0, 1]", file=sys.stderr)
        return 2
    try:
        store = open_store(args.store, args.s3_endpoint)
        keys = [args.key] if args.key else store.list_artifacts("evaluate")
        if not keys:
            print(f"hello-ray scores: error: no finished evaluate artifact in {store.uri}", file=sys.stderr)
            return 1
        out = {k: fair_scores(read_results(store, k), args.full_top1, args.scale, args.weight) for k in keys}
    except (StoreError, ValueError) as e:
        print(f"hello-ray scores: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out))
        return 0
    for k, scores in out.items():
        print(f"{k}:")
        print(text_table(*scores_table(scores)) if scores else
              "  no score: it needs the floor rows of a strategy (evaluate.floor_strategies), and A(full) "
              "(evaluate.full_data or --full-top1) for LRS or its +noaug rows for ARS")
        print()
    return 0
