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

Compute: ``refine_images`` / ``refine_objective`` (plain PyTorch). Orchestration: ``run`` maps
``RefineBatch`` actors (each loads the adapter once) over shards of the images with Ray Data.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from hello_ray.config import Config, section_dict

log = logging.getLogger("hello_ray")

STAGE = "refine"
Encoder = Callable[[torch.Tensor], torch.Tensor]  # images [N,3,H,W] in [0,1] -> features [N, D]


# ---------------------------------------------------------------------------- compute

def low_pass(x: torch.Tensor, factor: int) -> torch.Tensor:
    """x' = up(down(x)): bilinear down by ``factor`` and back to the same size. [N,3,H,W] -> same."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, h // factor), max(1, w // factor)), mode="bilinear",
                          align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def refine_objective(encoder: Encoder, x: torch.Tensor, factor: int, target: str = "joint") -> torch.Tensor:
    """Per-image MSE(E(x), E(up(down(x)))) [N]; its mean is the objective refine minimises."""
    f = encoder(x).float()  # [N, D]
    if target == "detached":
        with torch.no_grad():
            f_low = encoder(low_pass(x, factor)).float()  # [N, D], a constant of this step
    else:
        f_low = encoder(low_pass(x, factor)).float()  # [N, D]
    return (f - f_low).pow(2).flatten(1).mean(1)


def refine_images(encoder: Encoder, images: torch.Tensor, steps: int, lr: float, factor: int,
                  target: str = "joint") -> tuple[torch.Tensor, list[float]]:
    """Adam on the pixels of images [N,3,H,W] in [0,1]; returns (refined images, objective history).

    history[0] is the objective of the input, history[i] after i steps (length steps + 1).
    The encoder is used as given: freeze its parameters (requires_grad off) beforehand so no
    gradient is spent on them.
    """
    if target not in ("joint", "detached"):
        raise ValueError(f"refine target {target!r}: must be 'joint' or 'detached'")
    x = images.detach().clone().clamp_(0, 1).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    history: list[float] = []
    scale = None
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = refine_objective(encoder, x, factor, target).mean()
        history.append(float(loss.detach()))
        # Adam's eps (1e-8) swamps gradients when the objective is tiny (a random-init CLIP
        # gives ~1e-9): dividing by the first value keeps the minimiser and makes the steps
        # independent of the encoder's feature scale.
        if scale is None:
            scale = 1.0 / max(float(loss.detach()), 1e-30)
        (loss * scale).backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)  # keep a valid image after every step, not only at the end
    with torch.no_grad():
        history.append(float(refine_objective(encoder, x, factor, target).mean()))
    return x.detach(), history


# ---------------------------------------------------------------------------- Ray wrapper

def stage_config(cfg: Config) -> dict[str, Any]:
    """Everything that changes the refined pixels (actor count and the on/off switch do not)."""
    refine = section_dict(cfg.refine)
    for k in ("enabled", "num_actors", "actor_cpus"):
        refine.pop(k)
    return {"refine": refine}


class RefineBatch:
    """Ray Data actor: loads the adapter (merged) once, refines each batch of images it is given.

    batch {"row": int64 [N], "image": uint8 [N,H,W,3]} -> same columns with refined images, plus
    per-image "objective_before" (input) and "objective_after" (the stored uint8 result).
    """

    def __init__(self, store, transfer_key: str, steps: int, lr: float, factor: int, target: str,
                 use_gpu: bool) -> None:
        from hello_ray.models.projector import load_adapter
        from hello_ray.runtime import torch_device

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
    from hello_ray.runtime import ensure_ray

    for role in ("select", "transfer"):
        if role not in inputs:
            raise KeyError(f"refine {key}: needs the input role {role!r} (got {sorted(inputs)})")
    rc = cfg.refine
    ensure_ray(cfg.compute)
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
