"""Stage 4 of METHOD.md: the image update of the selected images on the LoRA'd projector encoder.

Reads the selected image set (input role ``select``) and the adapter (role ``transfer``); writes a
new image set whose ``imageset.json`` meta names its parent (the select key), the transfer key, the
settings and the objective before/after.

The update: x' = up(down(x)) (bilinear, ``factor``), minimise MSE(E(x), E(x')) over the pixels of x
with Adam, clamping pixels to [0, 1] after each step. E is the projector's image encoder with the
LoRA merged (nothing trains the LoRA here, and merged is the fast path).

Reading chosen where METHOD.md is open (``refine.target``): x' is recomputed from the *current* x
at every step (as in LIC / the HeLlO code reading), and by default ("joint") the gradient flows
through both E(x) and E(x'): the objective is then a property of the image alone (how much its
encoding changes when its high frequencies are removed). "detached" treats E(x') as a fixed target
of each step, pulling only E(x) toward it.

This module is the Ray wrapper only; the compute (``refine_images`` / ``refine_objective``) is
:mod:`hello_ray.stages.refine_core`. ``run`` maps ``RefineBatch`` actors (each loads the adapter
once) over shards of the images with Ray Data.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch

from hello_ray import placement
from hello_ray.config import Config, ConfigError, section_dict
from hello_ray.stages.refine_core import refine_images, refine_objective

log = logging.getLogger("hello_ray.refine")

STAGE = "refine"
KIND = "actors"  # one Ray Data actor pool, sized by pool(cfg) (hello_ray/stages/__init__.py)
INPUTS = ("select", "transfer")  # the selected images, the adapter whose encoder they adapt to


# ---------------------------------------------------------------------------- Ray wrapper

def stage_config(cfg: Config) -> dict[str, Any]:
    """Everything that changes the refined pixels (actor count and the on/off switch do not)."""
    refine = section_dict(cfg.refine)
    for k in ("enabled", "num_actors", "actor_cpus"):
        refine.pop(k)
    return {"refine": refine}


def check(cfg: Config) -> None:
    """Rules decidable from the config alone: the low-pass keeps at least one pixel."""
    if cfg.refine.enabled and cfg.refine.factor >= cfg.data.image_size:
        raise ConfigError(f"config key 'refine.factor': {cfg.refine.factor} must be smaller than "
                          f"data.image_size ({cfg.data.image_size}); x' = up(down(x)) would be one flat colour")


def pool(cfg: Config) -> tuple[int, float]:
    """The actor pool: (actors, CPUs each). Its bundles, start-up and cores are priced from it."""
    return cfg.refine.num_actors, cfg.refine.actor_cpus


def pool_reads_data(cfg: Config) -> bool:
    """No read task beside the actor pool: the images come from the driver's memory."""
    return False


def resources(cfg: Config) -> dict[str, float]:
    """What the stage holds at once: its actors, one GPU each where used (the images come from
    the driver's memory, so no read task competes for a CPU)."""
    rc = cfg.refine
    return {"CPU": rc.num_actors * rc.actor_cpus,
            "GPU": float(rc.num_actors) if cfg.compute.use_gpu else 0.0}


class RefineBatch:
    """Ray Data actor: loads the adapter (merged) once, refines each batch of images it is given.

    batch {"row": int64 [N], "image": uint8 [N,H,W,3]} -> same columns with refined images, plus
    per-image "objective_before" (input) and "objective_after" (the stored uint8 result).
    """

    def __init__(self, store, transfer_key: str, steps: int, lr: float, factor: int, target: str,
                 use_gpu: bool) -> None:
        from hello_ray.models.projector import load_adapter
        from hello_ray.runtime import quiet_library_logs, torch_device

        quiet_library_logs(worker=True)
        placement.record("RefineBatch")  # the node it runs on: the manifest's summary["nodes"]

        self.device = torch_device(use_gpu)
        self.projector = load_adapter(store.download(transfer_key), merge=True).to(self.device).eval()
        self.projector.requires_grad_(False)
        self.steps, self.lr, self.factor, self.target = steps, lr, factor, target

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from hello_ray.data.augment import to_float, to_uint8

        x = to_float(torch.from_numpy(np.ascontiguousarray(batch["image"]))).to(self.device)  # [N,3,H,W]
        encode = self.projector.encode
        with torch.no_grad():
            before = refine_objective(encode, x, self.factor, self.target)  # [N]
        refined, _ = refine_images(encode, x, self.steps, self.lr, self.factor, self.target)
        stored = to_uint8(refined).cpu().numpy()  # [N,H,W,3], what the image set stores
        with torch.no_grad():
            after = refine_objective(encode, to_float(torch.from_numpy(stored)).to(self.device),
                                     self.factor, self.target)
        return {"row": batch["row"], "image": stored, "objective_before": before.cpu().numpy(),
                "objective_after": after.cpu().numpy()}


def run(cfg: Config, store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
    """Refine the selected images on Ray Data actors; write the new image set under ``key``."""
    import ray

    from hello_ray.data.imageset import load_image_set, write_image_set

    rc = cfg.refine
    parent = load_image_set(store, inputs["select"])
    images = np.asarray(parent.images)  # uint8 [N,H,W,3]
    n = len(images)
    if n == 0:
        raise ValueError(f"refine {key}: the image set {inputs['select']} has no images")
    t0 = time.perf_counter()
    ds = ray.data.from_items([{"row": i, "image": images[i]} for i in range(n)],
                             override_num_blocks=math.ceil(n / rc.batch_size))
    out = ds.map_batches(
        RefineBatch,
        fn_constructor_kwargs={"store": store, "transfer_key": inputs["transfer"], "steps": rc.steps,
                               "lr": rc.lr, "factor": rc.factor, "target": rc.target,
                               "use_gpu": cfg.compute.use_gpu},
        compute=ray.data.ActorPoolStrategy(size=rc.num_actors),
        num_cpus=rc.actor_cpus, num_gpus=1 if cfg.compute.use_gpu else 0,
        batch_size=rc.batch_size, batch_format="numpy")
    refined = np.empty_like(images)
    before = np.empty(n, dtype=np.float64)
    after = np.empty(n, dtype=np.float64)
    seen = np.zeros(n, dtype=bool)
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        rows = batch["row"].astype(np.int64)  # actors finish out of order: put rows back in place
        refined[rows], before[rows], after[rows] = batch["image"], batch["objective_before"], \
            batch["objective_after"]
        seen[rows] = True
    if not seen.all():
        raise RuntimeError(f"refine {key}: {int((~seen).sum())} of {n} images came back unrefined")
    summary = {"images": n, "objective_before": float(before.mean()), "objective_after": float(after.mean()),
               "refine_s": round(time.perf_counter() - t0, 2)}
    meta = {**dict(parent.meta), "parent": inputs["select"], "transfer": inputs["transfer"],
            "refine": {**stage_config(cfg)["refine"], **summary}}
    write_image_set(store, key, refined, np.asarray(parent.labels), list(parent.class_names),
                    parent.index, meta)
    log.info("[refine] %d images: objective %.4g -> %.4g in %.1f s", n, summary["objective_before"],
             summary["objective_after"], summary["refine_s"])
    return summary
