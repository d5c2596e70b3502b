"""``hello-ray synth-data``: ImageNet-shaped synthetic data (:mod:`hello_ray.data.synthetic`), a shape
fixture for rehearsals and tests."""
from __future__ import annotations

import argparse
import json
import sys

from hello_ray.data.synthetic import LAYOUTS, write_synthetic


def main(argv: list[str] | None = None) -> int:
    """``hello-ray synth-data ROOT ...``: write the fixture and print its metadata."""
    ap = argparse.ArgumentParser(prog="hello-ray synth-data", description=(
        "ImageNet-shaped synthetic data: a shape fixture for rehearsals and tests, never a dataset to\n"
        "report accuracy on (its images are smooth noise; the README and ``synthetic.json`` it writes say so)."))
    ap.add_argument("root", help="where to write: a local path, file:// or s3://bucket/prefix")
    ap.add_argument("--classes", type=int, default=1000, help="classes (the first N ImageNet-1K synsets)")
    ap.add_argument("--train-per-class", type=int, default=2)
    ap.add_argument("--val-per-class", type=int, default=1)
    ap.add_argument("--format", dest="layout", default="webdataset", choices=LAYOUTS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-side", type=int, default=48, help="shorter side, smallest (px)")
    ap.add_argument("--max-side", type=int, default=128, help="shorter side, largest (px)")
    ap.add_argument("--shard-size", type=int, default=1000, help="webdataset: samples per tar")
    ap.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS)")
    a = ap.parse_args(argv)
    from hello_ray.store import StoreError

    try:
        meta = write_synthetic(a.root, a.classes, a.train_per_class, a.val_per_class, a.layout, a.seed,
                               a.min_side, a.max_side, a.shard_size, a.endpoint_url)
    except (ValueError, OSError, StoreError) as e:  # bad counts, an unwritable or unknown root
        print(f"hello-ray synth-data: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=1))
    return 0
