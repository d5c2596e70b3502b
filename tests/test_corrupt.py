"""Undecodable images with data.on_corrupt=skip: counted per split and class into the summaries
and the report; a class with no decodable training image fails before training, named.

Real Ray Data over a tiny ImageFolder dataset the test writes (3 classes x 3 PNGs per split)."""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hello_ray.config import load_config
from hello_ray.data.corrupt import SCAN_STAGE, corrupt_summary
from hello_ray.data.errors import EmptyClassError
from hello_ray.data.sources import load_train_val
from hello_ray.store import open_store

CLASSES = ["cat", "dog", "emu"]


def _write(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
                (root / split / name / f"{i}.png").write_bytes(buf.getvalue())


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


def _cfg(tmp_path: Path, *extra: str):
    return load_config("smoke", overrides=[f"store={tmp_path / 'store'}", f"data.source={tmp_path / 'data'}",
                                           "data.image_size=16", *extra])


def test_corrupt_images_are_counted_per_split_and_class_once_per_dataset(ray_local, tmp_path):
    _write(tmp_path / "data")
    _truncate(tmp_path / "data/train/dog/1.png")
    _truncate(tmp_path / "data/val/emu/0.png")
    cfg = _cfg(tmp_path)
    store = open_store(cfg.store)
    train, val = load_train_val(cfg.data, store)
    got = corrupt_summary({"train": train, "val": val}, cfg.data, store)
    assert {r: (c["images"], c["corrupt"], c["per_class"]) for r, c in got.items()} == {
        "train": (9, 1, {"dog": 1}), "val": (9, 1, {"emu": 1})}
    assert got["train"]["examples"][0].startswith(f"{tmp_path}/data/train/dog/1.png (")
    scans = store.list_artifacts(SCAN_STAGE)
    assert len(scans) == 2
    # Another stage over the same files reads the stored counts; an edited split is scanned again.
    assert corrupt_summary({"train": train}, cfg.data, store)["train"] == got["train"]
    assert store.list_artifacts(SCAN_STAGE) == scans
    _truncate(tmp_path / "data/train/cat/2.png")
    train, _ = load_train_val(cfg.data, store)
    assert corrupt_summary({"train": train}, cfg.data, store)["train"]["per_class"] == {"cat": 1, "dog": 1}
    assert corrupt_summary({"train": train}, dataclasses.replace(cfg.data, on_corrupt="fail"), store) == {}


def test_a_class_with_no_decodable_training_image_fails_before_training(ray_local, tmp_path):
    """The teachers stage refuses before Ray Train starts: no run state is written under _ray."""
    from hello_ray.pipeline import Run
    from hello_ray.stages import teachers

    _write(tmp_path / "data")
    for i in range(3):
        _truncate(tmp_path / f"data/train/emu/{i}.png")
    cfg = _cfg(tmp_path)
    store = open_store(cfg.store)
    run = Run(cfg, store)
    with run.writing(teachers, {}) as key:
        with pytest.raises(EmptyClassError, match=rf"class 'emu' has no images in split 'train' of "
                           rf"{tmp_path}/data that decode: its 3 image\(s\) are all undecodable"):
            teachers.run(cfg, store, key, {})
    assert not (tmp_path / "store" / "_ray" / key).exists()
