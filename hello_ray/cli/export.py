"""``hello-ray export``: a run's distilled set as a self-contained package
(:func:`hello_ray.distilled.export.export`)."""
from __future__ import annotations

import argparse
import sys

from hello_ray.cli.common import store_args
from hello_ray.distilled.export import export, parse_labels
from hello_ray.formats import package as fmt
from hello_ray.store import StoreError
from hello_ray.tables import human_bytes, text_table


def main(argv: list[str] | None = None) -> int:
    """``hello-ray export``: exit 0 when the package is written, 1 on a store or export error."""
    from hello_ray.runtime import setup_logging

    ap = argparse.ArgumentParser(prog="hello-ray export", description=(
        "write a finished run's distilled set as a self-contained package: images (PNG, one folder "
        "per class), the projector adapter, optionally the stored labels, a dataset card, and a "
        "manifest of every file (written last)"))
    ap.add_argument("evaluate_key", help="the run's evaluate artifact, e.g. evaluate-0123456789ab "
                    "(hello-ray ls --stage evaluate)")
    store_args(ap, required=True, store_help="the run's artifact store (local path, file://, s3://bucket/prefix)",
               endpoint_for=" for both sides")
    ap.add_argument("--to", required=True, help="where the package goes: a local folder or s3://bucket/prefix/name "
                    "(the last component names it)")
    ap.add_argument("--labels", default="projector", help="what ships besides the class ids: a comma-separated "
                    f"subset of {','.join(fmt.LABEL_KINDS)} (default: projector)")
    ap.add_argument("--overwrite", action="store_true", help="replace a destination that is not empty")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        out = export(args.evaluate_key, args.store, args.to, parse_labels(args.labels), args.overwrite,
                     args.s3_endpoint)
    except (StoreError, ValueError) as e:
        print(f"hello-ray export: error: {e}", file=sys.stderr)
        return 1
    rows = [[part, f"{n:,}", human_bytes(n)] for part, n in out["bytes"].items()]
    print(text_table(["part", "bytes", "size"], rows))
    print(f"\npackage written: {out['uri']} ({out['files']} files)")
    return 0
