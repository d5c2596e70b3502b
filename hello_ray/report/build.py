"""The report's sections and its assembly: ``build_report`` (markdown + PNGs), ``collect_inputs`` (from
the store's artifacts), ``write_report`` (PNGs, then README.md, then the manifest)."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any


from hello_ray.formats.fidelity import read_fidelity
from hello_ray.formats.jsonfile import read_json
from hello_ray.formats.results import read_results, results_table, summarise
from hello_ray.formats.trajectory import load_trajectory
from hello_ray.report.frontier import frontier_table
from hello_ray.scores import DD_RANKING, scores_table
from hello_ray.tables import format_pct, human_bytes, is_missing, markdown_table

if TYPE_CHECKING:
    from hello_ray.plots.image_grid import ImageGrid
    from hello_ray.store import Store


from hello_ray.report.plots import (
    FIDELITY_METRICS,
    GRID_PNGS,
    PNG_NAMES,
    REPORT_FILE,
    STAGE,
    _fid,
    plot_accuracy_vs_bytes,
    plot_fidelity,
    plot_sweep_heatmap,
    plot_teacher_curve,
    storage_table,
    sweep_summary,
)


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
    scores: Sequence[Mapping[str, Any]] | None = None,
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
        md += ["### Accuracy vs label bytes: the frontier", "",
               f"![accuracy vs label bytes]({PNG_NAMES['accuracy']})", "",
               "Up and to the left is better: the same accuracy for fewer label bytes. Error bars "
               "are ± one std over seeds; the line joins the points no other point dominates (no more "
               "bytes and no less top-1). Bytes are the files each strategy ships, counted exactly.", "",
               markdown_table(*frontier_table(summary)), ""]
    if scores:
        md += ["### Fair scores (DD-Ranking)", "",
               f"Label Robust Score and Augmentation Robust Score ({DD_RANKING}): each strategy's rows "
               "against the random-real-image rows with the same labels (and, for ARS, the +noaug rows), "
               f"accuracies in {scores[0]['scale']}, weight {scores[0]['weight']:g}; mean ± std over seeds.", "",
               markdown_table(*scores_table(scores)), ""]
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
        md += ["## Sweep", "", best, "", f"![sweep heat map]({PNG_NAMES['sweep']})", ""]
        if any(not is_missing(r.get("lrs")) for r in sweep):  # sweep.scores: DD-Ranking's LRS per trial
            pngs[PNG_NAMES["sweep_lrs"]] = plot_sweep_heatmap(sweep, "lrs")
            md += [f"![sweep LRS heat map]({PNG_NAMES['sweep_lrs']})", "",
                   "The projector's Label Robust Score per trial (DD-Ranking): its gain over random real "
                   "images with the same labels, less what it leaves of full-data training.", ""]
            for row, r in zip(body, sweep):
                row.append("-" if is_missing(r.get("lrs")) else f"{float(r['lrs']):.3f}")
        headers = ["conv rank", "head rank", "window", "top-1 %"]
        headers += ["LRS"] if any(not is_missing(r.get("lrs")) for r in sweep) else []
        md += [markdown_table(headers, body), ""]

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
    scores: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """Build the report and store it as artifact ``report_key(name)``: PNGs, then ``README.md``,
    then the manifest (stage "report", ``inputs`` = the artifact keys it summarises). A re-run
    rewrites it. Returns the README's URI."""
    key = report_key(name)
    markdown, pngs = build_report(results_rows, trajectory, fidelity, sweep_rows, storage,
                                  title=f"hello_ray report: {name}", meta=meta,
                                  teacher_window=teacher_window, images=images, data=data,
                                  preflight=preflight, scores=scores)
    for png_name, png in pngs.items():
        store.put_bytes(key, png_name, png)
    store.put_bytes(key, REPORT_FILE, markdown.encode("utf-8"))
    store.finalize(key, STAGE, {"name": name, "files": sorted([REPORT_FILE, *pngs])}, dict(inputs or {}),
                   {"sections": [line[3:] for line in markdown.splitlines() if line.startswith("## ")]})
    return store.uri_for(key, REPORT_FILE)
