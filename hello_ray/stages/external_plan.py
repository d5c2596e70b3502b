"""How preflight checks, rehearses and prices stage ``external`` (see ``teachers_plan`` for the names).

- check: the set's folders listed and mapped onto the training classes, as ``Run.start`` does
  (``external.check_sources``: no image read; a mismatch names both orders);
- rehearse: a few of the set's own images read, decoded and PNG-encoded as the stage's read threads do;
- work: every external image read, decoded and written (wall clock: the driver's read threads).
"""
from __future__ import annotations

from typing import Any

from hello_ray.config import Config, ConfigError
from hello_ray.measure import Clock, CostBasis, Sample, StageRehearsal


def check(cfg: Config, store: Any, report: Any, probe_network: bool = True) -> None:
    from hello_ray.data.errors import DataError
    from hello_ray.stages import external

    if store is None:
        return
    try:
        plan = external.check_sources(cfg, store)
    except (ConfigError, DataError, OSError) as e:
        report.add("images.external", "fail", str(e))
        return
    report.facts["external_images"] = plan.listing.num_images
    report.add("images.external", "ok", f"{plan.layout} layout, {len(plan.listing.folders)} folders, "
               f"{plan.listing.num_images} images, each folder mapped to a training class")


def rehearse(r: Any, sample: Sample) -> StageRehearsal:
    from hello_ray.data.images import encode_png
    from hello_ray.data.sources import _fs_for, read_all
    from hello_ray.stages import external
    from hello_ray.stages.external_core import decode_external

    plan = external.check_sources(r.cfg, r.store)
    fs, _ = _fs_for(r.cfg.images.path, r.store)
    files = [(p, f"{plan.listing.root}/{rel}") for ps, rs in zip(plan.listing.files, plan.listing.rel)
             for p, rel in zip(ps, rs)][:max(1, r.steps)]
    png = 0
    with Clock() as c:
        for path, where in files:
            img, _ = decode_external(read_all(fs, path), where, r.S, r.cfg.images.resize)
            png += len(encode_png(img))
    n = len(files)
    r.cpu_step_s = c.cpu / n
    return StageRehearsal("external", "stages/external_core.decode_external in the driver (read, decode, "
                          "PNG), as the stage's read threads do", "external image", 1, n, c.wall / n,
                          0.0, 0, "", extra={"images": plan.listing.num_images,
                                             "png_bytes_per_image": png / n})


def work(b: CostBasis, s: StageRehearsal) -> dict[str, Any]:
    n = int(s.extra["images"])
    return {"work": f"{n:,} external images read, decoded, written", "items": n, "flops": 0.0,
            "seconds_here": n * s.item_s, "bytes": int(n * s.extra["png_bytes_per_image"]),
            "bytes_what": f"{n:,} PNGs", "units": 1}
