"""How preflight rehearses and prices stage ``select`` (see ``teachers_plan`` for the four names).

- rehearse: ``select_core.make_crops`` + ``score_crops`` in the driver on the rehearsed teacher, one
  batch of crops; one stitched image PNG-encoded (its size prices every distilled image's PNG);
- work: classes x min(mipc, images per class) x num_crop crops scored (observer forward at full size);
- gpu_hours: the observer's crops/s on each actor's GPU, unchanged by the GPU work.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hello_ray.config import Config
from hello_ray.measure import CostBasis, Sample, StageRehearsal, count_flops, gpu_hours_row, timed_steps

PROFILE_SECTIONS = ("select_score",)


def rehearse(r: Any, sample: Sample) -> StageRehearsal:
    from hello_ray.data.images import decode_image, encode_png
    from hello_ray.stages.select_core import cap_side, make_crops, score_crops, stitch

    sel = r.cfg.select
    observer = r.teacher.eval()
    crop = r.S // sel.factor
    probe = torch.zeros(1, crop, crop, 3, dtype=torch.uint8)
    flops = count_flops(lambda: score_crops(observer, probe, torch.zeros(1, dtype=torch.long), r.S,
                                            sel.show, device=r.device))
    n = max(1, r.batch(sel.batch_size, flops) // sel.num_crop)  # images whose crops fill a batch
    k = len(sample.raw)
    imgs = [cap_side(np.array(decode_image(sample.raw[i % k], sample.ids[i % k])), sel.max_side)
            for i in range(n)]  # a writable copy: make_crops turns it into a tensor
    ids = [f"{sample.ids[i % len(sample.ids)]}#{i}" for i in range(n)]
    _, crops = make_crops(imgs, ids, sel.num_crop, crop, sel.seed)             # [n, K, c, c, 3]
    crops = crops.flatten(0, 1)                                                # [n*K, c, c, 3]
    labels = torch.zeros(len(crops), dtype=torch.long)
    step_s, cpu_s = timed_steps(lambda _: score_crops(observer, crops, labels, r.S, sel.show,
                                                      batch_size=len(crops), device=r.device),
                                r.steps, r.device)
    patches = crops[:1].expand(sel.factor ** 2, -1, -1, -1).contiguous()      # one image's tiles
    r.cpu_step_s = cpu_s
    png = encode_png(stitch(patches, sel.factor, sel.tile_order)[0].numpy())
    # distilled_png_bytes: what the cost model prices every distilled image's PNG at.
    return StageRehearsal("select", "stages/select_core.make_crops + score_crops in the driver",
                          "crop scored", len(crops), r.steps, step_s, flops, 0, "",
                          extra={"png_bytes_per_image": len(png), "distilled_png_bytes": len(png), "crop_size": crop})


def _crops(cfg: Config, classes: int, train_images: int) -> tuple[int, int]:
    """(images read per class, crops scored in all)."""
    sel = cfg.select
    per_class = min(sel.mipc, train_images // max(classes, 1)) if train_images else sel.mipc
    return per_class, classes * per_class * sel.num_crop


def work(b: CostBasis, s: StageRehearsal) -> dict[str, Any]:
    sel = b.cfg.select
    per_class, crops = _crops(b.cfg, b.classes, b.train_images)
    return {"work": f"{b.classes:,} classes x {per_class} images x {sel.num_crop} crops", "items": crops,
            "flops": crops * s.flops_per_item, "seconds_here": crops * b.item_s(s),
            "bytes": b.images * b.png_bytes, "bytes_what": f"{b.images:,} PNGs", "units": sel.num_actors}


def gpu_hours(cfg: Config, classes: int, train_images: int, profile: dict[str, Any],
              decode_per_cpu: float | None, cpus: int | None) -> dict[str, Any] | None:
    st = profile.get("stages", {})
    if "select_score" not in st:
        return None
    t = _crops(cfg, classes, train_images)[1] / float(st["select_score"]["fp32"]["crops_per_s"]) / cfg.select.num_actors
    return gpu_hours_row(cfg.compute.num_workers, t, t, f"{cfg.select.num_actors} scoring actors")
