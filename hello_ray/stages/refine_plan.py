"""How preflight rehearses and prices stage ``refine`` (see ``teachers_plan`` for the four names).

- rehearse: ``refine_core.refine_images`` on the rehearsed projector, merged, in the driver;
- work: classes x ipc images x steps, each image then a PNG;
- gpu_hours: the profile's image-steps/s per actor; before one actor (the old preset), after
  ``refine.num_actors``.
"""
from __future__ import annotations

import copy
from typing import Any

from hello_ray.config import Config
from hello_ray.measure import Clock, CostBasis, Sample, StageRehearsal, count_flops, gpu_hours_row

PROFILE_SECTIONS = ("refine_step",)


def rehearse(r: Any, sample: Sample) -> StageRehearsal:
    from hello_ray.data.augment import to_float
    from hello_ray.stages.refine_core import refine_images, refine_objective

    rf = r.cfg.refine
    proj = copy.deepcopy(r.projector).merge_lora(unload=True).eval()
    probe = to_float(sample.cycle(1)[0]).to(r.device)

    def one() -> None:
        x1 = probe.clone().requires_grad_(True)
        refine_objective(proj.encode, x1, rf.factor, rf.target).mean().backward()

    flops = count_flops(one)
    b = r.batch(rf.batch_size, flops)
    x = to_float(sample.cycle(b)[0]).to(r.device)
    with Clock() as c:
        _, history = refine_images(proj.encode, x, r.steps + 1, rf.lr, rf.factor, rf.target)
    step_s, r.cpu_step_s = c.wall / (r.steps + 1), c.cpu / (r.steps + 1)
    return StageRehearsal("refine", "stages/refine_core.refine_images on the merged projector in the driver",
                          "image x step", b, r.steps + 1, step_s, flops, 0, "",
                          notes=["step time includes the warm-up step"],
                          extra={"objective_first": history[0]})


def work(b: CostBasis, s: StageRehearsal) -> dict[str, Any]:
    return b.image_steps(s, b.cfg.refine.steps, "steps", b.cfg.refine.num_actors)


def gpu_hours(cfg: Config, classes: int, train_images: int, profile: dict[str, Any],
              decode_per_cpu: float | None, cpus: int | None) -> dict[str, Any] | None:
    st, rf = profile.get("stages", {}), cfg.refine
    if "refine_step" not in st:
        return None
    t = classes * cfg.select.ipc * rf.steps / float(st["refine_step"]["images_x_steps_per_s"])
    return gpu_hours_row(cfg.compute.num_workers, t, t / rf.num_actors, f"1 -> {rf.num_actors} actors")
