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
    """The figures of a ``gpu_check.py`` JSON this model uses; a file without them is a ValueError."""
    data = json.loads(Path(path).read_text())
    try:
        st = data["sections"]["student_step"]
        steps = {name: float(v["step_ms"]) / 1e3 for name, v in st["results"].items()}
        return {"device": data["env"].get("name", "GPU"), "native_bf16": bool(data["env"].get("native_bf16")),
                "batch": int(st["batch"]), "image_size": int(st["image_size"]), "classes": int(st["classes"]),
                "steps": steps, "views_cpu_s": float(data["sections"]["breakdown"]["views_images@cpu_ms"]) / 1e3,
                "views_device_s": float(data["sections"]["breakdown"]["views_images@device_ms"]) / 1e3,
                "path": str(path)}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"device profile {path}: not a benchmarks/gpu_check.py result ({e!r} missing)") from None


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


def evaluate_gpu_hours(cfg: Config, classes: int, profile: dict[str, Any]) -> dict[str, Any]:
    """Before / after GPU-hours held and the useful GPU-hours of the evaluate grid (see the module)."""
    from hello_ray.stages.evaluate import plan_rows
    from hello_ray.stages.evaluate_queue import student_flops

    ev, gpus = cfg.evaluate, cfg.compute.num_workers
    images = classes * cfg.select.ipc
    ref = student_flops("resnet18", classes, profile["image_size"])
    after, before = [], []
    for row in plan_rows(cfg, classes):
        n = images * (len(row["classes"]) / classes if row.get("classes") else 1)
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
