"""The accuracy-per-byte frontier of one evaluation: which ways of labelling are worth their bytes.

A point is a ``summarise`` group. A point *dominates* another of the same images when it ships no
more label bytes and reaches at least the same mean top-1, one of the two strictly; each image set's
frontier (the distilled images; the random real images of the controls, apart) is its points nothing
dominates, in order of bytes: which labels are worth their bytes for those images. Not compared:
continual rows (a subset of classes), ``+noaug`` rows (DD-Ranking's ARS controls: another training
protocol, not another label budget) and the ``full`` rows (the whole training set: a reference).
"""
from __future__ import annotations

from typing import Any, Sequence

from hello_ray.label_spec import parse_spec
from hello_ray.tables import format_pct, human_bytes


def compared(g: dict[str, Any]) -> bool:
    """Whether a group takes part in its image set's frontier (see the module)."""
    return (not int(g.get("continual_steps", 0) or 0) and g["images"] != "full"
            and not parse_spec(str(g["strategy"])).noaug)


def frontier_points(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every group the frontier table lists (no continual rows), in the summary's order."""
    return [g for g in summary if not int(g.get("continual_steps", 0) or 0)]


def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """a ships no more bytes and is at least as accurate as b, strictly better in one."""
    ab, bb, at, bt = a["label_bytes"], b["label_bytes"], a["top1_mean"], b["top1_mean"]
    return ab <= bb and at >= bt and (ab < bb or at > bt)


def on_frontier(points: Sequence[dict[str, Any]]) -> list[bool]:
    """For each point: whether it is compared and no other compared point of its images dominates it."""
    return [compared(p) and not any(compared(q) and q["images"] == p["images"] and dominates(q, p)
                                    for j, q in enumerate(points) if j != i)
            for i, p in enumerate(points)]


def frontier_table(summary: Sequence[dict[str, Any]], train_images: dict[str, int] | None = None
                   ) -> tuple[list[str], list[list[str]]]:
    """Headers and cells: every point with its bytes, bytes per image (of the images it trains on),
    the ratio of its bytes to the full stored labels of the same images (``stored``; '-' where the run
    has none), and whether it is on its images' frontier ('yes', '', or '-' when not compared);
    sorted by images, then bytes."""
    points = frontier_points(summary)
    front = on_frontier(points)
    full = {(g["images"], g["student"]): g["label_bytes"] for g in points if g["strategy"] == "stored"}
    sets = list(dict.fromkeys(g["images"] for g in points))
    order = sorted(range(len(points)), key=lambda i: (sets.index(points[i]["images"]), points[i]["label_bytes"],
                                                       -points[i]["top1_mean"]))
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
                     "yes" if front[i] else "" if compared(g) else "-"])
    return headers, body
