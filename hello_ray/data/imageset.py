"""The image-set artifact written by select, recover and refine, read by refine and evaluate.

Layout under the artifact key:
  ``images/{i:05d}.png``  one lossless PNG per synthetic image (uint8 RGB)
  ``index.parquet``       one row per image and patch (image, class, patch, source_id, box, score),
                          or per image (image, class) when the writer has no patch index
  ``imageset.json``       {"num_images", "image_size", "class_names", "labels", **meta}

``write_image_set`` does not finalize: the pipeline does, after the stage returns.
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from hello_ray.data.errors import DataError
from hello_ray.data.images import decode_image, encode_png

INDEX = "index.parquet"
META = "imageset.json"
_RESERVED = ("num_images", "image_size", "class_names", "labels")


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, H, W, 3]
    labels: torch.Tensor  # int64 [N]
    class_names: list[str]
    index: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def image_name(i: int) -> str:
    return f"images/{i:05d}.png"


def write_image_set(store, key: str, images: torch.Tensor | np.ndarray,
                    labels: torch.Tensor | np.ndarray | list[int], class_names: list[str],
                    index: pd.DataFrame | None = None, meta: dict | None = None) -> None:
    """Write images uint8 [N, H, W, 3] + labels [N] + index + meta under ``key``."""
    imgs = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)
    labs = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[-1] != 3:
        raise ValueError(f"image set {key}: images must be uint8 [N, H, W, 3], got "
                         f"{imgs.dtype} {imgs.shape}")
    if labs.shape != (imgs.shape[0],):
        raise ValueError(f"image set {key}: {imgs.shape[0]} images but labels of shape {labs.shape}")
    if len(labs) and not (0 <= labs.min() and labs.max() < len(class_names)):
        raise ValueError(f"image set {key}: labels must be in [0, {len(class_names) - 1}]")
    meta = dict(meta or {})
    clash = [k for k in _RESERVED if k in meta]
    if clash:
        raise ValueError(f"image set {key}: meta keys {clash} are written by write_image_set itself")
    if index is None:
        index = pd.DataFrame({"image": np.arange(len(labs)), "class": labs})

    def put(i: int) -> None:
        store.put_bytes(key, image_name(i), encode_png(imgs[i]))

    # Many small objects: upload in parallel (PNG encoding and S3 PUTs both release the GIL).
    with cf.ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(len(imgs))))
    write_image_set_index(store, key, labs, class_names, int(imgs.shape[1]), index, meta)


def write_image_set_index(store, key: str, labels: np.ndarray | list[int], class_names: list[str],
                          image_size: int, index: pd.DataFrame, meta: dict) -> None:
    """The set's ``index.parquet`` and ``imageset.json``, for a writer that stored the PNGs
    (``images/{i:05d}.png``, i < len(labels)) itself, e.g. one image batch at a time."""
    labs = np.asarray(labels).astype(np.int64)
    clash = [k for k in _RESERVED if k in meta]
    if clash:
        raise ValueError(f"image set {key}: meta keys {clash} are written by write_image_set itself")
    buf = io.BytesIO()
    index.to_parquet(buf, index=False)
    store.put_bytes(key, INDEX, buf.getvalue())
    info = {"num_images": int(len(labs)), "image_size": int(image_size),
            "class_names": list(class_names), "labels": labs.tolist(), **meta}
    store.put_bytes(key, META, json.dumps(info, indent=1).encode())


def read_image_set_info(store, key: str) -> dict:
    """A set's ``imageset.json`` (num_images, image_size, class_names, labels and the writer's meta)."""
    try:
        return json.loads(store.get_bytes(key, META))
    except json.JSONDecodeError as e:
        raise DataError(f"image set {key}: {META} is not valid JSON: {e}") from None


def read_images(store, key: str, indices: list[int]) -> list[np.ndarray]:
    """Images ``indices`` of a set, decoded (uint8 [H, W, 3] each): a few of a large set without
    reading the rest (the report's image grid)."""
    def get(i: int) -> np.ndarray:
        return decode_image(store.get_bytes(key, image_name(i)), f"{store.uri_for(key, image_name(i))}")

    with cf.ThreadPoolExecutor(16) as pool:
        return list(pool.map(get, indices))


def load_image_set(store, key: str) -> ImageSet:
    """Read an image set (finished or not yet finalized) back: the exact pixels that were written."""
    info = read_image_set_info(store, key)
    n = info["num_images"]
    arrays = read_images(store, key, list(range(n)))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"image set {key}: images of different shapes {sorted(shapes)}")
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 0, 0, 3, dtype=torch.uint8)
    labels = torch.tensor(info["labels"], dtype=torch.int64)
    if labels.shape[0] != n:
        raise DataError(f"image set {key}: {n} images but {labels.shape[0]} labels in {META}")
    index = pd.read_parquet(io.BytesIO(store.get_bytes(key, INDEX)))
    meta = {k: v for k, v in info.items() if k not in _RESERVED}
    return ImageSet(images=images, labels=labels, class_names=list(info["class_names"]), index=index,
                    meta=meta)
