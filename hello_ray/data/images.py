"""Encoded image bytes <-> uint8 RGB arrays (PIL), and the one resize rule of the package.

Resize rule (``fit_square``): scale the shorter side to ``size`` (PIL bilinear, which
antialiases when shrinking) and centre-crop the longer side, as ImageNet evaluation does;
an image that is already ``size x size`` is returned untouched (bit-exact).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from hello_ray.data.errors import CorruptImageError

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
