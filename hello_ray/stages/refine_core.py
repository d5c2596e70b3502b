"""Image update compute (METHOD.md stage 4), plain PyTorch: no Ray in this file.

x' = up(down(x)) (bilinear, ``factor``); minimise MSE(E(x), E(x')) over the pixels of x with Adam,
clamping to [0, 1] after each step. ``refine_target`` (joint | detached) is explained in the
wrapper's docstring (:mod:`hello_ray.stages.refine`), which also says where METHOD.md is open.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from hello_ray.failures import check_finite

Encoder = Callable[[torch.Tensor], torch.Tensor]  # images [N,3,H,W] in [0,1] -> features [N, D]


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

    history[0] is the objective of the input, history[i] after i steps (length steps + 1); a
    non-finite objective raises :class:`hello_ray.failures.NonFiniteLoss` naming the step.
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
        check_finite(history[-1], "refine", None, len(history), f"refine.lr={lr:g}")
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
