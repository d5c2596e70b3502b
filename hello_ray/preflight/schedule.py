"""The evaluate grid's GPU-hours on one node, from a measured device profile: before and after the queue.

A *device profile* is what ``benchmarks/gpu_check.py`` writes on a GPU (``benchmarks/results/
gpu_check_h200.json`` is the H200's): a ResNet-18 student step at its batch and size, with the
views built on the CPU or on the device, per labeller and precision, and the views' own time. From
it, for every row of ``evaluate.plan_rows`` on ``compute.num_workers`` GPUs:

- *after* (``evaluate.parallel=queue``): a row is one GPU's, its step the profile's step with the
  views built on the device; the rows are placed longest first on the GPUs (LPT) and the node is
  held until the last ends: held = GPUs x makespan;
- *before* (the earlier default: DDP over every GPU, views drawn on one CPU thread per rank for
  the whole global batch): a step is the views' CPU time plus the rest of the step on 1/GPUs of the
  batch; the rows run one after another, every GPU held throughout;
- *useful work*: the sum of the rows' steps at the after step, the GPU time the grid needs.

A student other than the profile's scales its step by its forward + backward FLOPs per image and the
batch by the ratio of batch sizes (``evaluate_queue.student_flops``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hello_ray.config import Config
from hello_ray.labels import parse_strategy


def default_profile() -> Path | None:
    """The H200 profile of a source checkout (an installed package gives ``--device-profile``)."""
    from hello_ray.runtime import source_root

    root = source_root()
    path = root / "benchmarks" / "results" / "gpu_check_h200.json" if root else None
    return path if path is not None and path.is_file() else None


def load_profile(path: str | Path) -> dict[str, Any]:
    """The figures of a ``gpu_check.py`` JSON this model uses; a file without them is a ValueError.
    The other stages' steps (``stages``) are kept where the profile measured them."""
    data = json.loads(Path(path).read_text())
    try:
        st = data["sections"]["student_step"]
        stages = {name: data["sections"].get(name) for name in STAGE_SECTIONS}
        steps = {name: float(v["step_ms"]) / 1e3 for name, v in st["results"].items()}
        return {"device": data["env"].get("name", "GPU"), "native_bf16": bool(data["env"].get("native_bf16")),
                "batch": int(st["batch"]), "image_size": int(st["image_size"]), "classes": int(st["classes"]),
                "steps": steps, "views_cpu_s": float(data["sections"]["breakdown"]["views_images@cpu_ms"]) / 1e3,
                "views_device_s": float(data["sections"]["breakdown"]["views_images@device_ms"]) / 1e3,
                "cpus": int(data["env"].get("cpus", 0)), "stages": {k: v for k, v in stages.items() if v},
                "path": str(path)}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"device profile {path}: not a benchmarks/gpu_check.py result ({e!r} missing)") from None


STAGE_SECTIONS = ("teachers_step", "transfer_step", "refine_step", "recover_step", "select_score")


def default_decode_rate() -> Path | None:
    """``benchmarks/results/decode_rate_cpu.json`` of a source checkout (``benchmarks/decode_rate.py``)."""
    from hello_ray.runtime import source_root

    root = source_root()
    path = root / "benchmarks" / "results" / "decode_rate_cpu.json" if root else None
    return path if path is not None and path.is_file() else None


def _device_step(profile: dict[str, Any], strategy: str, precision: str) -> float:
    """The profile's step (s) with the views on the device for a strategy's labeller."""
    base = parse_strategy(strategy)[0]
    if base in ("hard", "stored"):          # stored replays logits: no labeller forward
        return profile["steps"]["hard images@device"]
    prec = "bf16" if precision == "bf16" or (precision == "auto" and profile["native_bf16"]) else "fp32"
    return profile["steps"][f"{base} {prec} images@device"]


def lpt_makespan(times: list[float], slots: int) -> float:
    """Longest-processing-time-first on ``slots`` identical machines: the last finish."""
    loads = [0.0] * max(1, slots)
    for t in sorted(times, reverse=True):
        i = loads.index(min(loads))
        loads[i] += t
    return max(loads)


def evaluate_gpu_hours(cfg: Config, classes: int, profile: dict[str, Any], train_images: int | None = None
                       ) -> dict[str, Any]:
    """Before / after GPU-hours held and the useful GPU-hours of the evaluate grid (see the module).
    ``train_images``: the training split's size, what a ``full`` row (``evaluate.full_data``) trains on."""
    from hello_ray.stages.evaluate import plan_rows
    from hello_ray.stages.evaluate_queue import student_flops

    ev, gpus = cfg.evaluate, cfg.compute.num_workers
    images = classes * cfg.select.ipc
    ref = student_flops("resnet18", classes, profile["image_size"])
    after, before = [], []
    for row in plan_rows(cfg, classes):
        n = images * (len(row["classes"]) / classes if row.get("classes") else 1)
        if row["images"] == "full":
            n = train_images or images
        steps = ev.epochs * math.ceil(n / ev.batch_size)
        scale = (ev.batch_size / profile["batch"]) * (
            student_flops(row["student"], classes, cfg.data.image_size) / ref)
        step = _device_step(profile, row["strategy"], ev.label_precision) * scale
        views_cpu = profile["views_cpu_s"] * ev.batch_size / profile["batch"]
        rest = step - profile["views_device_s"] * ev.batch_size / profile["batch"]
        after.append(steps * step)
        before.append(steps * (views_cpu + rest / gpus))
    makespan, serial = lpt_makespan(after, gpus), sum(before)
    useful = sum(after)
    return {"device": profile["device"], "profile": profile["path"], "gpus": gpus, "rows": len(after),
            "useful_gpu_h": useful / 3600,
            "after": {"wall_h": makespan / 3600, "gpu_h": gpus * makespan / 3600},
            "before": {"wall_h": serial / 3600, "gpu_h": gpus * serial / 3600},
            "after_over_useful": gpus * makespan / useful if useful else float("nan")}


def format_schedule(s: dict[str, Any]) -> str:
    return (f"evaluate grid, {s['rows']} rows on {s['gpus']} x {s['device']} (profile {s['profile']}):\n"
            f"  before (DDP over every GPU, views drawn on the CPU): {s['before']['wall_h']:.1f} h wall, "
            f"{s['before']['gpu_h']:.1f} GPU-h held\n"
            f"  after (a row per GPU from the queue, longest first, views on the device): "
            f"{s['after']['wall_h']:.2f} h wall, {s['after']['gpu_h']:.1f} GPU-h held\n"
            f"  useful work: {s['useful_gpu_h']:.1f} GPU-h (after / useful {s['after_over_useful']:.2f})")


def stage_gpu_hours(cfg: Config, classes: int, train_images: int, profile: dict[str, Any],
                    decode_per_cpu: float | None, node_cpus: int | None = None,
                    stages: tuple[str, ...] = ("teachers", "select", "transfer", "refine", "evaluate"),
                    ) -> dict[str, Any]:
    """Per stage, the GPU-hours an ``compute.num_workers``-GPU node is held, before and after the
    changes that fill its GPUs, from the profile's measured steps (the node runs one stage at a time,
    so a stage holds every GPU for its wall time). None where the profile did not measure it.
    ``stages``: the run's active stages.

    - teachers: DDP over the GPUs at the profile's step (fp32; bf16 only speeds it further); before,
      the training images were decoded (centred square, JPEG draft) by CPU tasks, ``decode_per_cpu``
      images/s each (``benchmarks/decode_rate.py``'s ``centre_square``) on ``node_cpus`` CPUs (default:
      the profile machine's CPUs per GPU x GPUs), and the GPUs waited for them; after,
      the workers decode on their GPUs (``data.decode=auto``; nvJPEG's own time is not in the profile);
    - transfer: DDP at the profile's step, unchanged;
    - select: the observer's crops/s on each actor's GPU, unchanged;
    - refine: the profile's image-steps/s per actor; before one actor (the old preset), after
      ``refine.num_actors``;
    - recover: the profile's iteration at its batch (``recover.classes_per_step`` classes of ipc
      images per step: 10 x 10 = 100); before, one class per step: not measured on a GPU (None);
    - evaluate: :func:`evaluate_gpu_hours`.
    """
    gpus, st = cfg.compute.num_workers, profile.get("stages", {})
    cpus = node_cpus or (profile.get("cpus") or 0) * gpus or None
    images, ipc = classes * cfg.select.ipc, cfg.select.ipc
    rows: list[dict[str, Any]] = []

    def row(stage: str, before_s: float | None, after_s: float | None, why: str) -> None:
        rows.append({"stage": stage, "before_gpu_h": None if before_s is None else gpus * before_s / 3600,
                     "after_gpu_h": None if after_s is None else gpus * after_s / 3600, "why": why})

    if "teachers" in stages and "teachers_step" in st and train_images:
        views = train_images * cfg.teachers.epochs
        gpu_s = views / float(st["teachers_step"]["images_per_s"]) / gpus
        feed_s = views / (decode_per_cpu * cpus) if decode_per_cpu and cpus else None
        row("teachers", None if feed_s is None else max(gpu_s, feed_s), gpu_s,
            f"decode: {cpus} CPUs at {decode_per_cpu or 0:.0f} images/s each -> on the GPUs")
    if "select" in stages and "select_score" in st:
        per_class = min(cfg.select.mipc, train_images // max(classes, 1)) if train_images else cfg.select.mipc
        crops = classes * per_class * cfg.select.num_crop
        t = crops / float(st["select_score"]["fp32"]["crops_per_s"]) / cfg.select.num_actors
        row("select", t, t, f"{cfg.select.num_actors} scoring actors")
    if "transfer" in stages and "transfer_step" in st and train_images:
        t = train_images * cfg.transfer.epochs / float(st["transfer_step"]["images_per_s"]) / gpus
        row("transfer", t, t, "DDP")
    if "refine" in stages and "refine_step" in st:
        work = images * cfg.refine.steps / float(st["refine_step"]["images_x_steps_per_s"])
        row("refine", work, work / cfg.refine.num_actors, f"1 -> {cfg.refine.num_actors} actors")
    if "recover" in stages and "recover_step" in st:
        r = st["recover_step"]
        per_image_iter = float(r["iteration_ms"]) / 1e3 / int(r["batch"])
        t = images * cfg.recover.iterations * per_image_iter / cfg.recover.num_actors
        row("recover", None, t, f"1 -> {cfg.recover.classes_per_step} classes per step "
                                f"({cfg.recover.classes_per_step * ipc} images)")
    ev = evaluate_gpu_hours(cfg, classes, profile, train_images) if "evaluate" in stages else None
    if ev is not None:
        rows.append({"stage": "evaluate", "before_gpu_h": ev["before"]["gpu_h"], "after_gpu_h": ev["after"]["gpu_h"],
                     "why": "DDP rows, views on the CPU -> a row per GPU, views on the device"})
    return {"device": profile["device"], "gpus": gpus, "classes": classes, "train_images": train_images,
            "node_cpus": cpus, "profile": profile["path"], "stages": rows}


def format_stage_hours(s: dict[str, Any]) -> str:
    def h(v: float | None) -> str:
        return "n/m" if v is None else f"{v:.2f}" if v < 1 else f"{v:.1f}"

    lines = [f"GPU-hours held per stage on {s['gpus']} x {s['device']} ({s['classes']:,} classes, "
             f"{s['train_images']:,} train images; profile {s['profile']}; n/m: not measured):",
             f"  {'stage':10s} {'before':>8s} {'after':>8s}  what changed"]
    for r in s["stages"]:
        lines.append(f"  {r['stage']:10s} {h(r['before_gpu_h']):>8s} {h(r['after_gpu_h']):>8s}  {r['why']}")
    return "\n".join(lines)
