"""The report's names and its pictures: storage and sweep tables, and the PNG plots (accuracy vs label
bytes, teacher curve, fidelity, sweep heat map), drawn on Agg figures."""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hello_ray.tables import as_records, cell, check_rows, human_bytes, is_missing


STAGE = "report"
SWEEP_KEYS = ("conv_rank", "head_rank", "window")
# (key in fidelity.json, alternative key, panel title, how to read it)
FIDELITY_METRICS = (("agreement", None, "top-1 agreement with teachers", "higher is better"),
                    ("kl", None, "KL(teachers || projector)", "lower is better"),
                    ("projector_top1", "top1", "projector top-1 (val)", "higher is better"))
REPORT_FILE = "README.md"
# The distilled images (hello_ray/plots/image_grid.py), when the report is given the image set.
GRID_PNGS = {"images": "distilled_images.png", "before_after": "refine_before_after.png"}
PNG_NAMES = {
    "accuracy": "accuracy_vs_label_bytes.png",
    "teacher": "teacher_curve.png",
    "fidelity": "fidelity.png",
    "sweep": "sweep_heatmap.png",
    "sweep_lrs": "sweep_lrs_heatmap.png",
}


# ---------------------------------------------------------------- storage accounting

def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += _flatten(v, name + ".")
        else:
            out.append((name, v))
    return out


def _storage_readable(item: str, v: Any) -> str:
    """Bytes as KiB/MiB/GiB, parameter counts in millions, anything else left blank."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or is_missing(v):
        return ""
    if "bytes" in item:
        return human_bytes(v)
    if item.endswith("params"):
        return f"{v / 1e6:.3f} M"
    return ""


def storage_table(storage: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and body of the storage accounting table.

    A mapping (e.g. ``hello-ray storage --json``: ``stored_soft_labels_bytes``, ``teacher_params``,
    ``projector_lora_bytes_fp16``, ...; nested mappings flattened to dotted names) becomes
    ``item | value | readable``: exact numbers with thousands separators, next to KiB/MiB/GiB for
    ``*bytes*`` items and millions for ``*params`` items. A list of dicts keeps its columns and
    shows every ``*bytes`` column both exactly and human-readable.
    """
    if isinstance(storage, Mapping):
        body = []
        for item, v in _flatten(storage):
            if isinstance(v, int) and not isinstance(v, bool):
                exact = f"{v:,}"
            elif isinstance(v, (list, tuple)):
                exact = ", ".join(map(str, v))
            else:
                exact = cell(v)
            body.append([item, exact, _storage_readable(item, v)])
        return ["item", "value", "readable"], body
    recs = as_records(storage, "storage")
    headers = list(dict.fromkeys(k for r in recs for k in r))
    body = []
    for r in recs:
        row = []
        for h in headers:
            v = r.get(h)
            if h.endswith("bytes") and isinstance(v, (int, float)) and not is_missing(v):
                row.append(f"{int(v):,} ({human_bytes(v)})")
            else:
                row.append(cell(v))
        body.append(row)
    return headers, body


# ---------------------------------------------------------------- sweep

def _window_bounds(window: str) -> tuple[int, int]:
    """(first, last) epoch of a teacher window read as the config reads it (``config.parse_window``)."""
    from hello_ray.config import ConfigError, parse_window

    try:
        return parse_window(str(window))
    except ConfigError:
        raise ValueError(f"report: teacher window {window!r} is not 'a-b'") from None


def sweep_summary(sweep_rows: Any) -> list[dict[str, Any]]:
    """Sweep rows validated and sorted: finished trials best first, then early-stopped ones."""
    rows = as_records(sweep_rows, "sweep_rows")
    check_rows(rows, SWEEP_KEYS, "sweep_rows", top1_optional=True)
    for r in rows:
        _window_bounds(r["window"])
    done = sorted((r for r in rows if not is_missing(r.get("top1"))), key=lambda r: -float(r["top1"]))
    return done + [r for r in rows if is_missing(r.get("top1"))]


def sweep_grid(sweep: list[dict[str, Any]], value: str = "top1") -> tuple[list[int], list[str], np.ndarray]:
    """(conv ranks, windows by start epoch, mean ``value`` (top1 | lrs) grid [ranks, windows]; NaN
    where no finished trial)."""
    ranks = sorted({int(r["conv_rank"]) for r in sweep})
    windows = sorted({str(r["window"]) for r in sweep}, key=_window_bounds)
    acc: dict[tuple[int, str], list[float]] = {}
    for r in sweep:
        if not is_missing(r.get(value)):
            acc.setdefault((int(r["conv_rank"]), str(r["window"])), []).append(float(r[value]))
    grid = np.full((len(ranks), len(windows)), np.nan)  # [ranks, windows]
    for (rank, window), vals in acc.items():
        grid[ranks.index(rank), windows.index(window)] = float(np.mean(vals))
    return ranks, windows, grid


# ---------------------------------------------------------------- plots

def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No "Software" stamp: the same inputs give the same bytes.
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def series_label(group: Mapping[str, Any], with_student: bool) -> str:
    """A summary group's legend entry: its strategy, tagged with what sets it apart from the main
    grid (floor images, a continual step) and, when several students were trained, the student."""
    tags = [] if group["images"] == "distilled" else [f"{group['images']} images"]  # rded, lpld, floor, ...
    if group["continual_steps"]:
        tags.append(f"continual {group['continual_step']}/{group['continual_steps']}")
    if with_student:
        tags.append(str(group["student"]))
    return f"{group['strategy']} ({', '.join(tags)})" if tags else str(group["strategy"])


def plot_accuracy_vs_bytes(summary: list[dict[str, Any]]) -> bytes:
    """Top-1 (mean ± std error bars) against label bytes on a log x axis, one series per
    ``summarise`` group, the frontier (``report.frontier``: points no other one dominates) joined by a
    line. A zero-byte strategy switches to symlog so it shows."""
    from hello_ray.report.frontier import frontier_points, on_frontier

    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot()
    points = frontier_points(summary)
    flags = on_frontier(points)
    for n, images in enumerate(dict.fromkeys(p["images"] for p in points)):
        front = sorted((p for p, f in zip(points, flags) if f and p["images"] == images),
                       key=lambda p: p["label_bytes"])
        if len(front) > 1:  # each image set's points no other dominates (no more bytes, no less top-1)
            ax.plot([p["label_bytes"] for p in front], [100 * p["top1_mean"] for p in front],
                    "-" if n == 0 else "--", color="0.55", linewidth=1.2, zorder=0,
                    label=f"frontier ({images} images)")
    several = len({s["student"] for s in summary}) > 1
    markers = "osD^v<>pPX*h"
    for i, s in enumerate(summary):
        label = series_label(s, several)
        x, y = s["label_bytes"], 100 * s["top1_mean"]
        ax.errorbar([x], [y], yerr=[100 * s["top1_std"]], fmt=markers[i % len(markers)], capsize=4,
                    markersize=7, label=label)
        # Alternate the byte labels above/below so neighbouring strategies stay readable.
        ax.annotate(human_bytes(x), (x, y), textcoords="offset points",
                    xytext=(6, 6 if i % 2 == 0 else -12), fontsize=7)
    if any(s["label_bytes"] <= 0 for s in summary):
        ax.set_xscale("symlog", linthresh=1.0)
    else:
        ax.set_xscale("log")
    ax.set_xlabel("label bytes shipped with the distilled images (log)")
    ax.set_ylabel("student top-1 on real val (%)")
    ax.set_title("Accuracy vs label storage")
    ax.grid(True, which="both", alpha=0.3)
    if len(summary) > 8:   # many strategies: the legend beside the axes, not over the points
        fig.set_size_inches(10.0, 5.0)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _png(fig)


def plot_teacher_curve(epochs: list[Mapping[str, Any]], teacher_window: str | None = None) -> bytes:
    """Teacher top-1 per epoch; the teacher window, when given, is shaded."""
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.add_subplot()
    ax.plot([int(e["epoch"]) for e in epochs], [100 * float(e["top1"]) for e in epochs],
            marker="o", markersize=3)
    if teacher_window:
        lo, hi = _window_bounds(teacher_window)
        ax.axvspan(lo, hi, alpha=0.15, color="tab:orange", label=f"teacher window {teacher_window}")
        ax.legend(fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("teacher top-1 on real val (%)")
    ax.set_title("Teacher trajectory")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _fid(phase: Mapping[str, Any], key: str, alt: str | None) -> float:
    return float(phase[key] if key in phase else phase[alt])


def plot_fidelity(fidelity: Mapping[str, Any]) -> bytes:
    """Before/after-transfer bars for agreement, KL and top-1 (one panel each: scales differ)."""
    phases = [p for p in ("before", "after") if p in fidelity]
    fig = Figure(figsize=(8.0, 3.4))
    axes = fig.subplots(1, len(FIDELITY_METRICS))
    colors = {"before": "tab:gray", "after": "tab:blue"}
    for ax, (key, alt, title, hint) in zip(axes, FIDELITY_METRICS):
        pct = key != "kl"
        vals = [_fid(fidelity[p], key, alt) * (100 if pct else 1) for p in phases]
        bars = ax.bar(phases, vals, color=[colors[p] for p in phases])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        if key == "projector_top1":
            teacher = next((fidelity[p]["teacher_top1"] for p in phases
                            if not is_missing(fidelity[p].get("teacher_top1"))), None)
            if teacher is not None:
                ax.axhline(100 * float(teacher), color="tab:orange", linestyle="--", label="teachers")
                ax.legend(fontsize=7)
        ax.set_title(f"{title}\n({hint})", fontsize=9)
        ax.set_ylabel("%" if pct else "nats")
    fig.suptitle("Projector fidelity before / after LoRA transfer", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def plot_sweep_heatmap(sweep: list[dict[str, Any]], value: str = "top1") -> bytes:
    """Heat map of top-1 (or DD-Ranking's LRS, ``value="lrs"``) over (conv rank x teacher window),
    values written in the cells."""
    ranks, windows, grid = sweep_grid(sweep, value)
    scale = 100 if value == "top1" else 1
    fig = Figure(figsize=(1.6 + 1.1 * len(windows), 1.4 + 0.8 * len(ranks)))
    ax = fig.add_subplot()
    im = ax.imshow(scale * grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(windows)), windows)
    ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_xlabel("teacher window (epochs)")
    ax.set_ylabel("LoRA conv rank")
    finite = grid[np.isfinite(grid)]
    mid = scale * float(finite.mean()) if finite.size else 0.0
    for i in range(len(ranks)):
        for j in range(len(windows)):
            v = scale * grid[i, j]
            text = (f"{v:.1f}" if value == "top1" else f"{v:.3f}") if np.isfinite(v) else "stopped"
            # NaN cells are left blank (white) by imshow: write on them in gray.
            color = "gray" if not np.isfinite(v) else "black" if v > mid else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    fig.colorbar(im, ax=ax, label="top-1 (%)" if value == "top1" else "LRS (DD-Ranking)")
    ax.set_title(f"Sweep: {'top-1' if value == 'top1' else 'label robust score'} by rank and window", fontsize=10)
    fig.tight_layout()
    return _png(fig)
