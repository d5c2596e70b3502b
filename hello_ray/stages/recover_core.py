"""SRe2L recover and LPLD's class-wise recover, the plain-PyTorch core (no Ray in this file).

References (read, not copied): VILA-Lab/SRe2L @ 8d00cba ``SRe2L/recover/data_synthesis.py``,
``SRe2L/recover/utils.py``, ``SRe2L/recover/recover.sh``; he-y/soft-label-pruning-for-dataset-distillation
(LPLD) @ 63eee18 ``recover/data_synthesis_class.py``, ``recover/utils_recover.py``,
``recover/models/resnet_class.py``, ``recover/scripts/imagenet1k_recover.sh``.

*The images* start as Gaussian noise in the observer's normalised input space and are optimised with
Adam (betas 0.5/0.9, eps 1e-8) at a per-iteration cosine rate ``0.5 (1 + cos(pi t / T)) lr`` against

    CE(observer(aug(x)), class) + r_bn * sum_l w_l (||mu_l - mu_ref_l||_2 + ||var_l - var_ref_l||_2)

where mu_l, var_l are the batch mean and biased variance over (N, H, W) of the input of the l-th
BatchNorm2d (in ``modules()`` order) and w = first_bn_multiplier for the first, 1 for the others.
The references (``ref``) are the observer's global running statistics for SRe2L and the statistics
of the batch's own class for LPLD, whose batches hold one class each. ``aug`` is one
RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3)) + a horizontal flip (p 0.5) drawn once for the
whole batch, then a circular roll by (randint(0, jitter), randint(0, jitter)). After every step the
pixels are clipped to the box that maps to [0, 1]; the image kept is the last iterate, as uint8.

Per-class statistics (:class:`ClassStats`): per class and BN layer the count, sum and sum of
squares in float64 of that layer's input over (images, H, W): exact, mergeable in any order.
LPLD instead keeps a BN-momentum running average per class during one forward epoch (docs/fidelity.md,
Fidelity): the exact class mean and variance are what that average estimates, order-free.

Every random draw of a batch comes from one CPU ``torch.Generator`` seeded from (seed, variant,
the batch's slots) (:func:`unit_seed`), so a batch gives the same images wherever it runs.

*Several batches per forward pass* (:func:`recover_step`, ``recover.classes_per_step``; not in
the references, which run one batch per pass): the batches' images are stacked into one forward
pass of the observer, which is frozen in eval mode, so every image's activations are what they
would be alone. Each batch keeps its own generator, crop, flip and roll (so the same draws as
alone), its own BN moments (over its own images only) against its own targets, and its own
CE mean; the objective summed over batches has, for each batch's pixels, the gradient that batch
would have alone, and Adam is elementwise, so one stacked parameter is the batches' parameters
side by side. Every crop is resized back to the image side, as one batch alone does, so the
packed batch keeps one fixed shape [G * n, 3, S, S]. The losses stay on the device and reach the
host every ``CHECK_EVERY`` iterations. With one batch per step the ops are exactly the one-batch
ones (the same pixels, bit for bit). With several, each iteration's objective and gradient equal
the one-batch ones up to float rounding (the convolutions and reductions run at another batch
size: ~2e-7 of the largest gradient, measured on a random-init ResNet-18). Over many iterations
that rounding mostly stays there (tests/test_recover.py: at most 2e-6 in [0, 1] after 40
iterations), but not always: Adam's step is about lr * g / (|g| + eps) per pixel, so a pixel
whose gradient is as small as its rounding (|g| ~ eps = 1e-8) moves by a visibly different
amount, and the trajectories part from there (a random-init ResNet-18 at 24 px, 10 iterations,
6 seeds: one class of 60 ended up to 0.2 apart, another 4e-3). Either result is the same
objective optimised from the same draws; what differs is float rounding alone.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hello_ray.data.augment import sample_crop_boxes, to_uint8

VARIANTS = ("sre2l", "lpld")
CROP_SCALE = (0.08, 1.0)    # torchvision RandomResizedCrop defaults, as both references use them
CROP_RATIO = (3 / 4, 4 / 3)
ADAM_BETAS = (0.5, 0.9)
ADAM_EPS = 1e-8
# Iterations between host syncs: the logged objective comes to the CPU and is checked for
# non-finite values once per window, not every iteration (a device keeps running meanwhile).
CHECK_EVERY = 50


from hello_ray.stages.recover_stats import (  # noqa: F401 (recover_core's names, as before)
    BNInputs, ClassStats, RecoverError, batch_moments, bn_layers, class_stats, observe_batch, running_moments)


# ---------------------------------------------------------------------------- work units

@dataclass(frozen=True)
class Unit:
    """One batch of images optimised together: its ``slots`` (class, k-th image of the class)."""
    index: int
    slots: tuple[tuple[int, int], ...]

    @property
    def classes(self) -> list[int]:
        return sorted({c for c, _ in self.slots})

    def image_indices(self, ipc: int) -> list[int]:
        """Global image indices (class * ipc + k): the image set's order, class-major."""
        return [c * ipc + k for c, k in self.slots]


def plan_units(variant: str, num_classes: int, ipc: int, batch_size: int) -> list[Unit]:
    """The batches of a recover run.

    lpld (LPLD ``data_synthesis_class.py``): each class alone, its ipc images in batches of at most
    ``batch_size`` (LPLD runs batch = ipc). sre2l (SRe2L ``data_synthesis.py``): for each k < ipc,
    the classes in batches of ``batch_size``, one image each (SRe2L: 100 classes per batch).
    """
    if variant not in VARIANTS:
        raise ValueError(f"recover variant {variant!r}: must be one of {', '.join(VARIANTS)}")
    if min(num_classes, ipc, batch_size) < 1:
        raise ValueError(f"plan_units: classes {num_classes}, ipc {ipc}, batch {batch_size} must be >= 1")
    slots: list[tuple[tuple[int, int], ...]] = []
    if variant == "lpld":
        for c in range(num_classes):
            for k0 in range(0, ipc, batch_size):
                slots.append(tuple((c, k) for k in range(k0, min(k0 + batch_size, ipc))))
    else:
        for k in range(ipc):
            for c0 in range(0, num_classes, batch_size):
                slots.append(tuple((c, k) for c in range(c0, min(c0 + batch_size, num_classes))))
    return [Unit(i, s) for i, s in enumerate(slots)]


def plan_steps(units: Sequence[Unit], units_per_step: int) -> list[list[Unit]]:
    """``units`` packed into steps of at most ``units_per_step`` (one forward pass each), in plan
    order among units of one size. Only units with the same number of images share a step: each
    one's BN moments are then reductions over one fixed view [units, images, F, H, W]."""
    if units_per_step < 1:
        raise ValueError(f"plan_steps: units_per_step {units_per_step} must be >= 1")
    by_size: dict[int, list[Unit]] = {}
    for u in units:
        by_size.setdefault(len(u.slots), []).append(u)
    return [same[i:i + units_per_step] for same in by_size.values() for i in range(0, len(same), units_per_step)]


def unit_seed(seed: int, variant: str, unit: Unit) -> int:
    """A 63-bit generator seed from (seed, variant, the unit's slots); stable across processes."""
    text = f"{seed}\x00{variant}\x00" + ",".join(f"{c}:{k}" for c, k in unit.slots)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------------------- the objective

def bn_term(inputs: Sequence[torch.Tensor], targets: Sequence[tuple[torch.Tensor, torch.Tensor]],
            first_bn_multiplier: float) -> torch.Tensor:
    """sum_l w_l (||mu_l - mu_ref_l||_2 + ||var_l - var_ref_l||_2), w = (first_bn_multiplier, 1, ...):
    plain (not squared) L2 norms, as both references' hooks."""
    if len(inputs) != len(targets):
        raise ValueError(f"bn_term: {len(inputs)} BN inputs but {len(targets)} targets")
    total = inputs[0].new_zeros(())
    for l, (x, (mu_ref, var_ref)) in enumerate(zip(inputs, targets)):
        mu, var = batch_moments(x)
        w = first_bn_multiplier if l == 0 else 1.0
        total = total + w * (torch.linalg.vector_norm(mu - mu_ref.to(mu)) +
                             torch.linalg.vector_norm(var - var_ref.to(var)))
    return total


def group_bn_term(inputs: Sequence[torch.Tensor], targets: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  groups: int, first_bn_multiplier: float) -> torch.Tensor:
    """:func:`bn_term` of each of ``groups`` equal groups of the batch, against its own targets: [G].

    ``inputs[l]`` [G * n, F_l, H_l, W_l] holds group g's n images at rows g*n .. (g+1)*n - 1;
    ``targets[l]`` is (mean [G, F_l], var [G, F_l]). Each group's moments reduce over its own
    (n, H, W) only: the whole batch's would mix the groups' classes. One group is exactly
    :func:`bn_term` (the same reduction ops as one batch alone).
    """
    if len(inputs) != len(targets):
        raise ValueError(f"group_bn_term: {len(inputs)} BN inputs but {len(targets)} targets")
    if groups == 1:
        return bn_term(inputs, [(m[0], v[0]) for m, v in targets], first_bn_multiplier).reshape(1)
    total = inputs[0].new_zeros(groups)
    for l, (x, (mu_ref, var_ref)) in enumerate(zip(inputs, targets)):
        xg = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])             # [G, n, F, H, W]
        mu, var = xg.mean((1, 3, 4)), xg.var((1, 3, 4), unbiased=False)       # [G, F] each
        w = first_bn_multiplier if l == 0 else 1.0
        total = total + w * (torch.linalg.vector_norm(mu - mu_ref.to(mu), dim=1) +
                             torch.linalg.vector_norm(var - var_ref.to(var), dim=1))
    return total                                                               # [G]


def input_normalisation(observer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [1, 3, 1, 1] the observer applies to its [0, 1] input: a zoo model's buffers
    (ImageNet's), else ImageNet's. Recover optimises z = (x - mean) / std, as the references do."""
    from hello_ray.models.zoo import IMAGENET_MEAN, IMAGENET_STD

    mean, std = getattr(observer, "mean", None), getattr(observer, "std", None)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor) and mean.numel() == std.numel() == 3:
        return mean.detach().float().cpu().view(1, 3, 1, 1), std.detach().float().cpu().view(1, 3, 1, 1)
    return torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def augment(z: torch.Tensor, generator: torch.Generator, jitter: int) -> torch.Tensor:
    """One RandomResizedCrop + flip for the whole batch, then a circular roll by
    (randint(0, jitter), randint(0, jitter)): z [N, 3, H, W] -> same shape, differentiable.

    The crop is resized bilinearly (torchvision's rule; a crop is never larger than the image, so
    its antialiasing has nothing to do).
    """
    n, _, h, w = z.shape
    x0, y0, x1, y1 = (int(v) for v in sample_crop_boxes(1, h, w, CROP_SCALE, CROP_RATIO, generator)[0])
    flip = bool(torch.rand(1, generator=generator) < 0.5)
    dy, dx = (int(v) for v in torch.randint(0, jitter + 1, (2,), generator=generator))
    out = z[:, :, y0:y1, x0:x1]
    if (y1 - y0, x1 - x0) != (h, w):
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
    if flip:
        out = out.flip(-1)
    return torch.roll(out, shifts=(dy, dx), dims=(2, 3)) if (dy or dx) else out


def augment_groups(z: torch.Tensor, generators: Sequence[torch.Generator], jitter: int) -> torch.Tensor:
    """:func:`augment` of each of ``len(generators)`` equal groups of z [G * n, 3, H, W], each
    group drawing its own crop, flip and roll from its own generator: the same pixels as each
    group augmented alone. Every crop is resized to (H, W), so the groups stack into one
    fixed-shape batch [G * n, 3, H, W] whatever their crops' sizes."""
    if len(generators) == 1:
        return augment(z, generators[0], jitter)
    n = z.shape[0] // len(generators)
    return torch.cat([augment(z[g * n:(g + 1) * n], gen, jitter) for g, gen in enumerate(generators)])


@dataclass
class RecoverSettings:
    """What decides a unit's images (besides the observer, its targets and the seed)."""
    iterations: int
    lr: float
    r_bn: float
    first_bn_multiplier: float
    jitter: int


@dataclass
class RecoverResult:
    images: torch.Tensor                                  # uint8 [N, H, W, 3], the last iterate
    objective: list[float] = field(default_factory=list)  # per iteration: CE + r_bn * BN term
    bn: list[float] = field(default_factory=list)         # per iteration: the BN term (unweighted by r_bn)
    ce: list[float] = field(default_factory=list)         # per iteration: the cross-entropy
    seconds: float = 0.0                                  # its share of its step: the step's time / its units
    pixels: torch.Tensor | None = None                    # float [N, 3, H, W] in [0, 1] before rounding, if kept


def recover_unit(observer: nn.Module, labels: torch.Tensor, targets: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 settings: RecoverSettings, seed: int, image_size: int,
                 device: torch.device | str = "cpu", where: str = "", keep_pixels: bool = False) -> RecoverResult:
    """Synthesise ``len(labels)`` images of ``labels`` [N] against BN ``targets`` (per layer
    (mean, var)); ``observer`` is frozen, in eval mode, on ``device``. Every draw comes from one
    CPU generator seeded with ``seed``. A non-finite objective raises, naming ``where`` and the
    iteration. One batch alone: :func:`recover_step` with one unit."""
    return recover_step(observer, [labels], [targets], settings, [seed], image_size, device, [where],
                        keep_pixels)[0]


def recover_step(observer: nn.Module, labels: Sequence[torch.Tensor],
                 targets: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]], settings: RecoverSettings,
                 seeds: Sequence[int], image_size: int, device: torch.device | str = "cpu",
                 wheres: Sequence[str] = (), keep_pixels: bool = False,
                 check_every: int = CHECK_EVERY) -> list[RecoverResult]:
    """Synthesise G batches together, one forward pass per iteration, each as if alone.

    Batch g has ``labels[g]`` [n] (n the same for every batch), BN ``targets[g]`` (per layer
    (mean, var)) and draws from its own CPU generator seeded with ``seeds[g]``: the initial noise,
    then per iteration its crop, flip and roll, in the order :func:`recover_unit` draws them. The
    objective is summed over batches, each with its own CE mean and BN term (over its own images),
    so each batch's pixels get the gradient they would get alone. ``observer`` is frozen, in eval
    mode (BatchNorm then uses its running statistics and the images do not interact), on
    ``device``. The losses stay on the device and come to the CPU every ``check_every``
    iterations: a non-finite objective raises there, naming the batch (``wheres[g]``) and the
    first iteration at which it was not finite.
    """
    t0 = time.perf_counter()
    groups = len(labels)
    sizes = {len(lab) for lab in labels}
    if groups < 1 or len(sizes) != 1 or len(targets) != groups or len(seeds) != groups:
        raise ValueError(f"recover_step: {groups} label sets of sizes {sorted(sizes)}, {len(targets)} target "
                         f"sets, {len(seeds)} seeds: need as many of each, every batch of one size")
    if groups > 1 and any(m.training for m in observer.modules()):
        raise RecoverError("recover_step: the observer is in training mode; its BatchNorm would normalise over "
                           "the whole stacked batch and mix the batches packed into one step (call .eval())")
    if check_every < 1:
        raise ValueError(f"recover_step: check_every {check_every} must be >= 1")
    wheres = list(wheres) or [""] * groups
    device = torch.device(device)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    mean, std = (t.to(device) for t in input_normalisation(observer))
    lo, hi = (0 - mean) / std, (1 - mean) / std                                   # [1, 3, 1, 1]
    n, side = sizes.pop(), image_size
    z = torch.cat([torch.randn(n, 3, side, side, generator=g) for g in gens])    # [G * n, 3, S, S]
    z = z.to(device).requires_grad_(True)
    y = torch.cat(list(labels)).to(device, torch.long)                           # [G * n]
    # Per layer: every batch's target (mean, var) stacked, [G, F_l] each.
    stacked = [(torch.stack([t[l][0] for t in targets]).to(device), torch.stack([t[l][1] for t in targets]).to(device))
               for l in range(len(targets[0]))]
    opt = torch.optim.Adam([z], lr=settings.lr, betas=ADAM_BETAS, eps=ADAM_EPS)  # elementwise: batches apart
    iters = settings.iterations
    log = torch.empty(iters, 3, groups, device=device)    # per iteration: objective, BN term, CE [3, G]
    results = [RecoverResult(images=torch.empty(0, dtype=torch.uint8)) for _ in range(groups)]
    checked = 0
    with BNInputs(observer) as hooks:
        for t in range(iters):
            for group in opt.param_groups:  # the references' lr_cosine_policy, no warm-up
                group["lr"] = 0.5 * (1 + math.cos(math.pi * t / iters)) * settings.lr
            logits = observer(augment_groups(z, gens, settings.jitter) * std + mean)   # the observer takes [0, 1]
            if groups == 1:
                ce = F.cross_entropy(logits, y).reshape(1)                          # [1]: the batch's mean
            else:
                ce = F.cross_entropy(logits, y, reduction="none").view(groups, n).mean(1)   # [G]: each batch's mean
            bn = group_bn_term(hooks.captured(), stacked, groups, settings.first_bn_multiplier)   # [G]
            loss = ce + settings.r_bn * bn                                          # [G]
            log[t] = torch.stack((loss, bn, ce)).detach()
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()    # a batch's pixels only reach its own term: its gradient as alone
            opt.step()
            with torch.no_grad():
                z.copy_(torch.maximum(torch.minimum(z, hi), lo))   # the pixels stay inside [0, 1]
            if t + 1 == iters or (t + 1) % check_every == 0:
                _take_log(log[checked:t + 1].cpu(), checked, results, wheres, settings)   # the one host sync
                checked = t + 1
    with torch.no_grad():
        x = z * std + mean                                                        # [G * n, 3, S, S]
        images = to_uint8(x).cpu()                                                # [G * n, S, S, 3]
        pixels = x.detach().cpu() if keep_pixels else None
    share = (time.perf_counter() - t0) / groups
    for g, res in enumerate(results):
        res.images = images[g * n:(g + 1) * n]
        res.pixels = pixels[g * n:(g + 1) * n] if pixels is not None else None
        res.seconds = share
    return results


def _take_log(window: torch.Tensor, first: int, results: list[RecoverResult], wheres: Sequence[str],
              settings: RecoverSettings) -> None:
    """Append the logged iterations ``first``.. (``window`` [T, 3, G] on the CPU: objective, BN term,
    CE) to each batch's result; raise at the first iteration whose objective is not finite."""
    bad = torch.nonzero(~torch.isfinite(window[:, 0]))                          # [k, 2] (iteration, batch)
    if len(bad):
        t, g = (int(v) for v in bad[0])
        where = wheres[g] or "batch"
        raise RecoverError(f"recover {where}: the objective is not finite at iteration {first + t} (CE "
                           f"{float(window[t, 2, g]):.4g}, BN term {float(window[t, 1, g]):.4g}); lower recover.lr "
                           f"({settings.lr}) or recover.r_bn ({settings.r_bn})")
    for g, res in enumerate(results):
        res.objective += window[:, 0, g].tolist()
        res.bn += window[:, 1, g].tolist()
        res.ce += window[:, 2, g].tolist()


def unit_targets(variant: str, unit: Unit, observer: nn.Module, stats: ClassStats | None,
                 class_names: Sequence[str] = ()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The BN targets of ``unit``: the global running statistics (sre2l), or its class's own (lpld)."""
    if variant == "sre2l":
        return running_moments(observer)
    (label,) = unit.classes  # an lpld unit holds one class
    if stats is None:
        raise RecoverError("class-wise recover (lpld) needs the per-class statistics")
    return stats.moments(label, class_names[label] if label < len(class_names) else "")


def describe_unit(unit: Unit, class_names: Sequence[str]) -> str:
    """'class 'three' (index 3)' or 'classes 0-99, image 2': for logs and errors."""
    classes = unit.classes
    if len(classes) == 1:
        c = classes[0]
        return f"class {class_names[c]!r} (index {c})" if c < len(class_names) else f"class {c}"
    ks = sorted({k for _, k in unit.slots})
    return f"classes {classes[0]}-{classes[-1]}, image {ks[0]}"


def recover_images(observer: nn.Module, variant: str, num_classes: int, ipc: int, batch_size: int,
                   settings: RecoverSettings, seed: int, image_size: int, stats: ClassStats | None = None,
                   class_names: Sequence[str] = (), device: torch.device | str = "cpu",
                   units_per_step: int = 1, keep_pixels: bool = False,
                   ) -> tuple[torch.Tensor, list[RecoverResult]]:
    """Every unit of a run, ``units_per_step`` per forward pass (:func:`plan_steps`), in memory:
    (images uint8 [C * ipc, H, W, 3] in the image set's class-major order, the units' results in
    plan order). The Ray stage runs the same units on actors."""
    units = plan_units(variant, num_classes, ipc, batch_size)
    images = torch.empty(num_classes * ipc, image_size, image_size, 3, dtype=torch.uint8)
    results: dict[int, RecoverResult] = {}
    for step in plan_steps(units, units_per_step):
        out = recover_step(observer, [torch.tensor([c for c, _ in u.slots]) for u in step],
                           [unit_targets(variant, u, observer, stats, class_names) for u in step], settings,
                           [unit_seed(seed, variant, u) for u in step], image_size, device,
                           [describe_unit(u, class_names) for u in step], keep_pixels)
        for unit, res in zip(step, out):
            images[unit.image_indices(ipc)] = res.images
            results[unit.index] = res
    return images, [results[u.index] for u in units]
