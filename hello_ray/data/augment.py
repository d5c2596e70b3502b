"""Batched augmentations on float [0, 1] NCHW tensors, replayable exactly.

Every random draw comes from an explicit ``torch.Generator`` and every op returns what it
drew (crop boxes, flips, CutMix partner/lambda/box), so the ``stored`` label strategy can
record them once and ``apply_crop_flip`` / ``apply_cutmix`` reproduce the same pixels later.

Boxes are integer pixel boxes ``(x0, y0, x1, y1)`` (x1, y1 exclusive) in the input image.
A crop is resized with ``torchvision.ops.roi_align`` (bilinear, pixel-centre aligned, with
adaptive sub-sampling so shrinking a large crop averages rather than aliases): one kernel
for the whole batch on CPU or GPU.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def to_float(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [0, 1]."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"to_float wants uint8 [N, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [N, 3, H, W] in [0, 1] -> uint8 [N, H, W, 3] (rounded, clamped)."""
    return x.detach().clamp(0, 1).mul(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device, dtype=torch.float64) * (hi - lo) + lo


def sample_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float] = (0.08, 1.0),
                      ratio: tuple[float, float] = (3 / 4, 4 / 3),
                      generator: torch.Generator | None = None, attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes (torchvision's rule, vectorised): int64 [n, 4] (x0, y0, x1, y1).

    Per sample: up to ``attempts`` draws of area fraction ~ U(scale) and log-aspect ~
    U(log ratio); the first that fits wins, else a centre crop with the ratio clamped.
    """
    dev = generator.device if generator is not None else torch.device("cpu")
    area = height * width
    target = _uniform(n * attempts, scale[0], scale[1], generator, dev) * area
    log_r = _uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), generator, dev)
    aspect = torch.exp(log_r)
    w = torch.sqrt(target * aspect).round().long().view(n, attempts)  # [n, attempts]
    h = torch.sqrt(target / aspect).round().long().view(n, attempts)
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    # Offsets drawn for every attempt keep the number of draws fixed (replayable).
    u_y = torch.rand(n, attempts, generator=generator, device=dev, dtype=torch.float64)
    u_x = torch.rand(n, attempts, generator=generator, device=dev, dtype=torch.float64)
    y0 = (u_y * (height - h + 1).clamp(min=1)).floor().long()
    x0 = (u_x * (width - w + 1).clamp(min=1)).floor().long()
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1, device=dev))
    # Fallback: torchvision's centre crop with the aspect ratio clamped into ``ratio``.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = height, int(round(height * ratio[1]))
    else:
        fw, fh = width, height
    fb = torch.tensor([(width - fw) // 2, (height - fh) // 2], device=dev)
    pick = first.clamp(min=0)[:, None]
    x0s, y0s = x0.gather(1, pick)[:, 0], y0.gather(1, pick)[:, 0]
    ws, hs = w.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0]
    ok = first >= 0
    x0s = torch.where(ok, x0s, fb[0])
    y0s = torch.where(ok, y0s, fb[1])
    ws = torch.where(ok, ws, torch.full_like(ws, fw))
    hs = torch.where(ok, hs, torch.full_like(hs, fh))
    return torch.stack([x0s, y0s, x0s + ws, y0s + hs], dim=1).cpu()


def apply_crop_flip(x: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                    size: int) -> torch.Tensor:
    """Cut ``boxes`` [N, 4] out of ``x`` [N, C, H, W], resize to ``size``, mirror where ``flips``.

    Returns [N, C, size, size]. Deterministic: the same inputs give the same pixels.
    """
    # Imported here, not at the top: torchvision.ops pulls in torch._dynamo (~1.4 s), which a driver
    # that only plans and reports (a re-run of a finished demo takes seconds) never needs.
    from torchvision.ops import roi_align

    n = x.shape[0]
    rois = torch.cat([torch.arange(n, dtype=x.dtype, device=x.device)[:, None],
                      boxes.to(device=x.device, dtype=x.dtype)], dim=1)  # [N, 5] (idx, x0, y0, x1, y1)
    out = roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1,
                    aligned=True)  # [N, C, size, size]
    flips = flips.to(device=x.device, dtype=torch.bool)
    return torch.where(flips[:, None, None, None], out.flip(-1), out)


def random_resized_crop_flip(x: torch.Tensor, size: int, scale: tuple[float, float] = (0.08, 1.0),
                             generator: torch.Generator | None = None,
                             ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop + horizontal flip (p=0.5) per sample.

    x: [N, C, H, W] -> (x' [N, C, size, size], boxes int64 [N, 4], flips bool [N]).
    """
    n, _, h, w = x.shape
    boxes = sample_crop_boxes(n, h, w, scale, ratio, generator)
    dev = generator.device if generator is not None else torch.device("cpu")
    flips = (torch.rand(n, generator=generator, device=dev) < 0.5).cpu() if flip else \
        torch.zeros(n, dtype=torch.bool)
    return apply_crop_flip(x, boxes, flips, size), boxes, flips


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Horizontal flip (p=0.5) per sample of x [N, C, H, W] (the crop was cut elsewhere)."""
    dev = generator.device if generator is not None else torch.device("cpu")
    flips = (torch.rand(x.shape[0], generator=generator, device=dev) < 0.5).to(x.device)
    return torch.where(flips[:, None, None, None], x.flip(-1), x)


def draw_beta(alpha: float, generator: torch.Generator | None) -> float:
    """Beta(alpha, alpha) drawn through the torch generator (torch's Beta takes none)."""
    dev = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=dev).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def cutmix_box(height: int, width: int, lam: float,
               generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """The CutMix box (x0, y0, x1, y1) for mixing weight ``lam``: side ratio sqrt(1 - lam),
    centre uniform over the image, clipped to it (the reference CutMix rule)."""
    dev = generator.device if generator is not None else torch.device("cpu")
    cut = math.sqrt(1.0 - lam)
    cw, ch = int(width * cut), int(height * cut)
    cx = int(torch.randint(0, width, (1,), generator=generator, device=dev).item())
    cy = int(torch.randint(0, height, (1,), generator=generator, device=dev).item())
    return (max(cx - cw // 2, 0), max(cy - ch // 2, 0),
            min(cx + cw // 2, width), min(cy + ch // 2, height))


def apply_cutmix(x: torch.Tensor, perm: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Paste ``x[perm]`` into ``box`` of ``x``: [N, C, H, W] -> [N, C, H, W] (a new tensor)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[:, :, y0:y1, x0:x1][perm.to(x.device)]  # gather the box only
    return out


def cutmix(x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor,
                      tuple[int, int, int, int]]:
    """Batch CutMix: lam ~ Beta(alpha, alpha), partner = a random permutation, one box.

    Returns (x' [N, C, H, W], y_a = y, y_b = y[perm], lam (area-corrected: the fraction of
    pixels that still come from x), perm int64 [N], box). alpha <= 0 disables it (lam = 1,
    identity perm, empty box).
    """
    n, _, h, w = x.shape
    if alpha <= 0:
        perm = torch.arange(n)
        return x, y, y, 1.0, perm, (0, 0, 0, 0)
    lam = draw_beta(alpha, generator)
    dev = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(n, generator=generator, device=dev).cpu()
    box = cutmix_box(h, w, lam, generator)
    lam = 1.0 - (box[2] - box[0]) * (box[3] - box[1]) / float(h * w)
    return apply_cutmix(x, perm, box), y, y[perm.to(y.device)], lam, perm, box


def train_crop_scale(image_size: int) -> tuple[float, float]:
    """Area range of the train-time RandomResizedCrop shared by the teacher and transfer stages.

    ImageNet-size images (> 64 px) use the standard (0.08, 1). Small images use (0.35, 1):
    an 8 % crop of a 32 px digit (itself upsampled from 8x8) keeps about 9x9 px, one or two
    source pixels of stroke, which teaches noise rather than the class. The projector is
    fitted on the same kind of views the teachers were trained on.
    """
    return (0.08, 1.0) if image_size > 64 else (0.35, 1.0)



def whole_crop(cfg) -> tuple[float, float] | None:
    """The area range a training stage's decode cuts each whole image's crop with
    (``data.train_crop=whole``), or None where the worker crops the centred square."""
    return train_crop_scale(cfg.data.image_size) if cfg.data.train_crop == "whole" else None
