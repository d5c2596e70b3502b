"""A preflight's work beyond its checks (:mod:`hello_ray.preflight.checks`), for ``hello-ray
preflight`` (:mod:`hello_ray.cli.preflight`): the rehearsal with its cost model, and the per-stage
schedules and GPU-hours from a device profile."""
from __future__ import annotations

import json
from typing import Any

from hello_ray.config import Config
from hello_ray.preflight.checks import CheckReport


def _stages(cfg: Config) -> list[str]:
    from hello_ray.registry import active_stages

    return [s.STAGE for s in active_stages(cfg)]


def rehearse(cfg: Config, store: Any, report: CheckReport, steps: int, flop_budget: float | None,
             devices_path: str | None) -> dict[str, Any] | None:
    """Run the rehearsal and the cost model; a stage that fails becomes a failed check (named)."""
    from hello_ray.preflight.cost import cost_table, load_devices
    from hello_ray.preflight.rehearsal import Rehearsal

    reh = Rehearsal(cfg, store, report.facts["classes"], report.facts.get("class_names", []),
                    report.facts.get("clip_weights", "random-init"), steps=steps, flop_budget=flop_budget)
    try:
        reh.run(_stages(cfg))
    except Exception as e:  # noqa: BLE001 - a shape error, an OOM: the point of rehearsing
        stage = _stages(cfg)[len(reh.results)] if len(reh.results) < len(_stages(cfg)) else "startup"
        report.add(f"rehearsal.{stage}", "fail", f"{type(e).__name__}: {e}")
        return None
    for r in reh.results:
        report.add(f"rehearsal.{r.stage}", "ok", f"{r.steps} steps of {r.batch} ({r.item}), "
                   f"{r.step_s:.3f} s/step; {r.path}" + (f"; {'; '.join(r.notes)}" if r.notes else ""))
    table = cost_table(cfg, report.facts, reh.results, load_devices(devices_path))
    # The adapter a stage trained against what the label accounting counts for it: the same number.
    made = next((s["lora_params"] for s in table["stages"] if "lora_params" in s), None)
    counted = next((s["projector_lora_params"] for s in table["stages"] if "projector_lora_params" in s), None)
    if made is not None and counted is not None and made != counted:
        report.add("rehearsal.lora", "fail", f"the rehearsed projector has {made:,} LoRA "
                   f"parameters but hello-ray storage counts {counted:,}")
    return table


def stage_schedules(cfg: Config, classes: int | None, profile_path: str | None
                    ) -> dict[str, tuple[dict[str, Any] | None, str]]:
    """Each active stage's own schedule block from a device profile (its plan's ``grid_hours``: the
    evaluate grid before and after the queue), and its text; the block is None unless the run is a
    GPU run whose class count is known."""
    from hello_ray import registry
    from hello_ray.preflight.schedule import default_profile, load_profile

    path = profile_path or default_profile()
    out: dict[str, tuple[dict[str, Any] | None, str]] = {}
    for stage in registry.active_stages(cfg):
        plan = registry.plan(stage)
        if not hasattr(plan, "grid_hours"):
            continue
        if not cfg.compute.use_gpu or not classes or path is None:
            out[stage.STAGE] = (None, "")
            continue
        block = plan.grid_hours(cfg, int(classes), load_profile(path))
        out[stage.STAGE] = (block, plan.format_schedule(block))
    return out


def stage_hours(cfg: Config, classes: int | None, train_images: int | None, profile_path: str | None,
                node_cpus: int | None) -> dict[str, Any] | None:
    """Per-stage GPU-hours on the node from a device profile (``schedule.stage_gpu_hours``), for a GPU
    run whose class count is known; the teachers' CPU decode rate from ``benchmarks/decode_rate.py``."""
    from hello_ray.preflight.schedule import default_decode_rate, default_profile, load_profile, stage_gpu_hours

    path = profile_path or default_profile()
    if not cfg.compute.use_gpu or not classes or path is None:
        return None
    rate_file = default_decode_rate()
    rate = json.loads(rate_file.read_text())["images_per_s"]["centre_square"] if rate_file else None
    return stage_gpu_hours(cfg, int(classes), int(train_images or 0), load_profile(path), rate, node_cpus,
                           tuple(_stages(cfg)))
