"""How preflight rehearses and prices stage ``teachers`` (``hello_ray/preflight/`` runs every stage's
plan through the same four names: ``check``, ``rehearse``, ``work``, ``gpu_hours``).

- rehearse: ``teachers_core.train_epoch`` in the driver at the run's per-worker batch, then the
  epoch file put through the store and read back;
- work: train images x epochs training views, plus val images x epochs forward passes; one
  checkpoint per epoch written (and its store round trip timed);
- gpu_hours: DDP over the GPUs at the profile's step; before, the training images were decoded by
  CPU tasks (``decode_per_cpu`` images/s each on ``cpus`` CPUs) and the GPUs waited for them; after,
  the workers decode on their GPUs (nvJPEG's own time is not in the profile).
"""
from __future__ import annotations

import posixpath
import time
from pathlib import Path
from typing import Any

import torch

from hello_ray.config import Config
from hello_ray.measure import Clock, CostBasis, Sample, StageRehearsal, count_flops, gpu_hours_row, timed_steps

PROFILE_SECTIONS = ("teachers_step",)


def check(cfg: Config, store: Any, report: Any, probe_network: bool = True) -> None:
    """``teachers.observer=torchvision``: whether the ImageNet ResNet-18 weights are cached here."""
    if cfg.teachers.observer != "torchvision":
        return
    import torch.hub
    from torchvision.models import ResNet18_Weights

    url = ResNet18_Weights.IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / posixpath.basename(url)
    report.add("weights.observer", "ok" if path.is_file() else "warn",
               f"torchvision ResNet-18 observer: {'cached at ' + str(path) if path.is_file() else 'downloaded from ' + url}")


def rehearse(r: Any, sample: Sample) -> StageRehearsal:
    from hello_ray.models.zoo import build_model
    from hello_ray.stages.teachers_core import make_optimizer, state_bytes, train_augment, train_epoch

    tc = r.cfg.teachers
    model = build_model(tc.model, r.C, r.S).to(r.device)
    opt, _ = make_optimizer(model, tc)
    x1, y1 = sample.cycle(1)
    train_flops = count_flops(lambda: train_epoch(model, [{"image": x1, "label": y1}], opt, r.device))
    B = r.batch(tc.batch_size // r.cfg.compute.num_workers, train_flops)
    x, y = sample.cycle(B)

    def step(_: int) -> None:
        train_epoch(model, [{"image": x, "label": y}], opt, r.device, augment=lambda im: train_augment(im, r.S))

    step_s, cpu_s = timed_steps(step, r.steps, r.device)
    model.eval()
    with torch.inference_mode():
        fwd_flops = count_flops(lambda: model(x1.permute(0, 3, 1, 2).float().div(255).to(r.device)))
        with Clock() as c:
            for _ in range(r.steps):
                model(x.permute(0, 3, 1, 2).float().div(255).to(r.device))
        fwd_item_s, fwd_cpu_item_s = c.wall / (r.steps * B), c.cpu / (r.steps * B)
    # The epoch file through the store, as the run writes and later reads it.
    blob = state_bytes(model)
    t0 = time.perf_counter()
    r.store.put_bytes(r.scratch, "epochs/epoch_001.pt", blob)
    back = r.store.get_bytes(r.scratch, "epochs/epoch_001.pt")
    store_s = time.perf_counter() - t0
    if back != blob:
        raise RuntimeError(f"preflight: the teacher checkpoint read back from {r.store.uri} differs")
    r.teacher, r.cpu_step_s = model, cpu_s
    return StageRehearsal("teachers", "stages/teachers_core.train_epoch in the driver; checkpoint put/get "
                          "through the store", "train image x epoch", B, r.steps, step_s,
                          train_flops, 0, "",
                          extra={"checkpoint_bytes": len(blob), "checkpoint_store_s": store_s,
                                 "forward_flops_per_item": fwd_flops, "forward_item_s": fwd_item_s,
                                 "forward_cpu_item_s": fwd_cpu_item_s,
                                 "params": sum(p.numel() for p in model.parameters())})


def work(b: CostBasis, t: StageRehearsal) -> dict[str, Any]:
    train, val, ep = b.train_images, b.val_images, b.cfg.teachers.epochs
    fwd_s = b.per_item(t.extra["forward_cpu_item_s"], t.extra["forward_item_s"])
    return {"work": f"{train:,} train x {ep} epochs + {val:,} val x {ep}", "items": train * ep,
            "flops": train * ep * t.flops_per_item + val * ep * t.extra["forward_flops_per_item"],
            "seconds_here": train * ep * b.item_s(t) + val * ep * fwd_s + ep * t.extra.get("checkpoint_store_s", 0.0),
            "bytes": ep * t.extra["checkpoint_bytes"], "bytes_what": f"{ep} checkpoints",
            "units": b.cfg.compute.num_workers}


def gpu_hours(cfg: Config, classes: int, train_images: int, profile: dict[str, Any],
              decode_per_cpu: float | None, cpus: int | None) -> dict[str, Any] | None:
    st, gpus = profile.get("stages", {}), cfg.compute.num_workers
    if "teachers_step" not in st or not train_images:
        return None
    views = train_images * cfg.teachers.epochs
    gpu_s = views / float(st["teachers_step"]["images_per_s"]) / gpus
    feed_s = views / (decode_per_cpu * cpus) if decode_per_cpu and cpus else None
    return gpu_hours_row(gpus, None if feed_s is None else max(gpu_s, feed_s), gpu_s,
                         f"decode: {cpus} CPUs at {decode_per_cpu or 0:.0f} images/s each -> on the GPUs")
