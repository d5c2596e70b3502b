"""The cost model: per stage, the full run's work, FLOPs, bytes written and time.

Work is counted from the config and the dataset's size (the checks' split sizes):

- teachers: train images x epochs training views, plus val images x epochs forward passes;
- select: classes x min(mipc, images per class) x num_crop crops scored (observer forward at full size);
- recover: classes x ipc images x iterations;
- transfer: train images x epochs views (projector forward + backward, teacher window forward),
  plus the text initialisation of every class's head row;
- refine: classes x ipc images x steps;
- evaluate: per planned row (``evaluate.plan_rows``: students x strategies x seeds, floor, continual),
  epochs x its images views; hard rows cost a student step, online and stored rows add the labeller
  (stored labels are made by the same teacher forward, once per view, in the relabel pass).

FLOPs per item come from the rehearsal's FlopCounterMode counts, time per item on this machine from
its measured step times (one process; the run's workers here share the same cores), and on an
accelerator from ``FLOPs / (peak x efficiency)`` of ``devices.yaml`` (editable), spread over the
stage's workers or actors (one accelerator each). Bytes: teacher checkpoints (epochs x the measured
state_dict size), images (classes x ipc x the measured PNG size), the adapter (its measured files),
stored labels (hello_ray.accounting.storage_report, the numbers ``hello-ray storage`` prints).

Fixed costs on this machine, added to the per-item time: each stage's measured start-up
(``Rehearsal.startup``: a no-op Ray Train run with the run's workers, or a no-op actor pool of the
stage's size; ``startup_s``), and for the teachers one checkpoint put/get through the store per epoch.
The accelerator columns count FLOPs only.
"""
from __future__ import annotations

import os
from importlib import resources
from typing import Any

import yaml

from hello_ray.config import Config
from hello_ray.label_spec import parse_spec
from hello_ray.preflight.measure import StageRehearsal
from hello_ray.registry import TRAIN_STAGES


def load_devices(path: str | None = None) -> dict[str, dict[str, float]]:
    """The accelerator table: ``devices.yaml`` shipped with the package, or ``path``."""
    text = open(path).read() if path else resources.files("hello_ray.preflight").joinpath("devices.yaml").read_text()
    table = yaml.safe_load(text) or {}
    for name, spec in table.items():
        if not isinstance(spec, dict) or not {"peak_tflops", "efficiency"} <= set(spec):
            raise ValueError(f"devices table {path or 'devices.yaml'}: {name!r} needs peak_tflops and efficiency")
    return table


def _strategy_labeller(strategy: str) -> str:
    base = parse_spec(strategy).base
    return {"hard": "hard", "projector": "projector"}.get(base, "teacher")  # teacher, stored, stored/N


def parallel_here(cfg: Config, stage: str, cores: int) -> int:
    """Cores a stage keeps busy on this machine: its workers or actors times the threads Ray gives each
    (OMP_NUM_THREADS = its whole CPUs, at least 1), at most the machine's cores."""
    if stage in TRAIN_STAGES:
        units, cpus = cfg.compute.num_workers, cfg.compute.cpus_per_worker
    elif not hasattr(cfg, stage):  # external: read threads in the driver, timed on the wall clock
        return 1
    else:
        sec = getattr(cfg, stage)
        units, cpus = sec.num_actors, sec.actor_cpus
    return max(1, min(cores, units * max(1, int(cpus))))


def stage_work(cfg: Config, facts: dict[str, Any], r: dict[str, StageRehearsal],
               cores: int | None = None) -> dict[str, dict[str, Any]]:
    """Per active stage: items, FLOPs, seconds on this machine, bytes written, parallel units.

    On a CPU the seconds come from the rehearsal's process CPU time per item divided by the cores the
    stage's workers use here (:func:`parallel_here`): a shared machine slows the wall clock of a few
    steps, not the CPU time they take. On a GPU, from the wall clock."""
    from hello_ray.accounting import pruned_label_bytes, storage_report, topk_label_bytes

    cpu_clock = any(x.peak_mem_kind.startswith("cpu") for x in r.values())
    cores = cores or os.cpu_count() or 1

    def item_s(x: StageRehearsal, stage: str) -> float:
        return x.cpu_item_s / parallel_here(cfg, stage, cores) if cpu_clock else x.item_s

    C = int(facts["classes"])
    train, val = int(facts.get("train_images", 0)), int(facts.get("val_images", 0))
    ipc = cfg.select.ipc
    images = C * ipc
    workers = cfg.compute.num_workers
    out: dict[str, dict[str, Any]] = {}
    png = r["select"].extra["png_bytes_per_image"] if "select" in r else cfg.data.image_size ** 2 * 3
    if "teachers" in r:
        t, ep = r["teachers"], cfg.teachers.epochs
        fwd_flops = t.extra["forward_flops_per_item"]
        fwd_s = (t.extra["forward_cpu_item_s"] / parallel_here(cfg, "teachers", cores) if cpu_clock
                 else t.extra["forward_item_s"])
        out["teachers"] = {
            "work": f"{train:,} train x {ep} epochs + {val:,} val x {ep}", "items": train * ep,
            "flops": train * ep * t.flops_per_item + val * ep * fwd_flops,
            "seconds_here": train * ep * item_s(t, "teachers") + val * ep * fwd_s
            + ep * t.extra.get("checkpoint_store_s", 0.0),
            "bytes": ep * t.extra["checkpoint_bytes"], "bytes_what": f"{ep} checkpoints", "units": workers}
    if "select" in r:
        s, sel = r["select"], cfg.select
        per_class = min(sel.mipc, train // max(C, 1)) if train else sel.mipc
        crops = C * per_class * sel.num_crop
        out["select"] = {"work": f"{C:,} classes x {per_class} images x {sel.num_crop} crops", "items": crops,
                         "flops": crops * s.flops_per_item, "seconds_here": crops * item_s(s, "select"),
                         "bytes": images * png, "bytes_what": f"{images:,} PNGs", "units": sel.num_actors}
    def per_image_steps(stage: str, steps: int, what: str) -> dict[str, Any]:
        """recover and refine: every distilled image takes ``steps`` optimisation steps, then a PNG."""
        s, n = r[stage], images * steps
        return {"work": f"{images:,} images x {steps} {what}", "items": n, "flops": n * s.flops_per_item,
                "seconds_here": n * item_s(s, stage), "bytes": images * png, "bytes_what": f"{images:,} PNGs",
                "units": getattr(cfg, stage).num_actors}

    if "recover" in r:
        out["recover"] = per_image_steps("recover", cfg.recover.iterations, "iterations")
    if "external" in r:
        s = r["external"]
        n = int(s.extra["images"])
        out["external"] = {"work": f"{n:,} external images read, decoded, written", "items": n, "flops": 0.0,
                           "seconds_here": n * s.item_s, "bytes": int(n * s.extra["png_bytes_per_image"]),
                           "bytes_what": f"{n:,} PNGs", "units": 1}
    if "transfer" in r:
        s, tc = r["transfer"], cfg.transfer
        n = train * tc.epochs
        text_s = C * s.extra["text_init_s_per_class"]
        out["transfer"] = {"work": f"{train:,} train x {tc.epochs} epochs ({tc.n_teachers} teachers) + "
                                   f"{C:,} class prompts", "items": n,
                           "flops": n * s.flops_per_item, "seconds_here": n * item_s(s, "transfer") + text_s,
                           "bytes": s.extra["adapter_bytes"], "bytes_what": "adapter", "units": workers,
                           "lora_params": s.extra["lora_params"]}
    if "refine" in r:
        out["refine"] = per_image_steps("refine", cfg.refine.steps, "steps")
    if "evaluate" in r:
        from hello_ray.stages.evaluate import plan_rows

        s, ev = r["evaluate"], cfg.evaluate
        flops = s.extra["flops_per_item"]
        steps = ({st: {k: v / parallel_here(cfg, "evaluate", cores) for k, v in d.items()}
                  for st, d in s.extra["cpu_step_s"].items()} if cpu_clock else s.extra["step_s"])
        items = secs = fl = 0.0
        rows = plan_rows(cfg, C)
        for row in rows:
            views = ev.epochs * (len(row["classes"]) * ipc if row.get("classes") else
                                 (train or images) if row["images"] == "full" else images)
            lab = _strategy_labeller(row["strategy"])
            lab = lab if lab in steps[row["student"]] else "hard"
            items += views
            secs += views * steps[row["student"]][lab] / s.batch
            fl += views * flops[row["student"]][lab]
        storage = storage_report(C, ipc, ev.epochs, cfg.transfer.conv_rank, cfg.transfer.head_rank,
                                 cfg.transfer.clip_model, cfg.transfer.lora_style, cfg.teachers.model,
                                 cfg.data.image_size, ev.batch_size)
        label_bytes = 0
        for strategy in ev.strategies:
            spec = parse_spec(strategy)
            if spec.base == "stored" and spec.topk:
                label_bytes += topk_label_bytes(C, ipc, ev.epochs, ev.batch_size, spec.prune, spec.topk)
            elif spec.base == "stored":
                label_bytes += (storage["stored_soft_labels_bytes"] if spec.prune <= 1 else
                                pruned_label_bytes(C, ipc, ev.epochs, ev.batch_size, spec.prune))
        out["evaluate"] = {"work": f"{len(rows)} rows x {ev.epochs} epochs x {images:,} images", "items": int(items),
                           "flops": fl, "seconds_here": secs, "bytes": label_bytes,
                           "bytes_what": "stored labels", "units": workers,
                           "stored_soft_labels_bytes": storage["stored_soft_labels_bytes"],
                           "projector_lora_params": storage["projector_lora_params"]}
    for name, w in out.items():  # the measured start-up (workers, actors) before the first step
        w["startup_s"] = r[name].extra.get("startup_s", 0.0)
        w["seconds_here"] += w["startup_s"]
    return out


def cost_table(cfg: Config, facts: dict[str, Any], rehearsals: list[StageRehearsal],
               devices: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The cost model as plain data: per stage its rehearsal numbers, work and predicted times."""
    by = {x.stage: x for x in rehearsals}
    work = stage_work(cfg, facts, by)
    stages = []
    for name, w in work.items():
        x = by[name]
        on = {d: w["flops"] / (spec["peak_tflops"] * 1e12 * spec["efficiency"]) / max(w["units"], 1)
              for d, spec in devices.items()}
        stages.append({"stage": name, "steps": x.steps, "batch": x.batch, "step_s": x.step_s,
                       "cpu_step_s": x.cpu_step_s, "cores_here": parallel_here(cfg, name, os.cpu_count() or 1),
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
