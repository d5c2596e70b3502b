"""``hello-ray labels-import | labels-export``: SRe2L/LPLD relabel records to and from an image
set's stored labels (:mod:`hello_ray.labels_fkd`)."""
from __future__ import annotations

import argparse
import json
import sys

from hello_ray.cli.common import store_args
from hello_ray.data.errors import DataError
from hello_ray.formats import fkd
from hello_ray.labels import LabelError
from hello_ray.labels_fkd import export_fkd, import_fkd
from hello_ray.runtime import setup_logging
from hello_ray.store import StoreError, open_store


def import_main(argv: list[str] | None = None) -> int:
    """``hello-ray labels-import <records> --store S --images <image set key>``: prints the labels key
    that ``evaluate.stored_labels=<key>`` replays."""
    p = argparse.ArgumentParser(prog="hello-ray labels-import", description=import_main.__doc__.splitlines()[0])
    p.add_argument("records", help="folder holding epoch_<e>/batch_<b>.tar (local, file:// or s3://)")
    store_args(p, required=True)
    p.add_argument("--images", required=True, help="key of the image set the records label (e.g. external-...)")
    p.add_argument("--fkd-seed", type=int, default=42, help="SRe2L's --fkd-seed, for folders without LPLD's "
                   f"{fkd.SAMPLER_INDICES} (default 42)")
    args = p.parse_args(argv)
    setup_logging()
    store = open_store(args.store, args.s3_endpoint)
    try:
        key = import_fkd(args.records, store, args.images, seed=args.fkd_seed)
    except (fkd.FkdFormatError, LabelError, StoreError, DataError) as e:  # a bad folder, key or store
        print(f"hello-ray labels-import: error: {e}", file=sys.stderr)
        return 2
    print(key)
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """``hello-ray labels-export <artifact key> --store S --to <folder>``: the artifact's unpruned
    stored labels as SRe2L/LPLD relabel records."""
    p = argparse.ArgumentParser(prog="hello-ray labels-export", description=export_main.__doc__.splitlines()[0])
    p.add_argument("key", help="an evaluate-* (labels/stored/) or labels-* artifact key")
    store_args(p, required=True)
    p.add_argument("--to", required=True, help="output folder (local, file:// or s3://)")
    p.add_argument("--image-set", default="distilled", choices=("distilled", "floor"),
                   help="which image set's stored labels (floor: the random real images' controls)")
    args = p.parse_args(argv)
    setup_logging()
    store = open_store(args.store, args.s3_endpoint)
    try:
        info = export_fkd(store, args.key, args.to, image_set=args.image_set)
    except LabelError as e:
        print(f"hello-ray labels-export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0
