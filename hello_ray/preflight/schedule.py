"""GPU-hours on one node from a measured device profile: per stage before and after the changes
that fill its GPUs (each stage's ``<stage>_plan.gpu_hours``), and a stage's own schedule block where
its plan has one (``grid_hours``: the evaluate grid before and after the queue).

A *device profile* is what ``benchmarks/gpu_check.py`` writes on a GPU (``benchmarks/results/
gpu_check_h200.json`` is the H200's): the student step (``student_step``, ``breakdown``) and the
sections each stage's plan names in its ``PROFILE_SECTIONS``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hello_ray.config import Config


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
        stages = {name: data["sections"].get(name) for name in stage_sections()}
        steps = {name: float(v["step_ms"]) / 1e3 for name, v in st["results"].items()}
        return {"device": data["env"].get("name", "GPU"), "native_bf16": bool(data["env"].get("native_bf16")),
                "batch": int(st["batch"]), "image_size": int(st["image_size"]), "classes": int(st["classes"]),
                "steps": steps, "views_cpu_s": float(data["sections"]["breakdown"]["views_images@cpu_ms"]) / 1e3,
                "views_device_s": float(data["sections"]["breakdown"]["views_images@device_ms"]) / 1e3,
                "cpus": int(data["env"].get("cpus", 0)), "stages": {k: v for k, v in stages.items() if v},
                "path": str(path)}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"device profile {path}: not a benchmarks/gpu_check.py result ({e!r} missing)") from None


def stage_sections() -> tuple[str, ...]:
    """The profile sections the stages' plans read (their ``PROFILE_SECTIONS``)."""
    from hello_ray import registry

    return tuple(name for s in registry.STAGES for name in getattr(registry.plan(s), "PROFILE_SECTIONS", ()))


def default_decode_rate() -> Path | None:
    """``benchmarks/results/decode_rate_cpu.json`` of a source checkout (``benchmarks/decode_rate.py``)."""
    from hello_ray.runtime import source_root

    root = source_root()
    path = root / "benchmarks" / "results" / "decode_rate_cpu.json" if root else None
    return path if path is not None and path.is_file() else None


def stage_gpu_hours(cfg: Config, classes: int, train_images: int, profile: dict[str, Any],
                    decode_per_cpu: float | None, node_cpus: int | None = None,
                    stages: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Per stage, the GPU-hours an ``compute.num_workers``-GPU node is held, before and after the
    changes that fill its GPUs, from the profile's measured steps (the node runs one stage at a time,
    so a stage holds every GPU for its wall time): each stage's ``<stage>_plan.gpu_hours``, which
    says what changed; a stage the profile did not measure has no row, a figure it could not
    measure is None. ``stages``: the run's active stages, rows in their order (default: every stage,
    in recipe order).
    ``decode_per_cpu``: a CPU's images/s decoding the training images (``benchmarks/decode_rate.py``'s
    ``centre_square``), on ``node_cpus`` CPUs (default: the profile machine's CPUs per GPU x GPUs).
    """
    from hello_ray import registry

    gpus = cfg.compute.num_workers
    cpus = node_cpus or (profile.get("cpus") or 0) * gpus or None
    rows: list[dict[str, Any]] = []
    for stage in registry.STAGES if stages is None else [registry.by_name(n) for n in stages]:
        hours = getattr(registry.plan(stage), "gpu_hours", None)
        if hours is None:
            continue
        row = hours(cfg, classes, train_images, profile, decode_per_cpu, cpus)
        if row is not None:
            rows.append({"stage": stage.STAGE, **row})
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
