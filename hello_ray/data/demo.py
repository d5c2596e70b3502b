"""The bundled demo dataset: scikit-learn's 8x8 digits (1,797 real images, no download).

Each 8x8 image (values 0..16) is scaled to 0..255, upsampled to 32x32 with PIL bilinear
(smooth strokes rather than 4x4 blocks, closer to what the students and CLIP see in real
photos) and repeated to 3 channels. Classes are named "zero".."nine" so the CLIP prompts
read naturally. A stratified 80/20 split with seed 0 gives 1,437 train / 360 val images,
written as 2 parquet shards per split (Hugging Face layout: ``image`` = {"bytes", "path"}
PNG struct, ``label`` int64) + ``classes.json`` into a store artifact ``dataset-demo-<hash>``
that is finalized last, so a crash never leaves a half dataset that looks complete. The
demo is then read by exactly the parquet reader an ImageNet export goes through.
"""
from __future__ import annotations

import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from hello_ray.data.classnames import CLASS_FILES
from hello_ray.data.images import encode_png

log = logging.getLogger(__name__)

DEMO_STAGE = "dataset-demo"
DEMO_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DEMO_CONFIG = {"version": 1, "source": "sklearn.datasets.load_digits", "image_size": 32,
               "resize": "bilinear", "val_fraction": 0.2, "seed": 0, "shards_per_split": 2}


def demo_images(size: int = DEMO_CONFIG["image_size"]) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 [N, size, size, 3] and their labels int64 [N]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # [N, 8, 8]
    big = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                    for im in small])  # [N, size, size]
    return np.repeat(big[..., None], 3, axis=3), digits.target.astype(np.int64)


def demo_split(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Stratified train/val indices (sorted), fixed seed."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, val = train_test_split(idx, test_size=DEMO_CONFIG["val_fraction"], stratify=labels,
                                  random_state=DEMO_CONFIG["seed"])
    return {"train": np.sort(train), "val": np.sort(val)}


def _shard_bytes(images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> bytes:
    pngs = [encode_png(images[i]) for i in idx]
    struct = pa.StructArray.from_arrays(
        [pa.array(pngs, pa.binary()), pa.array([f"digit_{i:04d}.png" for i in idx], pa.string())],
        names=["bytes", "path"])
    table = pa.table({"image": struct, "label": pa.array(labels[idx], pa.int64())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def demo_dataset_key(store) -> str:
    """The key of the demo shards in ``store`` (written there by :func:`ensure_demo_dataset`)."""
    return store.artifact_key(DEMO_STAGE, DEMO_CONFIG)


def ensure_demo_dataset(store) -> str:
    """Write the demo shards into ``store`` unless already there; return the dataset root URI."""
    key = demo_dataset_key(store)
    if store.exists(key):
        store.verify(key)  # Ray Data's parquet reader opens the shards by URI, past get_bytes
        return store.uri_for(key)
    images, labels = demo_images()
    n_shards = DEMO_CONFIG["shards_per_split"]
    summary = {}
    for split, idx in demo_split(labels).items():
        for s, part in enumerate(np.array_split(idx, n_shards)):
            store.put_bytes(key, f"{split}-{s:05d}-of-{n_shards:05d}.parquet",
                            _shard_bytes(images, labels, part))
        summary[split] = int(len(idx))
    store.put_bytes(key, CLASS_FILES[0], json.dumps(DEMO_CLASSES).encode())
    store.finalize(key, DEMO_STAGE, DEMO_CONFIG, {}, summary={**summary, "classes": len(DEMO_CLASSES)})
    log.info("data: wrote the demo dataset (%s) to %s", summary, store.uri_for(key))
    return store.uri_for(key)
