"""The accuracy-per-byte frontier of one evaluation: which ways of labelling are worth their bytes.

A point is a ``summarise`` group of the main grid or a random-image control (continual rows are
left out: they train on a subset of classes). A point *dominates* another when it ships no more
label bytes and reaches at least the same mean top-1, one of the two strictly; the frontier is the
points nothing dominates, in order of bytes.
"""
from __future__ import annotations

from typing import Any, Sequence

from hello_ray.tables import format_pct, human_bytes


def frontier_points(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups a frontier compares (no continual rows), in the summary's order."""
    return [g for g in summary if not int(g.get("continual_steps", 0) or 0)]


def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """a ships no more bytes and is at least as accurate as b, strictly better in one."""
    ab, bb, at, bt = a["label_bytes"], b["label_bytes"], a["top1_mean"], b["top1_mean"]
    return ab <= bb and at >= bt and (ab < bb or at > bt)


def on_frontier(points: Sequence[dict[str, Any]]) -> list[bool]:
    """For each point: whether no other point dominates it."""
    return [not any(dominates(q, p) for j, q in enumerate(points) if j != i) for i, p in enumerate(points)]


def frontier_table(summary: Sequence[dict[str, Any]], train_images: dict[str, int] | None = None
                   ) -> tuple[list[str], list[list[str]]]:
    """Headers and cells: every point with its bytes, bytes per image (of the images it trains on),
    the ratio of its bytes to the full stored labels of the same images (``stored``; '-' where the run
    has none), and whether it is on the frontier; sorted by bytes."""
    points = frontier_points(summary)
    front = on_frontier(points)
    full = {(g["images"], g["student"]): g["label_bytes"] for g in points if g["strategy"] == "stored"}
    order = sorted(range(len(points)), key=lambda i: (points[i]["label_bytes"], -points[i]["top1_mean"]))
    headers = ["images", "student", "strategy", "top-1 %", "label bytes", "bytes / image",
               "x smaller than stored", "frontier"]
    body = []
    for i in order:
        g = points[i]
        n = (train_images or {}).get(g["images"]) or g.get("train_images")
        per_image = "-" if not n else f"{g['label_bytes'] / n:,.1f}"
        ref = full.get((g["images"], g["student"]))
        ratio = "-" if not ref or not g["label_bytes"] else f"{ref / g['label_bytes']:,.1f}"
        body.append([g["images"], g["student"], g["strategy"], format_pct(g["top1_mean"], g["top1_std"]),
                     f"{g['label_bytes']:,} ({human_bytes(g['label_bytes'])})", per_image, ratio,
                     "yes" if front[i] else ""])
    return headers, body
