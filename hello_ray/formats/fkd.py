"""FKD label records: the per-batch relabel files of SRe2L and LPLD, read without running code.

SRe2L's relabel pass (VILA-Lab/SRe2L @ 8d00cba ``SRe2L/relabel/generate_soft_label.py`` l. 207-224)
writes one file per batch, ``<fkd_path>/epoch_<e>/batch_<b>.tar``, a ``torch.save``'d list::

    [coords, flip_status, mix_index, mix_lam, mix_bbox, soft_label]

- ``coords`` float32 [B, 4] = (i/H, j/W, h/H, w/W): the RandomResizedCrop's top, left, height,
  width over the loaded image's height H and width W (``SRe2L/relabel/utils_fkd.py`` l. 19-25).
  Replayed as ``resized_crop(img, i*H, j*W, h*H, w*W)`` on a PIL image, where Pillow rounds the box
  (left, top, left + width, top + height) with Python's ``round`` (``PIL.Image.Image._crop``).
- ``flip_status`` bool [B]: horizontal flips.
- ``mix_index`` int64 [B]: the CutMix partner of each image (``torch.randperm``).
- ``mix_lam`` float: lambda **as drawn** from Beta(a, a), before the box is clipped to the image
  (``utils_fkd.py`` l. 184-217); SRe2L's student loss never uses it (the stored logits label the
  mixed image).
- ``mix_bbox`` [bbx1, bby1, bbx2, bby2] (numpy ints in SRe2L's files): ``rand_bbox`` takes
  ``W = size[2]`` and ``H = size[3]``, so **bbx runs along dim 2 (rows, height) and bby along dim 3
  (columns)**, and CutMix pastes ``images[:, :, bbx1:bbx2, bby1:bby2]``.
- ``soft_label`` [B, C]: the teacher's logits on the mixed batch (fp16 with ``--use-fp16``).

The images of batch b of epoch e are not in the file: SRe2L rebuilds them from a RandomSampler
with a ``torch.Generator`` seeded ``--fkd-seed`` (42) over the ImageFolder of the distilled set,
iterated once per epoch, batches cut by a BatchSampler without drop_last (``get_img2batch_idx_list``,
``utils_fkd.py`` l. 243-257, :func:`sre2l_batches`); LPLD also writes them,
``sampler_indices_epoch.json`` = {"<epoch>": [image indices of the epoch's batches, concatenated]}
(he-y/soft-label-pruning-for-dataset-distillation @ 63eee18
``relabel_and_validate/generate_soft_label_pruning.py`` l. 321-326, 353-358).

**How our stored labels differ** (``hello_ray/views.View``):

| what        | SRe2L / LPLD record                          | ours (``View``)                                |
|-------------|----------------------------------------------|------------------------------------------------|
| crop        | (i/H, j/W, h/H, w/W) float32, top/left first | (x0, y0, x1, y1) int pixels, x = column, ends exclusive |
| CutMix box  | [bbx1, bby1, bbx2, bby2], bbx = rows (dim 2) | (x0, y0, x1, y1), x = columns (dim 3)          |
| lambda      | as drawn from Beta (box not yet clipped)     | area-corrected: 1 - box area / image area      |
| images      | implied by the seeded sampler (or LPLD json) | explicit ``index`` per batch                   |

FKD itself (szq0214/FKD @ afd5294 ``FKD_SLG/generate_soft_label.py``) stores one file per *image* with many crops and
top-k quantised probabilities; that per-image format is not read here.

Loading is ``torch.load(..., weights_only=True)`` with only numpy's scalar and dtype
reconstructors allowed besides tensors, lists and numbers (SRe2L's lambda and box are numpy
scalars): a file asking for anything else (a class whose ``__reduce__`` runs a command) is
refused before any of it runs, naming the file.
"""
from __future__ import annotations

import io
import json
import math
import pickle
import re
import threading
from dataclasses import dataclass

import numpy as np
import torch

SAMPLER_INDICES = "sampler_indices_epoch.json"  # LPLD's per-epoch image order
_RECORD_RE = re.compile(r"^epoch_(\d+)/batch_(\d+)\.tar$")
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_LOAD_LOCK = threading.Lock()


class FkdFormatError(ValueError):
    """An FKD record folder or file is not what SRe2L / LPLD write (names the file)."""


def record_name(epoch: int, batch: int) -> str:
    """``epoch_<e>/batch_<b>.tar`` (no zero padding, as SRe2L writes them)."""
    return f"epoch_{epoch}/batch_{batch}.tar"


def parse_record_name(rel: str) -> tuple[int, int] | None:
    """``epoch_3/batch_12.tar`` -> (3, 12); None for any other file."""
    m = _RECORD_RE.match(rel)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass
class FkdRecord:
    """One batch record, as SRe2L's list holds it (see the module docstring for each field)."""
    coords: torch.Tensor                       # [B, 4] float32 (i/H, j/W, h/H, w/W)
    flips: torch.Tensor                        # [B] bool
    mix_index: torch.Tensor | None             # [B] int64, None without mixing
    mix_lam: float | None                      # as drawn
    mix_bbox: tuple[int, int, int, int] | None  # (bbx1, bby1, bbx2, bby2): bbx on dim 2 (rows)
    logits: torch.Tensor                       # [B, C] fp16 (or fp32)


# ------------------------------------------------------------------------------ conversions

def coords_to_boxes(coords: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """SRe2L crop coords [B, 4] -> our boxes int64 [B, 4] (x0, y0, x1, y1): the pixels Pillow crops
    when torchvision's ``resized_crop(img, i*H, j*W, h*H, w*W)`` runs on the image (Python ``round``
    of left, top, left + width, top + height, in float64 as ``.item()`` gives them). Vectorised:
    float32 -> float64 is exact, the products and sums are the same float64 operations, and
    ``torch.round`` rounds halves to even as Python's ``round`` does."""
    c = coords.reshape(-1, 4).double()                                     # [B, 4] (i, j, h, w)
    i, j = c[:, 0] * height, c[:, 1] * width
    h, w = c[:, 2] * height, c[:, 3] * width
    return torch.round(torch.stack([j, i, j + w, i + h], dim=1)).to(torch.int64)


def boxes_to_coords(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Our boxes [B, 4] (x0, y0, x1, y1) -> SRe2L crop coords float32 (y0/H, x0/W, (y1-y0)/H,
    (x1-x0)/W); ``coords_to_boxes`` gives the boxes back exactly."""
    b = boxes.to(torch.float64)
    coords = torch.stack([b[:, 1] / height, b[:, 0] / width, (b[:, 3] - b[:, 1]) / height,
                          (b[:, 2] - b[:, 0]) / width], dim=1)
    return coords.to(torch.float32)


def bbox_to_box(bbox: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """SRe2L ``[bbx1, bby1, bbx2, bby2]`` (bbx = rows) -> our (x0, y0, x1, y1) (x = columns)."""
    bbx1, bby1, bbx2, bby2 = (int(v) for v in bbox)
    return bby1, bbx1, bby2, bbx2


def box_to_bbox(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Our (x0, y0, x1, y1) -> SRe2L ``[bbx1, bby1, bbx2, bby2]``."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return y0, x0, y1, x1


def area_lam(box: tuple[int, int, int, int], height: int, width: int) -> float:
    """Our lambda: the fraction of the image that keeps its own pixels after pasting ``box``
    (``data/augment.cutmix``'s correction of the drawn lambda)."""
    x0, y0, x1, y1 = box
    return 1.0 - (x1 - x0) * (y1 - y0) / float(height * width)


# ------------------------------------------------------------------------------ image order

def sre2l_batches(num_images: int, batch_size: int, epochs: int, seed: int = 42) -> list[list[list[int]]]:
    """Image indices of every (epoch, batch) as SRe2L's loader rebuilds them: a RandomSampler over
    ``num_images`` with a ``torch.Generator`` seeded ``seed``, iterated once per epoch, cut into
    ``batch_size`` batches (the last one short). Uses torch's own sampler, so it follows torch."""
    g = torch.Generator()
    g.manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(range(num_images), generator=g)
    batches = torch.utils.data.BatchSampler(sampler, batch_size=batch_size, drop_last=False)
    return [[list(b) for b in batches] for _ in range(epochs)]


def split_epoch_indices(indices: dict[str, list[int]], batch_size: int) -> dict[int, list[list[int]]]:
    """LPLD's ``sampler_indices_epoch.json`` content -> {epoch: [batch image indices]}."""
    return {int(e): [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]
            for e, idx in indices.items()}


def read_sampler_indices(data: bytes, where: str) -> dict[str, list[int]]:
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as e:
        raise FkdFormatError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, list) and all(isinstance(i, int) for i in v)
                                            for v in obj.values()):
        raise FkdFormatError(f"{where}: expected {{\"<epoch>\": [image indices]}} as LPLD writes it")
    return obj


# ------------------------------------------------------------------------------ records

def _safe_numpy_globals() -> list:
    """numpy's scalar and dtype reconstructors (SRe2L's lambda and box are numpy scalars): they
    build a number from its bytes and call nothing else. Both module paths: numpy 1 wrote
    ``numpy.core``, numpy 2 ``numpy._core``."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            np.dtype, *(getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType", "Int32DType"))]


def load_record(data: bytes, where: str) -> FkdRecord:
    """A record file's bytes -> FkdRecord. ``weights_only`` loading: anything but tensors, lists,
    numbers and numpy scalars is refused before it runs (FkdFormatError naming ``where``)."""
    try:
        # torch's allow-list is one process-wide set that the context adds to and removes from on exit:
        # two threads loading at once would pull it from under each other, so loads take turns.
        with _LOAD_LOCK, torch.serialization.safe_globals(_safe_numpy_globals()):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL_RE.search(str(e))
        if found:
            raise FkdFormatError(f"{where}: refusing to load it: an FKD record may hold only tensors, lists and "
                                 f"numbers, and it asks for the Python global {found.group(1)}. Nothing of it "
                                 "was run") from None
        raise FkdFormatError(f"{where}: not a plain tensor/list record, refused unread "
                             f"({_last_line(e)})") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise FkdFormatError(f"{where}: not a plain tensor/list record ({type(e).__name__}: "
                             f"{_last_line(e)})") from None
    if not isinstance(obj, (list, tuple)) or len(obj) != 6:
        raise FkdFormatError(f"{where}: expected the list [coords, flip_status, mix_index, mix_lam, mix_bbox, "
                             f"soft_label] SRe2L writes, got {type(obj).__name__}"
                             + (f" of {len(obj)} items" if isinstance(obj, (list, tuple)) else ""))
    coords, flips, index, lam, bbox, logits = obj
    if not (isinstance(coords, torch.Tensor) and coords.ndim == 2 and coords.shape[1] == 4):
        raise FkdFormatError(f"{where}: coords must be a [B, 4] tensor, got {_describe(coords)}")
    n = coords.shape[0]
    flips = torch.as_tensor(flips).reshape(-1).bool() if flips is not None else torch.zeros(n, dtype=torch.bool)
    if not (isinstance(logits, torch.Tensor) and logits.ndim == 2 and logits.shape[0] == n and flips.shape[0] == n):
        raise FkdFormatError(f"{where}: soft_label must be [B, C] and flip_status [B] for B = {n} crops, got "
                             f"{_describe(logits)} and {_describe(flips)}")
    if index is None:
        if lam is not None:
            raise FkdFormatError(f"{where}: a mixing lambda without a partner index")
        return FkdRecord(coords.float(), flips, None, None, None, logits)
    index = torch.as_tensor(index).reshape(-1).long()
    if bbox is None:
        raise FkdFormatError(f"{where}: mixing without a box is MixUp, which stored labels do not replay "
                             "(relabel with --mix-type cutmix)")
    try:
        box = tuple(int(v) for v in bbox)
    except (TypeError, ValueError):
        box = ()
    if index.shape[0] != n or len(box) != 4 or not isinstance(lam, (int, float, np.floating, np.integer)):
        raise FkdFormatError(f"{where}: mix_index [B], mix_lam (a number) and mix_bbox (4 ints) expected, got "
                             f"{_describe(index)}, {type(lam).__name__}, {bbox!r}")
    if not math.isfinite(float(lam)):
        raise FkdFormatError(f"{where}: mix_lam is {lam}")
    return FkdRecord(coords.float(), flips, index, float(lam), box, logits)  # type: ignore[arg-type]


def save_record(rec: FkdRecord) -> bytes:
    """FkdRecord -> the bytes of a record file, in SRe2L's list order. Lambda and box are plain
    Python numbers (loadable with ``weights_only=True`` and no allow-list)."""
    buf = io.BytesIO()
    torch.save([rec.coords.to(torch.float32), rec.flips.bool(), rec.mix_index,
                None if rec.mix_lam is None else float(rec.mix_lam),
                None if rec.mix_bbox is None else [int(v) for v in rec.mix_bbox], rec.logits], buf)
    return buf.getvalue()


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1][:200] if lines else type(e).__name__


def _describe(x: object) -> str:
    return f"tensor {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
