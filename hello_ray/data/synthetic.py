"""ImageNet-shaped synthetic data: a shape fixture for rehearsals and tests, never a dataset to
report accuracy on (its images are smooth noise; the README and ``synthetic.json`` it writes say so).

``write_synthetic(root, classes, ...)`` writes train and val splits of ``classes`` classes named by
real ImageNet-1K synset ids (``n01440764`` ...: :mod:`hello_ray.data.imagenet_wnids`, so class names
resolve exactly as for ImageNet), JPEGs of varied sizes and aspect ratios, some greyscale ('L') and
some CMYK, as ImageNet's own files are, in one of the layouts :mod:`hello_ray.data.sources` reads:

- ``imagefolder``: ``<root>/<split>/<wnid>/<wnid>_<i>.JPEG``;
- ``webdataset``: ``<root>/<split>-<shard:06d>.tar``, samples ``<wnid>_<i>.jpg`` + ``<wnid>_<i>.cls``
  (the label as text), classes shuffled across shards, plus ``<root>/classes.json`` (the wnids, in
  label order) so no label pass is needed to know the classes.

``root`` is a local path, ``file://`` or ``s3://bucket/prefix`` (the endpoint as for the store).
CLI: ``hello-ray synth-data ROOT --classes 1000 --train-per-class 2 --val-per-class 1``.
"""
from __future__ import annotations

import io
import json
import posixpath
import tarfile
from typing import Any, Iterator

import numpy as np
from PIL import Image

from hello_ray.data.classnames import CLASS_FILES, imagenet_wnids

LAYOUTS = ("webdataset", "imagefolder")
# ImageNet-1K's train set has ~0.2 % greyscale and 22 CMYK JPEGs; a fixture needs a few of each
# even when tiny, so every GRAY_EVERY-th image is 'L' and every CMYK_EVERY-th is CMYK.
GRAY_EVERY = 7
CMYK_EVERY = 11
NOTICE = ("Synthetic ImageNet-shaped data written by hello_ray.data.synthetic: smooth random noise "
          "in JPEGs of ImageNet's sizes, modes and class ids. It is a SHAPE FIXTURE for preflight "
          "rehearsals and tests, never a dataset to report accuracy on.")


def synthetic_image(rng: np.random.Generator, min_side: int, max_side: int, mode: str) -> Image.Image:
    """One smooth-noise image of a random size and aspect ratio (3:4 .. 4:3 and beyond, as ImageNet)."""
    short = int(rng.integers(min_side, max_side + 1))
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))            # w / h
    w, h = (int(round(short * aspect)), short) if aspect >= 1 else (short, int(round(short / aspect)))
    cells = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)           # [4,4,3] coarse colours
    img = Image.fromarray(cells, "RGB").resize((w, h), Image.BILINEAR)
    return img if mode == "RGB" else img.convert(mode)


def image_mode(i: int) -> str:
    """The PIL mode of the i-th image written (global index): mostly RGB, some L, some CMYK."""
    if i % CMYK_EVERY == CMYK_EVERY - 1:
        return "CMYK"
    if i % GRAY_EVERY == GRAY_EVERY - 1:
        return "L"
    return "RGB"


def jpeg_bytes(img: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _samples(wnids: list[str], per_class: int, rng: np.random.Generator, min_side: int, max_side: int,
             start: int) -> Iterator[tuple[str, int, bytes, str]]:
    """(sample key, label, JPEG bytes, mode) in a seeded order that mixes the classes."""
    order = [(c, i) for c in range(len(wnids)) for i in range(per_class)]
    for j, k in enumerate(rng.permutation(len(order))):
        c, i = order[k]
        mode = image_mode(start + j)
        yield f"{wnids[c]}_{i:05d}", c, jpeg_bytes(synthetic_image(rng, min_side, max_side, mode)), mode


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0  # reproducible shards: same seed, same bytes
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_synthetic(root: str, classes: int, train_per_class: int = 2, val_per_class: int = 1,
                    layout: str = "webdataset", seed: int = 0, min_side: int = 48, max_side: int = 128,
                    shard_size: int = 1000, endpoint_url: str | None = None) -> dict[str, Any]:
    """Write the fixture under ``root``; returns its metadata (also written as ``synthetic.json``)."""
    from hello_ray.store import resolve_filesystem

    wnids = list(imagenet_wnids())
    if not 1 <= classes <= len(wnids):
        raise ValueError(f"synthetic data: classes must be 1..{len(wnids)} (ImageNet-1K synsets), got {classes}")
    if layout not in LAYOUTS:
        raise ValueError(f"synthetic data: layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if train_per_class < 1 or val_per_class < 1 or shard_size < 1 or not 8 <= min_side <= max_side:
        raise ValueError("synthetic data: per-class counts and shard_size must be >= 1 and "
                         f"8 <= min_side <= max_side (got {min_side}, {max_side})")
    wnids = wnids[:classes]
    fs, base = resolve_filesystem(root, endpoint_url)
    base = base.rstrip("/")
    fs.create_dir(base, recursive=True)
    rng = np.random.default_rng(seed)
    modes: dict[str, int] = {"RGB": 0, "L": 0, "CMYK": 0}
    written: dict[str, dict[str, int]] = {}
    start = 0
    made: set[str] = set()  # class folders created (one request each on S3, not one per image)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        nbytes, shard, members, files = 0, 0, [], 0
        for key, label, data, mode in _samples(wnids, per_class, rng, min_side, max_side, start):
            modes[mode] += 1
            nbytes += len(data)
            if layout == "imagefolder":
                folder = posixpath.join(base, split, wnids[label])
                if folder not in made:
                    fs.create_dir(folder, recursive=True)
                    made.add(folder)
                with fs.open_output_stream(posixpath.join(folder, f"{key}.JPEG")) as f:
                    f.write(data)
                files += 1
                continue
            members += [(f"{key}.jpg", data), (f"{key}.cls", str(label).encode())]
            if len(members) == 2 * shard_size:
                _put(fs, posixpath.join(base, f"{split}-{shard:06d}.tar"), _tar_bytes(members))
                shard, members, files = shard + 1, [], files + 1
        if members:
            _put(fs, posixpath.join(base, f"{split}-{shard:06d}.tar"), _tar_bytes(members))
            files += 1
        start += classes * per_class
        written[split] = {"images": classes * per_class, "files": files, "image_bytes": nbytes}
    meta = {"notice": NOTICE, "layout": layout, "classes": classes, "seed": seed,
            "train_per_class": train_per_class, "val_per_class": val_per_class,
            "sides": [min_side, max_side], "modes": modes, "splits": written}
    if layout == "webdataset":
        _put(fs, posixpath.join(base, CLASS_FILES[0]), json.dumps(wnids).encode())
    _put(fs, posixpath.join(base, "synthetic.json"), json.dumps(meta, indent=1).encode())
    _put(fs, posixpath.join(base, "README.md"), f"# Synthetic fixture\n\n{NOTICE}\n".encode())
    return meta


def _put(fs, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)
