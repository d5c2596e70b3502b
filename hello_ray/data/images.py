"""Encoded image bytes <-> uint8 RGB arrays (PIL), and the package's two resize rules.

Resize rule (``fit_square``): scale the shorter side to ``size`` (PIL bilinear, which
antialiases when shrinking) and centre-crop the longer side, as ImageNet evaluation does;
an image that is already ``size x size`` is returned untouched (bit-exact).

Training crop (``decode_random_crop``): a RandomResizedCrop drawn over the *whole* decoded image,
then resized to ``size x size``, as torchvision's ImageNet training recipe does
(pytorch/vision@v0.20.0, references/classification/presets.py, ``ClassificationPresetTrain``:
``RandomResizedCrop(crop_size, interpolation=BILINEAR, antialias=True)`` on the PIL image).
``rrc_box`` draws the box exactly as ``torchvision.transforms.RandomResizedCrop.get_params``
does (same draws, same order, same float32 arithmetic), from an explicit generator.
"""
from __future__ import annotations

import io
import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from hello_ray.data.errors import CorruptImageError

if TYPE_CHECKING:  # torch only where a training crop is drawn: the readers of images stay light
    import torch

# torchvision's ImageFolder extensions, compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _open(data: bytes, where: str, draft: int | None = None) -> Image.Image:
    if not data:
        raise CorruptImageError(where, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if draft is not None and img.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4, 1/8 scale while both sides stay >= draft:
                # big ImageNet JPEGs decode several times faster, the result is still downscaled.
                img.draft("RGB", (draft, draft))
            img.load()  # force the full decode: truncated data fails here, not later
            return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise CorruptImageError(where, f"{type(e).__name__}: {e}".replace("\n", " ")) from None


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Encoded bytes -> [H, W, 3] uint8 RGB (greyscale, palette, CMYK, alpha converted).

    Raises CorruptImageError(where) when the bytes are not a decodable image.
    """
    return np.asarray(_open(data, where))


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """Shorter side -> ``size`` (bilinear), then a centred ``size x size`` crop."""
    w, h = img.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def decode_resized(data: bytes, where: str, size: int) -> np.ndarray:
    """Encoded bytes -> [size, size, 3] uint8 by the package's resize rule (``fit_square``)."""
    return np.asarray(fit_square(_open(data, where, draft=size), size))


def rrc_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
            generator: "torch.Generator") -> tuple[int, int, int, int]:
    """A RandomResizedCrop box (top, left, h, w) over a ``height x width`` image: up to 10 draws of
    an area fraction ~ U(scale) and a log-aspect ~ U(log ratio) (float32, as torchvision draws
    them); the first that fits takes a top and a left offset; else the centre crop with the aspect
    clamped into ``ratio``. With ``generator`` seeded as torch's global RNG, the box equals
    ``RandomResizedCrop.get_params`` for the same image size."""
    import torch

    log_ratio = torch.log(torch.tensor(ratio))  # float32, as the reference computes it
    area = height * width
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]),
                                                   generator=generator)).item()
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def decode_random_crop(data: bytes, where: str, size: int, scale: tuple[float, float],
                       ratio: tuple[float, float], generator: "torch.Generator") -> np.ndarray:
    """Encoded bytes -> [size, size, 3] uint8: ``rrc_box`` over the whole image at its full
    resolution (no JPEG draft: the box is drawn on the image's own size), cropped, then resized
    with PIL bilinear (antialiased), which is what torchvision's ``resized_crop`` does to a PIL image."""
    img = _open(data, where)
    top, left, h, w = rrc_box(img.height, img.width, scale, ratio, generator)
    return np.asarray(img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR))


def encode_png(img: np.ndarray) -> bytes:
    """[H, W, 3] (or [H, W]) uint8 -> PNG bytes (lossless: decode_image gives it back exactly)."""
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_png wants uint8 pixels, got {arr.dtype}")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"encode_png wants [H, W, 3] or [H, W], got shape {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
