"""How preflight rehearses and prices stage ``recover`` (see ``teachers_plan`` for the four names).

- rehearse: ``recover_core.recover_unit`` in the driver (sre2l targets) on the rehearsed teacher;
- work: classes x ipc images x iterations, each image then a PNG;
- gpu_hours: the profile's iteration at its batch (``recover.classes_per_step`` classes of ipc
  images per step); before, one class per step: not measured on a GPU (None).
"""
from __future__ import annotations

from typing import Any

import torch

from hello_ray.config import Config
from hello_ray.measure import Clock, CostBasis, Sample, StageRehearsal, count_flops, gpu_hours_row

PROFILE_SECTIONS = ("recover_step",)


def rehearse(r: Any, sample: Sample) -> StageRehearsal:
    from hello_ray.stages.recover_core import RecoverSettings, recover_unit, running_moments

    rc = r.cfg.recover
    observer = r.teacher.eval()
    for p in observer.parameters():
        p.requires_grad_(False)
    targets = running_moments(observer)

    def run(iterations: int, n: int) -> Any:
        s = RecoverSettings(iterations, rc.lr, rc.r_bn, rc.first_bn_multiplier, rc.jitter)
        labels = torch.arange(n) % r.C
        return recover_unit(observer, labels, targets, s, rc.seed, r.S, r.device, "preflight")

    flops = count_flops(lambda: run(1, 1))
    b = r.batch(min(rc.batch_size, r.cfg.select.ipc) if r.cfg.images.source == "lpld" else rc.batch_size, flops)
    with Clock() as c:
        run(r.steps + 1, b)
    step_s, r.cpu_step_s = c.wall / (r.steps + 1), c.cpu / (r.steps + 1)
    return StageRehearsal("recover", "stages/recover_core.recover_unit in the driver (sre2l targets)",
                          "image x iteration", b, r.steps + 1, step_s, flops, 0, "",
                          notes=["step time includes the warm-up iteration"])


def work(b: CostBasis, s: StageRehearsal) -> dict[str, Any]:
    return b.image_steps(s, b.cfg.recover.iterations, "iterations", b.cfg.recover.num_actors)


def gpu_hours(cfg: Config, classes: int, train_images: int, profile: dict[str, Any],
              decode_per_cpu: float | None, cpus: int | None) -> dict[str, Any] | None:
    st, rc = profile.get("stages", {}), cfg.recover
    if "recover_step" not in st:
        return None
    step = st["recover_step"]
    per_image_iter = float(step["iteration_ms"]) / 1e3 / int(step["batch"])
    t = classes * cfg.select.ipc * rc.iterations * per_image_iter / rc.num_actors
    return gpu_hours_row(cfg.compute.num_workers, None, t, f"1 -> {rc.classes_per_step} classes per step "
                                                           f"({rc.classes_per_step * cfg.select.ipc} images)")
