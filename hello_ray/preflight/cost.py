"""The cost model: per stage, the full run's work, FLOPs, bytes written and time.

Work is counted from the config and the dataset's size (the checks' split sizes) by each stage's
own formula, ``<stage>_plan.work`` beside the stage (what a unit of its work is, how many the full
run has, what it writes); this module adds what is common to all of them.

FLOPs per item come from the rehearsal's FlopCounterMode counts, time per item on this machine from
its measured step times (one process; the run's workers here share the same cores), and on an
accelerator from ``FLOPs / (peak x efficiency)`` of ``devices.yaml`` (editable), spread over the
stage's workers or actors (one accelerator each). Bytes: each stage's measured files (checkpoints,
PNGs at the size the image-writing stage's rehearsal measured, the adapter, stored labels from
``hello_ray.accounting``, the numbers ``hello-ray storage`` prints).

Fixed costs on this machine, added to the per-item time: each stage's measured start-up
(``Rehearsal.startup``: a no-op Ray Train run with the run's workers, or a no-op actor pool of the
stage's size; ``startup_s``). The accelerator columns count FLOPs only.
"""
from __future__ import annotations

import os
from importlib import resources
from types import ModuleType
from typing import Any

import yaml

from hello_ray.config import Config
from hello_ray.measure import CostBasis, StageRehearsal


def load_devices(path: str | None = None) -> dict[str, dict[str, float]]:
    """The accelerator table: ``devices.yaml`` shipped with the package, or ``path``."""
    text = open(path).read() if path else resources.files("hello_ray.preflight").joinpath("devices.yaml").read_text()
    table = yaml.safe_load(text) or {}
    for name, spec in table.items():
        if not isinstance(spec, dict) or not {"peak_tflops", "efficiency"} <= set(spec):
            raise ValueError(f"devices table {path or 'devices.yaml'}: {name!r} needs peak_tflops and efficiency")
    return table


def parallel_here(cfg: Config, stage: ModuleType, cores: int) -> int:
    """Cores a stage keeps busy on this machine: its workers or actors times the threads Ray gives each
    (OMP_NUM_THREADS = its whole CPUs, at least 1), at most the machine's cores; a driver stage's
    read threads are timed on the wall clock (1)."""
    if stage.KIND == "train":
        units, cpus = cfg.compute.num_workers, cfg.compute.cpus_per_worker
    elif stage.KIND == "actors":
        units, cpus = stage.pool(cfg)
    else:
        return 1
    return max(1, min(cores, units * max(1, int(cpus))))


def stage_work(cfg: Config, facts: dict[str, Any], r: dict[str, StageRehearsal],
               cores: int | None = None) -> dict[str, dict[str, Any]]:
    """Per rehearsed stage, in recipe order: items, FLOPs, seconds on this machine, bytes written,
    parallel units (each stage's ``<stage>_plan.work``), plus its measured start-up.

    On a CPU the seconds come from the rehearsal's process CPU time per item divided by the cores the
    stage's workers use here (:func:`parallel_here`): a shared machine slows the wall clock of a few
    steps, not the CPU time they take. On a GPU, from the wall clock."""
    from hello_ray import registry

    cores = cores or os.cpu_count() or 1
    # A distilled image's PNG as the stage that writes them measured it (else raw RGB bytes).
    png = next((x.extra["distilled_png_bytes"] for x in r.values() if "distilled_png_bytes" in x.extra),
               cfg.data.image_size ** 2 * 3)
    out: dict[str, dict[str, Any]] = {}
    for stage in registry.STAGES:
        x = r.get(stage.STAGE)
        if x is None:
            continue
        basis = CostBasis(cfg, int(facts["classes"]), int(facts.get("train_images", 0)),
                          int(facts.get("val_images", 0)), png,
                          any(y.peak_mem_kind.startswith("cpu") for y in r.values()),
                          parallel_here(cfg, stage, cores))
        w = registry.plan(stage).work(basis, x)
        w["startup_s"] = x.extra.get("startup_s", 0.0)  # the measured start-up (workers, actors)
        w["seconds_here"] += w["startup_s"]
        out[stage.STAGE] = w
    return out


def cost_table(cfg: Config, facts: dict[str, Any], rehearsals: list[StageRehearsal],
               devices: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The cost model as plain data: per stage its rehearsal numbers, work and predicted times."""
    from hello_ray import registry

    by = {x.stage: x for x in rehearsals}
    work = stage_work(cfg, facts, by)
    stages = []
    for name, w in work.items():
        x = by[name]
        on = {d: w["flops"] / (spec["peak_tflops"] * 1e12 * spec["efficiency"]) / max(w["units"], 1)
              for d, spec in devices.items()}
        stages.append({"stage": name, "steps": x.steps, "batch": x.batch, "step_s": x.step_s,
                       "cpu_step_s": x.cpu_step_s,
                       "cores_here": parallel_here(cfg, registry.by_name(name), os.cpu_count() or 1),
                       "peak_mem_bytes": x.peak_mem_bytes, "peak_mem_kind": x.peak_mem_kind,
                       "flops_per_item": x.flops_per_item, "item": x.item, **w, "seconds_on": on,
                       "path": x.path, "notes": x.notes, "extra": x.extra})
    total = {"seconds_here": sum(s["seconds_here"] for s in stages), "flops": sum(s["flops"] for s in stages),
             "bytes": sum(s["bytes"] for s in stages),
             "seconds_on": {d: sum(s["seconds_on"][d] for s in stages) for d in devices}}
    return {"stages": stages, "total": total, "devices": devices}


def human_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def format_cost(table: dict[str, Any], device_columns: list[str] | None = None, markdown: bool = False) -> str:
    """The cost table as text (terminal) or markdown (report)."""
    from hello_ray.tables import human_bytes, markdown_table, text_table

    devs = device_columns or list(table["devices"])
    head = ["stage", "steps x batch", "step s", "cpu s", "peak MiB", "FLOP/item", "full-run work", "FLOPs",
            "writes", "this machine"] + [f"{d} x units" for d in devs]
    rows = []
    for s in table["stages"]:
        rows.append([s["stage"], f"{s['steps']} x {s['batch']}", f"{s['step_s']:.3f}", f"{s.get('cpu_step_s', 0):.3f}",
                     f"{s['peak_mem_bytes'] / 2 ** 20:,.0f}", f"{s['flops_per_item']:.3g}", s["work"],
                     f"{s['flops']:.3g}", f"{human_bytes(s['bytes'], digits=1)} ({s['bytes_what']})",
                     human_seconds(s["seconds_here"]) + f" / {s.get('cores_here', 1)}c"]
                    + [f"{human_seconds(s['seconds_on'][d])} x {s['units']}" for d in devs])
    t = table["total"]
    rows.append(["total", "", "", "", "", "", "", f"{t['flops']:.3g}", human_bytes(t["bytes"], digits=1),
                 human_seconds(t["seconds_here"])] + [human_seconds(t["seconds_on"][d]) for d in devs])
    return markdown_table(head, rows) if markdown else text_table(head, rows)
