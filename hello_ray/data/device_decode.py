"""Decoding a training batch on the Train worker's own device (``data.decode=worker``).

On a GPU worker, Ray Data streams the encoded bytes and the worker decodes each batch's JPEGs in
one call to ``torchvision.io.decode_jpeg(..., device="cuda")`` (nvJPEG), cuts each image's crop on
the device and resizes it there: the CPUs only read files. Elsewhere (and in the tests) the same
code runs on the CPU. What nvJPEG cannot take (PNG and other formats, some CMYK JPEGs) goes
through PIL on the host, image by image; an image nothing can decode is a
:class:`~hello_ray.data.errors.CorruptImageError` naming it, skipped or raised as ``on_corrupt`` says.

Geometry is that of the CPU path (``images.decode_random_crop``: the RandomResizedCrop box drawn by
``images.rrc_box`` over the whole image; ``images.fit_square`` for the centred square); the resize
is torch's antialiased bilinear rather than PIL's, so pixels differ from the CPU path's by a few
grey levels, as any GPU's arithmetic differs from a CPU's (``compute.use_gpu`` is not in the keys
either).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hello_ray.data.errors import CorruptImageError
from hello_ray.data.images import decode_image, rrc_box

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"


def _host_decode(data: bytes, where: str, device: torch.device) -> torch.Tensor:
    """PIL on the host (raises CorruptImageError naming ``where``) -> uint8 [3, H, W] on ``device``."""
    return torch.tensor(decode_image(data, where)).permute(2, 0, 1).to(device)


def _decode_all(datas: Sequence[bytes], ids: Sequence[str], device: torch.device
                ) -> list[torch.Tensor | CorruptImageError]:
    """Each image as uint8 [3, H, W] on ``device``, or the CorruptImageError naming it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | CorruptImageError] = [None] * len(datas)  # type: ignore[list-item]
    jpegs = [i for i, d in enumerate(datas) if bytes(d[:3]) == JPEG_MAGIC]
    if jpegs:
        raw = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpegs]
        try:  # one batched call; a bad image fails it, and the images are then taken one by one
            decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [None] * len(jpegs)
        for i, img in zip(jpegs, decoded):
            out[i] = img
    for i, (data, where) in enumerate(zip(datas, ids)):
        if out[i] is None or out[i].shape[0] != 3:
            try:
                out[i] = _host_decode(bytes(data), str(where), device)
            except CorruptImageError as e:
                out[i] = e
    return out


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 [3, H', W'] -> uint8 [3, h, w]: antialiased bilinear, rounded."""
    x = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def crop_resize(img: torch.Tensor, size: int, scale: tuple[float, float] | None,
                ratio: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, size, size]: a RandomResizedCrop drawn over the whole image
    (``scale``), or with ``scale=None`` the centred square of ``images.fit_square``."""
    h, w = img.shape[-2:]
    if scale is None:
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        full = img if (h, w) == (size, size) else _resize(img, nh, nw)
        top, left = (nh - size) // 2, (nw - size) // 2
        return full[:, top:top + size, left:left + size]
    top, left, ch, cw = rrc_box(h, w, scale, ratio, generator)
    return _resize(img[:, top:top + ch, left:left + cw], size, size)


def decode_batch(datas: Sequence[bytes], ids: Sequence[str], size: int, device: torch.device,
                 scale: tuple[float, float] | None, generator: torch.Generator,
                 on_corrupt: str = "skip", ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 ) -> tuple[torch.Tensor, np.ndarray]:
    """Encoded images -> (uint8 [M, size, size, 3] on ``device``, bool [N] kept): decoded on the
    device where it can, each cut and resized there (``crop_resize``; boxes from ``generator``, a
    CPU generator, in the batch's order). Corrupt ones are dropped (``on_corrupt="skip"``, one
    warning each) or raised (``"fail"``)."""
    kept, out = np.ones(len(datas), dtype=bool), []
    for i, img in enumerate(_decode_all(datas, ids, device)):
        if isinstance(img, CorruptImageError):
            if on_corrupt == "fail":
                raise img
            log.warning("corrupt image skipped: %s (%s)", img.where, img.reason)
            kept[i] = False
            continue
        out.append(crop_resize(img, size, scale, ratio, generator))
    if not out:
        return torch.zeros(0, size, size, 3, dtype=torch.uint8, device=device), kept
    return torch.stack(out).permute(0, 2, 3, 1).contiguous(), kept  # [M, S, S, 3]
