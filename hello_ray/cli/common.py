"""What the commands share: the store flags, the refusal when another driver holds a lease, and the
preflight checks' text."""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hello_ray.preflight.check_report import CheckReport

STORE_URI = "artifact store URI (local path, file://, s3://bucket/prefix)"


def store_args(p: argparse.ArgumentParser, *, required: bool = False, default: str = "./artifacts",
               store_help: str = STORE_URI, endpoint_for: str = "") -> None:
    """``--store`` and ``--s3-endpoint``, as every command that opens a store given on the command line
    takes them (the endpoint resolves as the store resolves it: flag, then the AWS variables).
    ``endpoint_for``: what else the endpoint serves (export: both sides)."""
    if required:
        p.add_argument("--store", required=True, help=store_help)
    else:
        p.add_argument("--store", default=default, help=f"{store_help}; default {default}")
    p.add_argument("--s3-endpoint", default=None, help=f"S3 endpoint{endpoint_for} (default: AWS_ENDPOINT_URL_S3 / "
                   "AWS_ENDPOINT_URL / AWS)")


def refused(prog: str, error: Exception) -> int:
    """``--no-wait`` met another driver's lease on an artifact the command needs: said on stderr,
    exit status 3 (refused, not failed)."""
    print(f"{prog}: refused: {error}", file=sys.stderr)
    return 3


def format_checks(report: "CheckReport") -> str:
    """One line per check: its mark, name and detail."""
    mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    return "\n".join(f"  [{mark[c.status]}] {c.name:16s} {c.detail}" for c in report.checks)

