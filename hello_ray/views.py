"""The student's augmented views: drawn on a CPU generator, built where the image set lives.

A view is first *drawn* (image order, crop boxes, flips, CutMix partner, weight and box: a few
numbers per image, all from one CPU ``torch.Generator``, so they do not depend on the device) and
then *materialised*: the pixels are cut and resized from the image set in one batched
``roi_align`` on whatever device holds the set (``data/augment.py``). Splitting the two lets

- every label strategy of one seed train on the same sequence of views (:func:`draw_epoch` is
  the one place that walks the generator: the student loop and the relabel pass both call it);
- a relabel pass walk the generator through batches it does not keep without building pixels;
- a DDP rank build only the rows of the global batch it trains on (and their CutMix partners).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hello_ray.data.augment import apply_crop_flip, apply_cutmix, cutmix_box, draw_beta, sample_crop_boxes

#: RandomResizedCrop area range of the student's views (torchvision's default, as FKD/RDED use).
VIEW_SCALE = (0.08, 1.0)


@dataclass
class View:
    """How one global batch of augmented views is made from the image set.

    ``index`` picks the images; each is cropped to ``boxes`` (x0, y0, x1, y1 in pixels of the
    stored image), resized, flipped where ``flips``; then CutMix pastes ``box`` of image
    ``perm[i]`` into image i with area weight ``lam`` kept for image i.
    """
    index: torch.Tensor            # [B] int64 image ids in the image set
    boxes: torch.Tensor            # [B, 4] int64 crop boxes
    flips: torch.Tensor            # [B] bool horizontal flips
    perm: torch.Tensor             # [B] int64 CutMix partners
    lam: float                     # weight of the image's own class after CutMix
    box: torch.Tensor              # [4] int64 CutMix box (x0, y0, x1, y1), exclusive ends
    logits: torch.Tensor | None = None   # [B, C] fp16, only for stored views ([B, k] for top-k ones)
    classes: torch.Tensor | None = None  # [B, k] int64 class ids of ``logits`` (top-k stored views)

    def materialise(self, images: torch.Tensor, size: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """images [M, 3, H, W] (uint8, or float in [0, 1]) -> the augmented batch [B, 3, size, size]
        on the images' device, or only its ``rows`` [R] -> [R, 3, size, size] (equal to the whole
        batch's rows: each crop is resized on its own, and a row needs only its CutMix partner)."""
        dev = images.device
        if rows is None:
            x = as_float(images[self.index.to(dev)])
            x = apply_crop_flip(x, self.boxes.to(dev), self.flips.to(dev), size)
            return apply_cutmix(x, self.perm, tuple(int(v) for v in self.box))
        rows = rows.long().cpu()
        x0, y0, x1, y1 = (int(v) for v in self.box)
        pasted = x1 > x0 and y1 > y0
        need = torch.unique(torch.cat([rows, self.perm[rows]])) if pasted else rows.unique()  # sorted
        at = torch.full((len(self.index),), -1, dtype=torch.long)
        at[need] = torch.arange(len(need))
        crops = apply_crop_flip(as_float(images[self.index[need].to(dev)]), self.boxes[need].to(dev),
                                self.flips[need].to(dev), size)              # [len(need), 3, size, size]
        out = crops[at[rows].to(dev)]                                       # a copy (advanced indexing)
        if pasted:
            out[:, :, y0:y1, x0:x1] = crops[at[self.perm[rows]].to(dev)][:, :, y0:y1, x0:x1]
        return out


def as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0, 1]; the set is kept as uint8 so it costs 1/4 of the memory."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def draw_view(index: torch.Tensor, height: int, width: int, size: int, alpha: float,
              generator: torch.Generator) -> View:
    """Draw the random view of ``images[index]`` (images of ``height`` x ``width``), no pixels.

    RandomResizedCrop boxes + flips, then CutMix(alpha) on the ``size``-px crops; alpha 0 turns
    CutMix off (identity perm, lam 1, empty box). The draws, in this order, are those of
    ``random_resized_crop_flip`` followed by ``cutmix`` on the cropped batch.
    """
    n = len(index)
    dev = generator.device
    boxes = sample_crop_boxes(n, height, width, VIEW_SCALE, generator=generator)       # [n, 4]
    flips = (torch.rand(n, generator=generator, device=dev) < 0.5).cpu()              # [n]
    if alpha <= 0:
        return View(index=index.long(), boxes=boxes, flips=flips, perm=torch.arange(n), lam=1.0,
                    box=torch.zeros(4, dtype=torch.long))
    lam = draw_beta(alpha, generator)
    perm = torch.randperm(n, generator=generator, device=dev).cpu()
    box = cutmix_box(size, size, lam, generator)
    lam = 1.0 - (box[2] - box[0]) * (box[3] - box[1]) / float(size * size)            # area-corrected
    return View(index=index.long(), boxes=boxes, flips=flips, perm=perm, lam=lam,
                box=torch.as_tensor(box).long().reshape(4))


def epoch_order(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch over n images cut into global batches (the last one may be short)."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


def draw_epoch(n_images: int, height: int, width: int, batch_size: int, size: int, alpha: float,
               generator: torch.Generator) -> list[View]:
    """One epoch of views: its shuffled batches, each drawn with :func:`draw_view`.

    The student loop (every online strategy) and the relabel pass (stored labels) walk the same
    seeded generator through this function, so one seed gives one sequence of views for all.
    """
    return [draw_view(index, height, width, size, alpha, generator)
            for index in epoch_order(n_images, batch_size, generator)]


def plain_epoch(n_images: int, height: int, width: int, batch_size: int, generator: torch.Generator) -> list[View]:
    """One epoch without augmentation (DD-Ranking's "without augmentation" rows, ``+noaug``): the
    same shuffled batches, every view the whole image resized, no flip, no CutMix."""
    out = []
    for index in epoch_order(n_images, batch_size, generator):
        n = len(index)
        boxes = torch.tensor([[0, 0, width, height]], dtype=torch.long).expand(n, 4).clone()   # [n, 4]
        out.append(View(index=index.long(), boxes=boxes, flips=torch.zeros(n, dtype=torch.bool),
                        perm=torch.arange(n), lam=1.0, box=torch.zeros(4, dtype=torch.long)))
    return out


def view_batch(images: torch.Tensor, index: torch.Tensor, size: int, alpha: float,
               generator: torch.Generator) -> tuple[View, torch.Tensor]:
    """Draw a view of ``images[index]`` and build it: (the view, its pixels [B, 3, size, size])."""
    view = draw_view(index, images.shape[-2], images.shape[-1], size, alpha, generator)
    return view, view.materialise(images, size)
