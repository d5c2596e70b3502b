"""RDED patch selection, the plain-PyTorch core (METHOD.md stage 2; no Ray in this file).

Reference: LINs-lab/RDED at 3f6453d8b18b6a9bcc6c718bc16ecda6bb94d59f, ``synthesize/main.py``
(selection transform), ``synthesize/utils.py`` (``MultiRandomCrop``, ``pad``, ``selector``,
``mix_images``) and ``validation/utils.py`` (``ImageFolder`` with ``shuffle=True``). The defaults
reproduce it; every difference is a named ``select.*`` option or listed below.

*Crops* (``crop_source="original"``, RDED): ``num_crop`` RandomResizedCrops of side
``image_size // factor`` (scale 0.08-1, aspect ratio 1, torchvision's 10 tries then its centre
fallback) cut from the decoded source image at its own resolution (its longer side capped at
``select.max_side``) and resized bilinearly with antialiasing. ``crop_source="resized"`` (our
earlier behaviour) cuts them from the image resized and centre-cropped to ``image_size`` instead.
Boxes come from a generator seeded by a stable hash of ``(seed, image id)``, so a box never
depends on batch order, worker or process (RDED draws them from the unseeded global RNG).

*Scoring*: the crop is shown to the observer at full size and scored by the cross-entropy of its
prediction against the image's true class (lower is more representative). ``show="pad"`` (RDED)
centres the crop on a ``image_size`` canvas (odd pixels bottom/right) filled with the observer's
normalisation mean, which is exactly RDED's zero padding *after* normalisation; ``pad_black``
pads [0, 1] pixels with 0 (black) before the model normalises (our earlier ``pad``); ``resize``
up-samples the crop bilinearly.

*Selection*: each image's crops are ranked (score, then crop index); rank 0 is the image's best
crop. Per class, the ``k = ipc * factor**2`` smallest candidates by the key
``(rank, score, image id, crop index)`` win, kept by a bounded heap per class
(:class:`ClassTopK`) so memory is classes x k whatever the dataset size. When a class has at
least ``k`` images only rank-0 crops compete: exactly RDED's ``selector`` (best crop per image,
then the images' best scores ascending). When a class has fewer images (RDED would fail), the
second-best crops of all images come next (then the third, ...), ordered by score; when even
``images x num_crop < k`` the winners repeat cyclically.

*Stitching* (``tile_order="rded"``, RDED's ``mix_images``): image ``b`` of a class, tile
``(row r, col c)`` holds the winner ranked ``(r * factor + c) * ipc + b``, so the ``ipc`` best
patches are the top-left tiles of the ``ipc`` images. ``tile_order="rowmajor"`` (our earlier
layout) puts ranks ``b*f^2 .. b*f^2 + f^2 - 1`` into image ``b``, row-major.

Known remaining differences: RDED scores float crops and saves JPEGs by truncation, we score and
store the uint8-rounded crops as PNG (the pixels scored are the pixels shipped); RDED's argsort is
not stable (ties in any order), ours breaks ties by image id and crop index; RNG streams differ.
"""
from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Generic, Iterable, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SCALE = (0.08, 1.0)          # area fraction of a random-resized crop (RDED / torchvision default)
SHOW_MODES = ("pad", "pad_black", "resize")
TILE_ORDERS = ("rded", "rowmajor")
RRC_TRIES = 10               # torchvision RandomResizedCrop.get_params
BOX_COLUMNS = ("x0", "y0", "x1", "y1")

K = TypeVar("K")
T = TypeVar("T")


# ---------------------------------------------------------------------------- crop boxes

def crop_seed(seed: int, image_id: str) -> int:
    """A 63-bit generator seed from ``(seed, image id)``; stable across processes (no ``hash()``)."""
    digest = hashlib.sha256(f"{seed}\x00{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def crop_boxes(image_id: str, height: int, width: int, num_crop: int, seed: int,
               scale: tuple[float, float] = SCALE) -> torch.Tensor:
    """The ``num_crop`` square crop boxes of one ``height x width`` image: int64 [num_crop, 4]
    as (x0, y0, x1, y1), x along the width.

    torchvision's ``RandomResizedCrop.get_params`` with ``ratio=(1, 1)`` (what RDED's
    ``MultiRandomCrop`` uses): up to 10 tries of an area fraction ~ U(scale) whose square fits,
    at a uniform position; else the centred square of the shorter side. The draws come from a
    generator seeded by ``(seed, image id)``.
    """
    g = torch.Generator().manual_seed(crop_seed(seed, image_id))
    area = height * width
    boxes = []
    for _ in range(num_crop):
        for _ in range(RRC_TRIES):
            target = area * (scale[0] + (scale[1] - scale[0]) * float(torch.rand(1, generator=g, dtype=torch.float64)))
            side = int(round(math.sqrt(target)))                      # aspect ratio 1: w = h
            if 0 < side <= width and 0 < side <= height:
                y0 = int(torch.randint(0, height - side + 1, (1,), generator=g))
                x0 = int(torch.randint(0, width - side + 1, (1,), generator=g))
                boxes.append((x0, y0, x0 + side, y0 + side))
                break
        else:  # the fallback: ratio (1, 1) clamps to the shorter side, centred
            side = min(height, width)
            y0, x0 = (height - side) // 2, (width - side) // 2
            boxes.append((x0, y0, x0 + side, y0 + side))
    return torch.tensor(boxes, dtype=torch.long).reshape(num_crop, 4)


def cut_crop(image: torch.Tensor, box: Sequence[int], crop_size: int) -> torch.Tensor:
    """Cut ``box`` from a uint8 HWC image and resize it to uint8 [crop_size, crop_size, 3]."""
    x0, y0, x1, y1 = (int(v) for v in box)
    region = image[y0:y1, x0:x1].permute(2, 0, 1).unsqueeze(0).float()      # [1, 3, h, w]
    if region.shape[-1] != crop_size or region.shape[-2] != crop_size:
        # antialias matters when a large crop is shrunk (factor 2): no aliasing in the patch
        region = F.interpolate(region, size=(crop_size, crop_size), mode="bilinear",
                               align_corners=False, antialias=True)
    return region.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0)  # [c, c, 3]


def make_crops(images: Sequence[torch.Tensor | np.ndarray] | torch.Tensor | np.ndarray, ids: Sequence[str],
               num_crop: int, crop_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes int64 [N, K, 4] and uint8 crops [N, K, c, c, 3] of decoded uint8 images [H_i, W_i, 3]
    (a list of any sizes, or one [N, S, S, 3] array)."""
    if len(ids) == 0:
        return (torch.zeros((0, num_crop, 4), dtype=torch.long),
                torch.zeros((0, num_crop, crop_size, crop_size, 3), dtype=torch.uint8))
    boxes, crops = [], []
    for img, iid in zip(images, ids):
        img = torch.as_tensor(img)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"make_crops: expected a uint8 image [H, W, 3] for {iid}, got {tuple(img.shape)}")
        b = crop_boxes(str(iid), img.shape[0], img.shape[1], num_crop, seed)              # [K, 4]
        boxes.append(b)
        crops.append(torch.stack([cut_crop(img, box.tolist(), crop_size) for box in b]))  # [K, c, c, 3]
    return torch.stack(boxes), torch.stack(crops)


def cap_side(image: np.ndarray | torch.Tensor, max_side: int) -> np.ndarray | torch.Tensor:
    """uint8 [H, W, 3] with its longer side shrunk to ``max_side`` (antialiased) when longer:
    bounds a crop source's memory; RDED's ImageNet sources are ~500 px and pass untouched.
    A tensor (on any device) stays a tensor there; an array stays an array."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    s = max_side / max(h, w)
    x = torch.as_tensor(image).permute(2, 0, 1).unsqueeze(0).float()
    x = F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                      align_corners=False, antialias=True)
    out = x.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
    return out if isinstance(image, torch.Tensor) else out.numpy()


# ---------------------------------------------------------------------------- scoring

def pad_colour(observer: nn.Module) -> torch.Tensor:
    """float [3] in [0, 1]: the colour that the observer's normalisation maps to zero (its mean).

    Zoo models normalise inside ``forward`` with a ``mean`` buffer; others are assumed ImageNet's.
    """
    from hello_ray.models.zoo import IMAGENET_MEAN

    mean = getattr(observer, "mean", None)
    if isinstance(mean, torch.Tensor) and mean.numel() == 3:
        return mean.detach().flatten().float().cpu()
    return torch.tensor(IMAGENET_MEAN, dtype=torch.float32)


def show_crops(crops: torch.Tensor, image_size: int, show: str,
               colour: torch.Tensor | None = None) -> torch.Tensor:
    """float crops [M, 3, c, c] in [0, 1] -> [M, 3, S, S] as the observer sees them.

    ``pad``: centred on a canvas of ``colour`` (float [3]; the observer's mean, see
    :func:`pad_colour`), top/left gap = floor(gap / 2) as RDED's ``pad``; ``pad_black``: the
    same on black; ``resize``: bilinear up-sampling.
    """
    c = crops.shape[-1]
    if show not in SHOW_MODES:
        raise ValueError(f"select.show: unknown mode {show!r}; use one of {SHOW_MODES}")
    if c == image_size:
        return crops
    if show == "resize":
        return F.interpolate(crops, size=(image_size, image_size), mode="bilinear", align_corners=False)
    lo = (image_size - c) // 2
    if show == "pad_black" or colour is None:
        if show == "pad":
            raise ValueError("show_crops: show='pad' needs the observer's colour (pad_colour(observer))")
        return F.pad(crops, (lo, image_size - c - lo, lo, image_size - c - lo), value=0.0)
    canvas = colour.to(crops.device, crops.dtype).view(1, 3, 1, 1).expand(len(crops), 3, image_size, image_size)
    canvas = canvas.clone()                                                      # [M, 3, S, S]
    canvas[:, :, lo:lo + c, lo:lo + c] = crops
    return canvas


def score_crops(observer: nn.Module, crops: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                image_size: int, show: str, batch_size: int = 256,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Cross-entropy of the observer on each crop vs its class: float32 [M] (lower = better).

    ``crops`` are uint8 [M, c, c, 3] or float [M, 3, c, c] in [0, 1]; ``labels`` int64 [M]. The
    observer takes [0, 1] images at full size and normalises inside (docs/ARCHITECTURE.md).
    RDED's ``selector`` loss: -log softmax(logits)[true class], per crop, no reduction.
    """
    crops = torch.as_tensor(crops)
    labels = torch.as_tensor(labels, dtype=torch.long)
    colour = pad_colour(observer) if show == "pad" else None
    out = torch.empty(len(crops), dtype=torch.float32)
    with torch.inference_mode():
        for s in range(0, len(crops), batch_size):
            x = crops[s:s + batch_size].to(device)
            if x.dtype == torch.uint8:
                x = x.permute(0, 3, 1, 2).float().div_(255.0)                          # [B, 3, c, c]
            logits = observer(show_crops(x, image_size, show, colour))                 # [B, C]
            y = labels[s:s + batch_size].to(device)
            out[s:s + batch_size] = F.cross_entropy(logits.float(), y, reduction="none").cpu()
    return out


def rank_crops(scores: torch.Tensor) -> torch.Tensor:
    """Per-image order of its crops by (score, crop index): int64 [N, K], column r = rank r's crop."""
    # stable sort: equal scores keep crop-index order, so ties never depend on the platform
    return torch.sort(scores, dim=1, stable=True).indices


def ranks_needed(num_images: int, k: int, num_crop: int) -> int:
    """How many crops per image (best first) must compete so a class of ``num_images`` fills ``k``."""
    if num_images <= 0:
        return 0
    return min(num_crop, max(1, math.ceil(k / num_images)))


# ---------------------------------------------------------------------------- bounded keepers

class _Largest(Generic[K, T]):
    """Heap entry with reversed order: heapq's root is then the *largest* key kept."""
    __slots__ = ("key", "item")

    def __init__(self, key: K, item: T):
        self.key = key
        self.item = item

    def __lt__(self, other: "_Largest[K, T]") -> bool:
        return self.key > other.key  # type: ignore[operator]


class Smallest(Generic[K, T]):
    """Keeps the ``k`` items of smallest key seen so far; O(log k) per offer, memory O(k)."""

    def __init__(self, k: int):
        self.k = k
        self._heap: list[_Largest[K, T]] = []

    def offer(self, key: K, item: T) -> None:
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, _Largest(key, item))
        elif key < self._heap[0].key:  # type: ignore[operator]
            heapq.heapreplace(self._heap, _Largest(key, item))

    def __len__(self) -> int:
        return len(self._heap)

    def sorted(self) -> list[tuple[K, T]]:
        """The kept (key, item) pairs, smallest key first."""
        return sorted(((e.key, e.item) for e in self._heap), key=lambda p: p[0])  # type: ignore[arg-type,return-value]


@dataclass(frozen=True)
class Candidate:
    """One scored crop: where it comes from, how good it is, and (streaming stage) its pixels."""
    label: int
    image_id: str
    crop: int                      # index among the image's num_crop crops
    rank: int                      # 0 = the image's best crop
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in the decoded image
    score: float
    # uint8 [c, c, 3] when the rows carry a "patch" column: the kept patches need no second read
    patch: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> tuple[int, float, str, int]:
        # rank first: a class's best-per-image crops always beat any second-best crop
        return (self.rank, self.score, self.image_id, self.crop)


class ClassTopK:
    """Per-class top-k of :class:`Candidate` by ``(rank, score, image id, crop)``: memory classes x k."""

    def __init__(self, num_classes: int, k: int):
        self.k = k
        self.heaps: list[Smallest[tuple, Candidate]] = [Smallest(k) for _ in range(num_classes)]
        self.offered = 0

    def offer(self, cand: Candidate) -> None:
        self.offered += 1
        self.heaps[cand.label].offer(cand.key, cand)

    def offer_rows(self, rows: dict[str, Any]) -> None:
        """Offer a batch of scored rows (columns label, id, crop, rank, x0..y1, score[, patch])."""
        for c in rows_to_candidates(rows):
            self.offer(c)

    def winners(self, label: int) -> list[Candidate]:
        """The class's kept candidates, best first (fewer than k when the class ran short)."""
        return [c for _, c in self.heaps[label].sorted()]


def rows_to_candidates(rows: dict[str, Any]) -> Iterable[Candidate]:
    cols = [np.asarray(rows[c]) for c in ("label", "id", "crop", "rank", *BOX_COLUMNS, "score")]
    patches = rows.get("patch")
    for i, (lab, iid, crop, rank, x0, y0, x1, y1, score) in enumerate(zip(*cols)):
        # a copy: a kept patch must not pin the whole batch it came in
        patch = None if patches is None else np.array(patches[i], dtype=np.uint8)
        yield Candidate(int(lab), str(iid), int(crop), int(rank), (int(x0), int(y0), int(x1), int(y1)),
                        float(score), patch)


def best_rows(labels: np.ndarray, ids: Sequence[str], boxes: torch.Tensor, scores: torch.Tensor,
              ranks: np.ndarray | Sequence[int], crops: torch.Tensor | np.ndarray | None = None
              ) -> dict[str, np.ndarray]:
    """Columns of the crops that compete: per image its ``ranks[i]`` best (rank 0 = best).

    boxes int64 [N, K, 4], scores float32 [N, K] -> rows (label, id, crop, rank, x0..y1, score);
    with ``crops`` uint8 [N, K, c, c, 3] also ``patch`` [rows, c, c, 3], the competing pixels.
    """
    order = rank_crops(scores)                                                  # [N, K]
    out: dict[str, list] = {c: [] for c in ("label", "id", "crop", "rank", *BOX_COLUMNS, "score")}
    picked: list[tuple[int, int]] = []
    for i in range(len(ids)):
        for r in range(int(ranks[i])):
            j = int(order[i, r])
            picked.append((i, j))
            out["label"].append(int(labels[i]))
            out["id"].append(str(ids[i]))
            out["crop"].append(j)
            out["rank"].append(r)
            for name, v in zip(BOX_COLUMNS, boxes[i, j].tolist()):
                out[name].append(int(v))
            out["score"].append(float(scores[i, j]))
    rows = {
        "label": np.asarray(out["label"], dtype=np.int64),
        "id": np.asarray(out["id"], dtype=object),
        "crop": np.asarray(out["crop"], dtype=np.int64),
        "rank": np.asarray(out["rank"], dtype=np.int64),
        **{c: np.asarray(out[c], dtype=np.int64) for c in BOX_COLUMNS},
        "score": np.asarray(out["score"], dtype=np.float32),
    }
    if crops is not None:
        crops = np.asarray(crops)
        ii = np.asarray([p[0] for p in picked], dtype=np.int64)
        jj = np.asarray([p[1] for p in picked], dtype=np.int64)
        rows["patch"] = crops[ii, jj] if len(picked) else np.zeros((0, *crops.shape[2:]), np.uint8)
    return rows


# ---------------------------------------------------------------------------- stitching

def fill_to_k(winners: Sequence[Candidate], k: int) -> list[Candidate]:
    """``k`` patches from a class's winners: cyclic repeats when the class had too few crops."""
    if not winners:
        raise ValueError("fill_to_k: a class without candidates cannot fill its images")
    return [winners[i % len(winners)] for i in range(k)]


def stitch(patches: torch.Tensor | np.ndarray, factor: int, order: str = "rded") -> torch.Tensor:
    """uint8 patches [ipc * f^2, c, c, 3], best first -> uint8 images [ipc, f*c, f*c, 3].

    ``rded``: image b, tile (r, c) = patch (r*f + c) * ipc + b (RDED's ``mix_images``);
    ``rowmajor``: image b holds patches b*f^2 .. b*f^2 + f^2 - 1, row-major.
    """
    patches = torch.as_tensor(patches)
    n, c = patches.shape[0], patches.shape[1]
    if n % (factor * factor):
        raise ValueError(f"stitch: {n} patches do not fill images of {factor}x{factor} patches")
    if order not in TILE_ORDERS:
        raise ValueError(f"select.tile_order: unknown order {order!r}; use one of {TILE_ORDERS}")
    ipc = n // (factor * factor)
    if order == "rded":
        grid = patches.reshape(factor, factor, ipc, c, c, 3).permute(2, 0, 1, 3, 4, 5)  # [ipc, row, col, y, x, 3]
    else:
        grid = patches.reshape(ipc, factor, factor, c, c, 3)                          # [ipc, row, col, y, x, 3]
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(ipc, factor * c, factor * c, 3)


# ---------------------------------------------------------------------------- in-memory reference

@dataclass
class Selection:
    """Per class, the ``ipc * factor^2`` patches (best first, repeats allowed) and the stitched images."""
    patches: list[list[Candidate]]   # [class][k]
    images: torch.Tensor             # uint8 [classes * ipc, S, S, 3], class-major
    labels: torch.Tensor             # int64 [classes * ipc]


def tile_of(rank: int, ipc: int, factor: int, order: str = "rded") -> tuple[int, int]:
    """(image, tile) that the patch of ``rank`` (0 = best) lands in; tile = r * factor + c."""
    if order == "rded":
        return rank % ipc, rank // ipc
    return rank // (factor * factor), rank % (factor * factor)


def assemble(patches_per_class: list[list[Candidate]], pixels: dict[tuple[str, int], torch.Tensor],
             factor: int, order: str = "rded") -> tuple[torch.Tensor, torch.Tensor]:
    """Stitch every class's patches (pixels looked up by (image id, crop)) -> images, labels."""
    images, labels = [], []
    for label, cands in enumerate(patches_per_class):
        tiles = torch.stack([pixels[(c.image_id, c.crop)] for c in cands])     # [k, c, c, 3]
        imgs = stitch(tiles, factor, order)
        images.append(imgs)
        labels.append(torch.full((len(imgs),), label, dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def select_in_memory(images: Sequence[torch.Tensor | np.ndarray] | torch.Tensor | np.ndarray, labels: Sequence[int],
                     ids: Sequence[str], observer: nn.Module, num_classes: int, *, ipc: int, factor: int,
                     mipc: int, num_crop: int, show: str, seed: int, image_size: int | None = None,
                     tile_order: str = "rded", mipc_order: str = "random", batch_size: int = 256,
                     device: torch.device | str = "cpu") -> Selection:
    """The whole selection on decoded uint8 images [H_i, W_i, 3] held in memory (small data, tests).

    ``image_size`` is the stitched images' side (default: the first image's height, for square
    inputs). The ``mipc`` images of a class are chosen as the streaming stage's data layer chooses
    them (:func:`hello_ray.data.subset.keep_per_class`: seeded random, or the first in the given
    order). Same functions as the streaming Ray stage, in one process, so the two must agree.
    """
    from hello_ray.data.subset import keep_per_class

    images = [torch.as_tensor(im) for im in images]
    size = image_size or images[0].shape[0]
    crop_size = size // factor
    k = ipc * factor * factor
    ids = [str(i) for i in ids]
    chosen_mask = keep_per_class(np.asarray(labels), ids, mipc, seed if mipc_order == "random" else None)
    chosen: list[list[str]] = [[] for _ in range(num_classes)]
    for label, iid, keep in zip(labels, ids, chosen_mask):
        if keep:
            chosen[int(label)].append(iid)
    row_of = {i: n for n, i in enumerate(ids)}
    keeper = ClassTopK(num_classes, k)
    for label, class_ids in enumerate(chosen):
        if not class_ids:
            raise ValueError(f"class {label} has no images")
        idx = [row_of[i] for i in class_ids]
        boxes, crops = make_crops([images[i] for i in idx], class_ids, num_crop, crop_size, seed)  # [n,K,4], [n,K,c,c,3]
        n = len(idx)
        scores = score_crops(observer, crops.reshape(n * num_crop, crop_size, crop_size, 3),
                             torch.full((n * num_crop,), label), size, show, batch_size, device)
        r = ranks_needed(n, k, num_crop)
        keeper.offer_rows(best_rows(np.full(n, label), class_ids, boxes, scores.view(n, num_crop), [r] * n))
    per_class = [fill_to_k(keeper.winners(c), k) for c in range(num_classes)]
    pixels = {(c.image_id, c.crop): cut_crop(images[row_of[c.image_id]], c.box, crop_size)
              for cands in per_class for c in cands}
    out_images, out_labels = assemble(per_class, pixels, factor, tile_order)
    return Selection(per_class, out_images, out_labels)
