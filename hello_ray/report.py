"""The run report: markdown tables and PNG plots written into the store.

Inputs are plain data, never stage objects, so the report can be rebuilt from the files the
stages leave in the store (``collect_inputs``, through the format modules of hello_ray/formats/)
or from a notebook:

- ``results_rows``: the evaluate stage's rows (a list of dicts or a pandas DataFrame), in the one
  results schema of hello_ray/formats/results.py: ``student, strategy, seed, images,
  continual_steps, continual_step, top1`` (a fraction in [0, 1]), ``label_bytes`` and optionally
  ``step_s, wall_s, peak_mem_mb``. They are summarised over seeds per (images, student,
  strategy, continual step), so the floor and continual rows keep their own groups.
- ``trajectory``: the teachers' ``trajectory.json`` (``{"epochs": [{"epoch", "top1"}, ...]}``).
- ``fidelity``: the transfer stage's ``fidelity.json``: ``{"before": {...}, "after": {...}}``,
  each with ``agreement, kl`` and ``projector_top1`` (or ``top1``), optionally ``teacher_top1``;
  an optional top-level ``teacher_window`` shades the teacher curve.
- ``sweep_rows``: one dict per Tune trial with ``conv_rank, head_rank, window, top1``
  (``top1`` None for a trial a scheduler stopped early).
- ``storage``: storage accounting, a mapping (``hello-ray storage --json``) or a list of dicts.
- ``images``: an ``ImageGrid`` (hello_ray/plots/image_grid.py ``read_image_grid``): the distilled
  images evaluate trained on, per class, and for a refined set the same images before refine.
- ``data``: per stage that read the real data, its manifest summary's ``corrupt`` (undecodable
  images per split and class, hello_ray/data/corrupt.py) and ``dataset`` (the split fingerprints):
  ``{stage: {"corrupt": {split role: {...}}, "dataset": {split role: {...}}}}``.

``build_report`` returns ``(markdown, {png_name: png_bytes})``; ``write_report`` puts the PNGs,
then ``README.md`` (so a README never points at a missing plot), then the manifest. Plots are
drawn on ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot global state, safe inside
Ray workers and without a display.
"""
from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hello_ray.formats.fidelity import read_fidelity
from hello_ray.formats.jsonfile import read_json
from hello_ray.formats.results import read_results, results_table, summarise
from hello_ray.formats.trajectory import load_trajectory
from hello_ray.tables import as_records, cell, check_rows, format_pct, human_bytes, is_missing, markdown_table

if TYPE_CHECKING:
    from hello_ray.plots.image_grid import ImageGrid
    from hello_ray.store import Store

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
    lo, _, hi = str(window).partition("-")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"report: teacher window {window!r} is not 'a-b'") from None


def sweep_summary(sweep_rows: Any) -> list[dict[str, Any]]:
    """Sweep rows validated and sorted: finished trials best first, then early-stopped ones."""
    rows = as_records(sweep_rows, "sweep_rows")
    check_rows(rows, SWEEP_KEYS, "sweep_rows", top1_optional=True)
    for r in rows:
        _window_bounds(r["window"])
    done = sorted((r for r in rows if not is_missing(r.get("top1"))), key=lambda r: -float(r["top1"]))
    return done + [r for r in rows if is_missing(r.get("top1"))]


def sweep_grid(sweep: list[dict[str, Any]]) -> tuple[list[int], list[str], np.ndarray]:
    """(conv ranks, windows by start epoch, mean top-1 grid [ranks, windows]; NaN where no
    finished trial)."""
    ranks = sorted({int(r["conv_rank"]) for r in sweep})
    windows = sorted({str(r["window"]) for r in sweep}, key=_window_bounds)
    acc: dict[tuple[int, str], list[float]] = {}
    for r in sweep:
        if not is_missing(r.get("top1")):
            acc.setdefault((int(r["conv_rank"]), str(r["window"])), []).append(float(r["top1"]))
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
    ``summarise`` group. A zero-byte strategy switches to symlog so it shows."""
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot()
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


def plot_sweep_heatmap(sweep: list[dict[str, Any]]) -> bytes:
    """Heat map of top-1 over (conv rank x teacher window), values written in the cells."""
    ranks, windows, grid = sweep_grid(sweep)
    fig = Figure(figsize=(1.6 + 1.1 * len(windows), 1.4 + 0.8 * len(ranks)))
    ax = fig.add_subplot()
    im = ax.imshow(100 * grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(windows)), windows)
    ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_xlabel("teacher window (epochs)")
    ax.set_ylabel("LoRA conv rank")
    finite = grid[np.isfinite(grid)]
    mid = 100 * float(finite.mean()) if finite.size else 0.0
    for i in range(len(ranks)):
        for j in range(len(windows)):
            v = 100 * grid[i, j]
            text = f"{v:.1f}" if np.isfinite(v) else "stopped"
            # NaN cells are left blank (white) by imshow: write on them in gray.
            color = "gray" if not np.isfinite(v) else "black" if v > mid else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    fig.colorbar(im, ax=ax, label="top-1 (%)")
    ax.set_title("Sweep: top-1 by rank and window", fontsize=10)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------- the report

def _fidelity_section(fidelity: Mapping[str, Any]) -> tuple[list[str], bytes]:
    phases = [p for p in ("before", "after") if isinstance(fidelity.get(p), Mapping)]
    if not phases:
        raise ValueError(f"report: fidelity needs 'before' and/or 'after', got keys {sorted(fidelity)}")
    for p in phases:
        missing = [k for k, alt, _, _ in FIDELITY_METRICS if k not in fidelity[p] and alt not in fidelity[p]]
        if missing:
            raise ValueError(f"report: fidelity['{p}'] lacks {missing} (has {sorted(fidelity[p])})")
    body = []
    for p in phases:
        f = fidelity[p]
        teacher = f.get("teacher_top1")
        body.append([p, format_pct(_fid(f, "agreement", None)), f"{_fid(f, 'kl', None):.4f}",
                     format_pct(_fid(f, "projector_top1", "top1")),
                     "-" if is_missing(teacher) else format_pct(float(teacher))])
    md = ["## Projector fidelity", "",
          markdown_table(["phase", "agreement %", "KL", "projector top-1 %", "teachers top-1 %"], body), "",
          f"![fidelity]({PNG_NAMES['fidelity']})", "",
          "'before' is the text-initialised CLIP head (zero-shot), 'after' the LoRA'd projector as "
          "shipped. Transfer should raise agreement with the teacher ensemble and lower the KL.", ""]
    return md, plot_fidelity(fidelity)


def images_section(grid: "ImageGrid") -> tuple[list[str], dict[str, bytes]]:
    """The "Distilled images" section: the grid per class, and before / after refine when the
    set is a refined one (its ``parent`` read)."""
    from hello_ray.plots.image_grid import grid_caption, render_before_after, render_grid

    pngs = {GRID_PNGS["images"]: render_grid(grid)}
    md = ["## Distilled images", "", f"![distilled images per class]({GRID_PNGS['images']})", "",
          grid_caption(grid), ""]
    if grid.parent is not None:
        pngs[GRID_PNGS["before_after"]] = render_before_after(grid)
        md += ["### Before / after refine", "", f"![before and after refine]({GRID_PNGS['before_after']})", "",
               f"The same images (same classes, same indices) before refine (left: `{grid.parent.key}`, "
               f"{grid.parent.source} images) and after refine on the projector (right: `{grid.key}`).", ""]
    return md, pngs
def data_section(data: Mapping[str, Any]) -> list[str]:
    """Markdown: what each stage read (split fingerprints) and the undecodable images it skipped."""
    body, prints = [], {}
    for stage, info in data.items():
        for role, fp in sorted((info.get("dataset") or {}).items()):
            prints.setdefault(role, fp)
        corrupt = info.get("corrupt")
        if corrupt is None:
            continue
        if not corrupt:
            body.append([stage, "-", "-", "-", "none scanned (data.on_corrupt=fail: one stops the stage)"])
        for role, c in sorted(corrupt.items()):
            by_class = ", ".join(f"{k}: {v}" for k, v in sorted(c.get("per_class", {}).items()))
            body.append([stage, f"{role} ({c.get('split', role)})", f"{int(c['images']):,}",
                         f"{int(c['corrupt']):,}", by_class or "-"])
    if not body and not prints:
        return []
    md = ["## Data", ""]
    if prints:
        md += ["Fingerprints of the splits read (in every key of the stages that read them): "
               + "; ".join(f"{role}: {fp.get('files')} {fp.get('format')} file(s), "
                           f"{human_bytes(fp.get('bytes'))}, `{fp.get('sha256')}`" for role, fp in sorted(prints.items()))
               + ".", ""]
    if body:
        md += [markdown_table(["stage", "split", "images", "undecodable (skipped)", "by class"], body), "",
               "Undecodable images are skipped with data.on_corrupt=skip; each stage's manifest lists "
               "the first of them by name.", ""]
    return md


def build_report(
    results_rows: Any,
    trajectory: Mapping[str, Any] | None = None,
    fidelity: Mapping[str, Any] | None = None,
    sweep_rows: Any = None,
    storage: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    *,
    title: str = "hello_ray run",
    meta: Mapping[str, Any] | None = None,
    teacher_window: str | None = None,
    images: "ImageGrid | None" = None,
    data: Mapping[str, Any] | None = None,
    preflight: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, bytes]]:
    """The markdown report and its PNGs ``{file name: png bytes}``; a section whose input is
    None or empty is left out. Raises ValueError naming the row/key of malformed input."""
    summary = summarise(results_rows)
    pngs: dict[str, bytes] = {}
    md: list[str] = [f"# {title}", ""]
    if meta:
        md += ["## Run", "", markdown_table(["key", "value"], [[k, f"`{v}`"] for k, v in meta.items()]), ""]

    md += ["## Results", "",
           "Student top-1 on the real validation set after training only on the distilled images; "
           "each label strategy ships a different amount of label data with the same images.", ""]
    if summary:
        md += [markdown_table(*results_table(summary)), ""]
        if any(g.get("report", "final") != "final" for g in summary):
            md += ["\\* *Best epoch on val*: the best top-1 of the scored epochs, picked on the "
                   "validation set as the reference protocol reports it (optimistic); the final-epoch "
                   "column beside it is the number to compare.", ""]
        pngs[PNG_NAMES["accuracy"]] = plot_accuracy_vs_bytes(summary)
        md += ["### Accuracy vs label bytes", "", f"![accuracy vs label bytes]({PNG_NAMES['accuracy']})", "",
               "Up and to the left is better: the same accuracy for fewer label bytes. Error bars "
               "are ± one std over seeds.", ""]
    else:
        md += ["No results rows were given.", ""]

    if images is not None and images.rows:
        section, grid_pngs = images_section(images)
        md += section
        pngs.update(grid_pngs)

    epochs = list((trajectory or {}).get("epochs") or [])
    if epochs:
        for i, e in enumerate(epochs):
            if is_missing(e.get("epoch")) or is_missing(e.get("top1")):
                raise ValueError(f"report: trajectory epochs[{i}] lacks 'epoch' or 'top1' (has {sorted(e)})")
        window = teacher_window or (fidelity or {}).get("teacher_window")
        pngs[PNG_NAMES["teacher"]] = plot_teacher_curve(epochs, window)
        best = max(epochs, key=lambda e: float(e["top1"]))
        shade = f" The shaded window {window} holds the multi-weak teachers the projector was fitted to." \
            if window else ""
        md += ["## Teacher trajectory", "", f"![teacher curve]({PNG_NAMES['teacher']})", "",
               f"{len(epochs)} epochs; final top-1 {format_pct(float(epochs[-1]['top1']))} %, best "
               f"{format_pct(float(best['top1']))} % at epoch {best['epoch']}.{shade}", ""]

    if fidelity:
        section, png = _fidelity_section(fidelity)
        md += section
        pngs[PNG_NAMES["fidelity"]] = png

    sweep = sweep_summary(sweep_rows) if sweep_rows is not None else []
    if sweep:
        pngs[PNG_NAMES["sweep"]] = plot_sweep_heatmap(sweep)
        finished = [r for r in sweep if not is_missing(r.get("top1"))]
        body = [[str(r["conv_rank"]), str(r["head_rank"]), str(r["window"]),
                 "stopped early" if is_missing(r.get("top1")) else format_pct(float(r["top1"]))]
                for r in sweep]
        best = (f"Best: conv rank {finished[0]['conv_rank']}, head rank {finished[0]['head_rank']}, "
                f"window {finished[0]['window']}: top-1 {format_pct(float(finished[0]['top1']))} %."
                if finished else "No trial finished.")
        md += ["## Sweep", "", best, "", f"![sweep heat map]({PNG_NAMES['sweep']})", "",
               markdown_table(["conv rank", "head rank", "window", "top-1 %"], body), ""]

    if data:
        md += data_section(data)
    if storage:
        md += ["## Storage accounting", "", markdown_table(*storage_table(storage)), ""]
    if preflight and preflight.get("cost"):
        md += preflight_section(preflight)
    return "\n".join(md).rstrip() + "\n", pngs


def preflight_section(preflight: Mapping[str, Any]) -> list[str]:
    """The preflight's cost table (``hello-ray preflight`` kept its JSON in the run's store)."""
    from hello_ray.preflight.cost import format_cost

    return ["## Preflight", "", f"`hello-ray preflight` before this run ({preflight.get('wall_s', '?')} s): "
            "rehearsal step times, peak memory, FLOPs per item and the full run's predicted work, bytes "
            "and time.", "", format_cost(preflight["cost"], markdown=True), ""]


def report_key(name: str) -> str:
    """The store key of a report named ``name``: store keys are flat, so ``reports/demo-1a2b``
    becomes ``reports-demo-1a2b``; characters a key cannot hold become ``-``."""
    key = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.strip().strip("/")).strip("-.")
    if not key:
        raise ValueError(f"report: {name!r} gives an empty report key")
    return key


def image_source(store: "Store", images_key: str) -> str:
    """The ``images.source`` an image set came from (rded | sre2l | lpld; its ``imageset.json``).
    A refined set keeps its parent's; sets written before the key existed are RDED selections."""
    from hello_ray.data.imageset import META

    return str(read_json(store, images_key, META).get("image_source", "rded"))


def label_image_source(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """The rows with ``images`` "distilled" renamed to their image source ("lpld", "rded", ...), so a
    report that sets rows of several sources side by side keeps them apart; "floor" rows stay."""
    return [{**r, "images": source} if r.get("images") == "distilled" else r for r in rows]


def collect_inputs(store: "Store", keys: Mapping[str, str]) -> dict[str, Any]:
    """Read the report's inputs from finished artifacts: ``keys`` maps role -> artifact key
    (``evaluate``, ``teachers``, ``transfer``, ``images``; missing roles give None/empty). With
    ``images``, the distilled rows are labelled with that set's image source (``label_image_source``).

    Returns ``{"rows": results rows, "trajectory": trajectory.json, "fidelity": fidelity.json,
    "class_names": [...], "images": ImageGrid or None}``, each read through its format module
    (hello_ray/formats/; the grid through hello_ray/plots/image_grid.py, only the images shown).
    "class_names": [...], "data": {stage: {"corrupt", "dataset"}}}``, each read through its format
    module (hello_ray/formats/); ``data`` from the manifests of the stages that read the real data.
    """
    from hello_ray.plots.image_grid import read_image_grid

    def read(role: str, reader: Any) -> Any:
        return reader(store, keys[role]) if keys.get(role) else None

    data = {}
    for stage in ("teachers", "select", "recover", "transfer", "evaluate"):
        if keys.get(stage) and store.exists(keys[stage]):
            summary = store.manifest(keys[stage]).get("summary") or {}
            if "corrupt" in summary or "dataset" in summary:
                data[stage] = {k: summary[k] for k in ("corrupt", "dataset") if k in summary}
    trajectory = read("teachers", load_trajectory)
    rows = read("evaluate", read_results) or []
    if keys.get("images"):  # the distilled rows say which image source they trained on
        rows = label_image_source(rows, image_source(store, keys["images"]))
    return {"rows": rows, "trajectory": trajectory,
            "fidelity": read("transfer", read_fidelity),
            "class_names": list((trajectory or {}).get("class_names") or []),
            "images": read("images", read_image_grid), "data": data}


def write_report(
    store: "Store",
    name: str,
    results_rows: Any,
    trajectory: Mapping[str, Any] | None = None,
    fidelity: Mapping[str, Any] | None = None,
    sweep_rows: Any = None,
    storage: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    *,
    inputs: Mapping[str, str] | None = None,
    meta: Mapping[str, Any] | None = None,
    teacher_window: str | None = None,
    images: "ImageGrid | None" = None,
    data: Mapping[str, Any] | None = None,
    preflight: Mapping[str, Any] | None = None,
) -> str:
    """Build the report and store it as artifact ``report_key(name)``: PNGs, then ``README.md``,
    then the manifest (stage "report", ``inputs`` = the artifact keys it summarises). A re-run
    rewrites it. Returns the README's URI."""
    key = report_key(name)
    markdown, pngs = build_report(results_rows, trajectory, fidelity, sweep_rows, storage,
                                  title=f"hello_ray report: {name}", meta=meta,
                                  teacher_window=teacher_window, images=images, data=data,
                                  preflight=preflight)
    for png_name, png in pngs.items():
        store.put_bytes(key, png_name, png)
    store.put_bytes(key, REPORT_FILE, markdown.encode("utf-8"))
    store.finalize(key, STAGE, {"name": name, "files": sorted([REPORT_FILE, *pngs])}, dict(inputs or {}),
                   {"sections": [line[3:] for line in markdown.splitlines() if line.startswith("## ")]})
    return store.uri_for(key, REPORT_FILE)
