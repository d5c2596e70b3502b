"""Stage ``external``: bring your own distilled set (``images.source=external``).

The image source beside RDED's selection and SRe2L / LPLD's recover for a set made elsewhere:
``images.path`` (local, ``file://`` or ``s3://``) holds one folder per class, in RDED's layout,
SRe2L / LPLD's, or any class folders (:mod:`hello_ray.stages.external_core`). The stage writes the
same image-set artifact select writes (``data/imageset.py``), so evaluate runs every label
strategy on it unchanged, with teachers and projector trained on the real data as usual; refine
can refine it like any source set.

1. *map* (driver, listing only: ``check_sources``, called by ``pipeline.Run.start`` before any
   stage runs) - the folders are listed, the layout decided, and every folder mapped to a training
   class (by index, by name or by ``images.class_map``); any mismatch fails here, naming both orders,
   before the teachers train.
2. *read* (driver, ``images.read_threads`` threads: a distilled set is small, reading it is I/O) -
   each image decoded (an undecodable one is an error naming its path: a distilled set missing an
   image is another set), resized to ``data.image_size`` when it differs (``images.resize``; RDED,
   SRe2L and LPLD save at the training size, so their sets pass untouched), written as PNG.
3. *index* - ``index.parquet`` (image, class, folder, file, original height / width) and
   ``imageset.json`` with ``image_source: external`` and the mapping used.

Key: the config slice below, the training split's fingerprint (its classes) and, under
``external``, the listing fingerprint of ``images.path`` (``data/fingerprint.folder_fingerprint``:
every file's path, size and mtime / ETag), so an edited external set is never mistaken for the old.
Image ``i`` is sample ``i`` of torchvision's ImageFolder over the same tree (the index FKD-style
relabel records use, see ``formats/fkd.py``).
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from hello_ray.config import Config, ConfigError, section_dict
from hello_ray.stages import external_core as core

log = logging.getLogger("hello_ray.external")

STAGE = "external"
KIND = "driver"  # the driver's own read threads, no Ray Train run or actor pool
INPUTS: tuple[str, ...] = ()       # nothing of ours: the images come from images.path
DATA_SPLITS = ("train",)           # the classes the folders are mapped to
SOURCES = ("external",)            # the images.source value this stage serves
_RUNTIME_FIELDS = ("read_threads", "source")


def stage_config(cfg: Config) -> dict[str, Any]:
    """What decides the image set: where it is read from, how its folders map, the image size and the
    class names evaluate's projector prompts use (the listing fingerprint joins in Run.stage_config)."""
    images = {k: v for k, v in section_dict(cfg.images).items() if k not in _RUNTIME_FIELDS}
    return {"images": images, "image_size": cfg.data.image_size,
            "class_names": cfg.data.class_names, "train_split": cfg.data.train_split,
            "data_source": cfg.data.source}


def source_fingerprint(cfg: Config, store: Any) -> dict[str, Any]:
    """The listing fingerprint of ``images.path`` (``pipeline.Run.stage_config`` keys on it)."""
    from hello_ray.data.fingerprint import folder_fingerprint

    return folder_fingerprint(cfg.images.path, store)


def check(cfg: Config) -> None:
    """Rules decidable from the config alone: a path in a scheme the store layer reads."""
    if cfg.images.source not in SOURCES:
        return
    path = cfg.images.path
    if "://" in path and not path.startswith(("file://", "s3://")):
        raise ConfigError(f"config key 'images.path': {path!r}: use a local path, file:// or s3://")


def resources(cfg: Config) -> dict[str, float]:
    """The driver's read threads: I/O, one CPU."""
    return {"CPU": 1.0, "GPU": 0.0}


@dataclass
class Plan:
    """What ``check_sources`` found: the listing, its layout and each folder's training class."""
    listing: core.ExternalListing
    layout: str
    classes: list[int]                 # training class index per folder (listing.folders order)
    class_names: list[str]             # the training set's readable names (label order)
    class_keys: list[str]


def before_run(cfg: Config, store: Any, known: dict[str, Any]) -> None:
    """``Run.start``, before any stage: the set listed and mapped now, so a class-order mismatch
    fails before the teachers train; its image count goes into ``known["distilled_images"]`` for the
    stages after it (evaluate's imported labels must be made for that many images)."""
    plan = check_sources(cfg, store)
    if plan is not None:
        known["distilled_images"] = plan.listing.num_images


def check_sources(cfg: Config, store: Any) -> Plan | None:
    """List ``images.path`` and map its folders onto the training classes (no image is read).
    ExternalClassError / DataError naming both orders on any mismatch; None for other sources."""
    if cfg.images.source not in SOURCES:
        return None
    import pyarrow.fs as pafs

    from hello_ray.data.readers import display_path
    from hello_ray.data.sources import _fs_for, _list, load_split

    fs, root = _fs_for(cfg.images.path, store)
    root = root.rstrip("/")
    where = display_path(fs, root)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise core.DataError(f"images.path {where}: not a folder (the external distilled set's root)")
    entries = _list(fs, root, recursive=True)
    listing = core.build_listing(where, root, [e.path for e in entries if e.type == pafs.FileType.File])
    core.add_empty_folders(listing, [e.path for e in entries if e.type == pafs.FileType.Directory], root)
    layout = core.detect_layout(listing.folders, cfg.images.layout, where)
    core.check_file_names(listing, layout)
    train = load_split(cfg.data, cfg.data.train_split, store)       # lazy: the listing, not the images
    classes = core.map_classes(listing.folders, layout, cfg.images.class_order, cfg.images.class_map,
                               train.class_keys, train.class_names, where)
    pairs = ", ".join(f"{f} -> {train.class_keys[c]}" for f, c in list(zip(listing.folders, classes))[:5])
    log.info("[external] %s: %s layout, %d folders, %d images; folders -> training classes: %s%s", where,
             layout, len(listing.folders), listing.num_images, pairs, " ..." if len(classes) > 5 else "")
    return Plan(listing, layout, classes, list(train.class_names), list(train.class_keys))


def run(cfg: Config, store: Any, key: str, inputs: dict[str, str]) -> dict[str, Any]:
    """Read, map and write the external set as the image set of artifact ``key``; the summary."""
    from hello_ray.data.imageset import image_name, write_image_set_index
    from hello_ray.data.images import encode_png
    from hello_ray.data.io_retry import retry_io
    from hello_ray.data.readers import read_attempts
    from hello_ray.data.sources import _fs_for, read_all

    t0 = time.time()
    plan = check_sources(cfg, store)
    if plan is None:
        raise ConfigError(f"config key 'images.source': the external stage reads images.source=external, "
                          f"not {cfg.images.source!r}")
    listing, size = plan.listing, cfg.data.image_size
    fs, _ = _fs_for(cfg.images.path, store)
    attempts = read_attempts(fs)
    todo = [(path, rel, folder_i) for folder_i, (paths, rels) in enumerate(zip(listing.files, listing.rel))
            for path, rel in zip(paths, rels)]

    def one(i: int) -> tuple[int, int]:
        path, rel, _ = todo[i]
        where = f"{listing.root}/{rel}"
        data = retry_io(lambda: read_all(fs, path), where, attempts)
        img, hw = core.decode_external(data, where, size, cfg.images.resize)
        store.put_bytes(key, image_name(i), encode_png(img))
        return hw

    with cf.ThreadPoolExecutor(cfg.images.read_threads) as pool:
        sizes = list(pool.map(one, range(len(todo))))
    labels = np.asarray([plan.classes[f] for _, _, f in todo], dtype=np.int64)
    resized = sum(hw != (size, size) for hw in sizes)
    index = pd.DataFrame({"image": np.arange(len(todo)), "class": labels,
                          "folder": [listing.folders[f] for _, _, f in todo], "file": [r for _, r, _ in todo],
                          "height": [h for h, _ in sizes], "width": [w for _, w in sizes]})
    per_class = np.bincount(labels, minlength=len(plan.class_names))
    meta = {"ipc": int(per_class.max()), "factor": 1, "image_source": "external", "parent": "",
            "external": {"path": listing.root, "layout": plan.layout, "class_order": cfg.images.class_order,
                         "class_map": dict(cfg.images.class_map),
                         "folders": {f: plan.class_keys[c] for f, c in zip(listing.folders, plan.classes)},
                         "resized": int(resized)}}
    write_image_set_index(store, key, labels, plan.class_names, size, index, meta)
    seconds = time.time() - t0
    log.info("[external] %d images of %d classes (%d-%d per class, %d resized to %d px) from %s in %.1f s",
             len(todo), len(per_class), per_class.min(), per_class.max(), resized, size, listing.root, seconds)
    return {"num_images": len(todo), "layout": plan.layout, "path": listing.root, "resized": int(resized),
            "per_class": {plan.class_names[c]: int(n) for c, n in enumerate(per_class)},
            "seconds": round(seconds, 2)}
