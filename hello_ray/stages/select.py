"""Stage ``select``: RDED patch selection as a streaming Ray Data pipeline (METHOD.md stage 2).

The math lives in :mod:`hello_ray.stages.select_core`; this module only feeds and scales it:

1. *read* - ``load_split`` of the training split with ``data.max_per_class`` capped at
   ``select.mipc``: the first ``mipc`` images of each class in dataset order (sorted paths
   for ImageFolder, shard then row order for parquet / webdataset), decided from the
   listing or label columns before any image is read; empty classes fail there, by name.
2. *crop* (CPU tasks) - decode, cut ``num_crop`` seeded crops per image; an undecodable
   image travels on as a marked row (``data.on_corrupt=skip``) or fails the stage (``fail``).
3. *score* (``ObserverScorer`` actors, one GPU each where present) - the observer is loaded
   once per actor; each image leaves as its competing crops' (class, id, crop, box, score,
   patch) rows: usually its best crop only, the other crops' pixels are dropped there.
4. *top-k* (driver) - the rows stream through bounded per-class heaps (classes x k) that
   keep the winners' patches, which are then stitched and written as an image set
   (PNG + index.parquet + imageset.json). The dataset is read once.

Peak memory is set by the batch sizes, the classes x k heaps (with their patches) and the
output image set, never by the number of images in the dataset.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

from hello_ray import placement
from hello_ray.config import Config, ConfigError, data_identity, section_dict
from hello_ray.stages import select_core as core

log = logging.getLogger("hello_ray.select")

STAGE = "select"
KIND = "actors"  # one Ray Data actor pool, sized by pool(cfg) (hello_ray/stages/__init__.py)
INPUTS = ("teachers",)  # the observer; the real images come from cfg.data
DATA_SPLITS = ("train",)  # its fingerprint joins the key (pipeline.Run.stage_config)
# Fields that change how fast the stage runs, not what it selects: left out of the artifact key.
_RUNTIME_FIELDS = ("batch_size", "num_actors", "actor_cpus")


def stage_config(cfg: Config) -> dict[str, Any]:
    """The part of the config that determines the selected image set: the trajectory comes via
    inputs, which of its epochs observes (``teachers.observer``) is keyed here."""
    sel = {k: v for k, v in section_dict(cfg.select).items() if k not in _RUNTIME_FIELDS}
    data = {k: v for k, v in data_identity(cfg.data).items() if k != "val_split"}
    return {"data": data, "select": sel, "observer": cfg.teachers.observer}


def check(cfg: Config) -> None:
    """Rules decidable from the config alone: the patches tile the image exactly."""
    if cfg.data.image_size % cfg.select.factor:
        raise ConfigError(f"config key 'select.factor': image_size {cfg.data.image_size} is not divisible "
                          f"by factor {cfg.select.factor}; patches are image_size // factor pixels")


def pool(cfg: Config) -> tuple[int, float]:
    """The actor pool: (actors, CPUs each). Its bundles, start-up and cores are priced from it."""
    return cfg.select.num_actors, cfg.select.actor_cpus


def pool_reads_data(cfg: Config) -> bool:
    """Whether a Ray Data read task runs beside the actor pool (the preflight's resource bundles)."""
    return True


def resources(cfg: Config) -> dict[str, float]:
    """What the stage holds at once: its scoring actors and a read/crop task feeding them."""
    sel = cfg.select
    return {"CPU": sel.num_actors * sel.actor_cpus + cfg.data.cpus_per_task,
            "GPU": float(sel.num_actors) if cfg.compute.use_gpu else 0.0}


# ---------------------------------------------------------------------------- Ray UDFs

def crop_batch(batch: dict[str, np.ndarray], *, ranks: dict[int, int], image_size: int, on_corrupt: str,
               num_crop: int, crop_size: int, seed: int, crop_source: str = "original",
               max_side: int = 1024) -> Iterator[dict[str, np.ndarray]]:
    """Encoded rows -> per image: label, id, ok, reason, ranks, boxes [K,4], crops uint8 [K,c,c,3].

    ``crop_source="original"`` cuts the crops from the decoded image at its own resolution (longer
    side capped at ``max_side``), as RDED does; ``"resized"`` from the image resized and centre-
    cropped to ``image_size``. With ``on_corrupt="skip"`` an undecodable image stays as a row with
    ``ok=False`` (zero crops) so the driver can report it; with ``"fail"`` it raises, naming it.
    A generator, so an empty batch yields nothing (Ray cannot type an empty tensor column).
    """
    from hello_ray.data.errors import CorruptImageError
    from hello_ray.data.images import decode_image, decode_resized

    placement.record(placement.TASKS)
    n = len(batch["id"])
    if n == 0:
        return
    ids = [str(i) for i in batch["id"]]
    ok = np.ones(n, dtype=bool)
    reasons = np.full(n, "", dtype=object)
    sources: list[np.ndarray] = []
    for i, (data, where) in enumerate(zip(batch["image"], ids)):
        try:
            img = (core.cap_side(decode_image(data, where), max_side) if crop_source == "original"
                   else decode_resized(data, where, image_size))                 # uint8 [H, W, 3]
        except CorruptImageError as e:
            if on_corrupt == "fail":
                raise
            ok[i], reasons[i] = False, e.reason
            img = np.zeros((crop_size, crop_size, 3), np.uint8)                  # a stand-in, never scored
        sources.append(img)
    labels = np.asarray(batch["label"], dtype=np.int64)
    boxes, crops = core.make_crops(sources, ids, num_crop, crop_size, seed)      # [n,K,4], [n,K,c,c,3]
    yield {
        "label": labels,
        "id": np.asarray(ids, dtype=object),
        "ok": ok,
        "reason": reasons,
        "ranks": np.asarray([ranks.get(int(lab), 1) for lab in labels], dtype=np.int64),
        "boxes": boxes.numpy(),
        "crops": crops.numpy(),
    }


def crop_on_device(batch: dict[str, np.ndarray], device: torch.device, *, ranks: dict[int, int],
                   image_size: int, on_corrupt: str, num_crop: int, crop_size: int, seed: int,
                   crop_source: str = "original", max_side: int = 1024) -> dict[str, Any]:
    """``crop_batch`` done where the scoring actor runs (``data.decode=worker``; by default where the
    actors have GPUs): the encoded rows decoded on ``device`` (nvJPEG on a GPU, ``device_decode``),
    the same boxes (``crop_boxes``: same seed, same image id, same source size) cut and resized
    there with the same resize as the CPU tasks. The crops stay on the device for the observer."""
    from hello_ray.data.device_decode import _decode_all, crop_resize
    from hello_ray.data.errors import CorruptImageError

    ids = [str(i) for i in batch["id"]]
    n = len(ids)
    ok = np.ones(n, dtype=bool)
    reasons = np.full(n, "", dtype=object)
    sources: list[torch.Tensor] = []
    for i, img in enumerate(_decode_all(batch["image"], ids, device)):
        if isinstance(img, CorruptImageError):
            if on_corrupt == "fail":
                raise img
            ok[i], reasons[i] = False, img.reason
            sources.append(torch.zeros(crop_size, crop_size, 3, dtype=torch.uint8, device=device))
            continue
        if crop_source == "original":
            sources.append(core.cap_side(img.permute(1, 2, 0), max_side))              # [H, W, 3]
        else:
            sources.append(crop_resize(img, image_size, None, (1.0, 1.0), torch.Generator()).permute(1, 2, 0))
    labels = np.asarray(batch["label"], dtype=np.int64)
    boxes, crops = core.make_crops(sources, ids, num_crop, crop_size, seed)              # [n,K,4], [n,K,c,c,3]
    return {"label": labels, "id": np.asarray(ids, dtype=object), "ok": ok, "reason": reasons,
            "ranks": np.asarray([ranks.get(int(lab), 1) for lab in labels], dtype=np.int64),
            "boxes": boxes.numpy(), "crops": crops}


class ObserverScorer:
    """Ray Data actor: loads the observer once, turns cropped images into scored crop rows.

    Only the competing crops leave the actor (each image's best, more in short classes), with
    their pixels: the driver keeps a class's top-k patches as they stream by, so the dataset is
    read once (a second pass to re-cut the winners would double the I/O of the biggest stage).
    """

    def __init__(self, store: Any, teachers_key: str, image_size: int, show: str, use_gpu: bool,
                 batch_size: int, observer: str = "last", crop: dict[str, Any] | None = None):
        from hello_ray.models.ensemble import load_observer
        from hello_ray.runtime import quiet_library_logs, torch_device

        quiet_library_logs(worker=True)
        placement.record("ObserverScorer")  # the node it runs on: the manifest's summary["nodes"]

        self.device = torch_device(use_gpu)
        self.observer = load_observer(store, teachers_key, self.device, observer=observer)
        self.image_size = image_size
        self.show = show
        self.batch_size = batch_size
        self.crop = crop  # crop_on_device's settings: the rows arrive encoded

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Scored rows: the competing crops of every decoded image (rank 0 = its best crop),
        and one row with ``rank=-1`` and the reason per undecodable image."""
        if self.crop is not None:
            batch = crop_on_device(batch, self.device, **self.crop)
        ok = np.asarray(batch["ok"], dtype=bool)
        crops = torch.as_tensor(batch["crops"])[torch.as_tensor(ok)]            # [n, K, c, c, 3] uint8
        n, k, c = crops.shape[0], crops.shape[1], crops.shape[2]
        labels = np.asarray(batch["label"], dtype=np.int64)[ok]
        scores = core.score_crops(self.observer, crops.reshape(n * k, c, c, 3),
                                  torch.as_tensor(labels).repeat_interleave(k), self.image_size,
                                  self.show, self.batch_size, self.device)       # [n*K]
        rows = core.best_rows(labels, [str(i) for i in np.asarray(batch["id"])[ok]],
                              torch.as_tensor(np.asarray(batch["boxes"])[ok]), scores.view(n, k),
                              np.asarray(batch["ranks"])[ok], crops=crops.cpu())
        rows["reason"] = np.full(len(rows["label"]), "", dtype=object)
        bad = ~ok
        if bad.any():
            m = int(bad.sum())
            extra = {"label": np.asarray(batch["label"], dtype=np.int64)[bad],
                     "id": np.asarray(batch["id"], dtype=object)[bad],
                     "crop": np.full(m, -1, np.int64), "rank": np.full(m, -1, np.int64),
                     **{b: np.zeros(m, np.int64) for b in core.BOX_COLUMNS},
                     "score": np.full(m, np.nan, np.float32),
                     "patch": np.zeros((m, c, c, 3), np.uint8),
                     "reason": np.asarray(batch["reason"], dtype=object)[bad]}
            rows = {key: np.concatenate([rows[key], extra[key]]) for key in rows}
        return rows


# ---------------------------------------------------------------------------- driver

def _empty_class_error(label: int, class_names: list[str], source: str, why: str) -> Exception:
    from hello_ray.data.errors import EmptyClassError

    return EmptyClassError(class_names[label], f"{source} (class index {label}, train split: {why})")


def run(cfg: Config, store: Any, key: str, inputs: dict[str, str]) -> dict[str, Any]:
    """Select, stitch and write the image set of artifact ``key``; return the summary.

    A DataError raised inside a Ray task (a corrupt image with ``data.on_corrupt=fail``)
    reaches the caller as itself, naming the file.
    """
    from hello_ray.data.errors import data_errors

    with data_errors():
        return _run(cfg, store, key, inputs)


def _run(cfg: Config, store: Any, key: str, inputs: dict[str, str]) -> dict[str, Any]:
    import ray.data

    from hello_ray.data.decode import decode_on_worker
    from hello_ray.data.imageset import write_image_set
    from hello_ray.data.sources import load_split
    from hello_ray.models.ensemble import check_observer

    check_observer(store, inputs["teachers"], cfg.teachers.observer)  # here, not in every actor

    sel, data = cfg.select, cfg.data
    size, factor = data.image_size, sel.factor
    crop_size, k = size // factor, sel.ipc * factor * factor
    t0 = time.time()
    phase: dict[str, float] = {}

    # The mipc cut happens where the data module can do it without reading images: a seeded
    # random mipc of each class (RDED), or the first mipc in dataset order.
    if sel.mipc_order == "random":
        split = load_split(data, data.train_split, store, sample=(sel.mipc, sel.seed))
    else:
        cap = sel.mipc if data.max_per_class == 0 else min(sel.mipc, data.max_per_class)
        split = load_split(dataclasses.replace(data, max_per_class=cap), data.train_split, store)
    names = list(split.class_names)
    # Classes with fewer than k images let more than their best crop compete (select_core
    # docstring); when the split cannot count without reading, every crop competes.
    counts = split.counts or [0] * len(names)
    ranks = {c: (core.ranks_needed(n, k, sel.num_crop) if split.counts else sel.num_crop)
             for c, n in enumerate(counts)}

    phase["list"] = time.time() - t0

    images_per_batch = max(1, sel.batch_size // sel.num_crop)  # select.batch_size counts crops
    crop = dict(ranks=ranks, image_size=size, on_corrupt=data.on_corrupt, num_crop=sel.num_crop,
                crop_size=crop_size, seed=sel.seed, crop_source=sel.crop_source, max_side=sel.max_side)
    on_actor = decode_on_worker(data, cfg.compute.use_gpu)  # GPU actors decode and cut the crops themselves
    rows = (split.ds.select_columns(["image", "label", "id"], num_cpus=data.cpus_per_task) if on_actor else
            split.ds.map_batches(crop_batch, batch_format="numpy", num_cpus=data.cpus_per_task, fn_kwargs=crop))
    scored = rows.map_batches(
        ObserverScorer, batch_format="numpy", batch_size=images_per_batch,
        compute=ray.data.ActorPoolStrategy(size=sel.num_actors),
        num_cpus=sel.actor_cpus, num_gpus=1 if cfg.compute.use_gpu else 0,
        fn_constructor_kwargs=dict(store=store, teachers_key=inputs["teachers"], image_size=size,
                                   show=sel.show, use_gpu=cfg.compute.use_gpu, batch_size=sel.batch_size,
                                   observer=cfg.teachers.observer, crop=crop if on_actor else None),
    )

    keeper = core.ClassTopK(len(names), k)
    per_class_read = np.zeros(len(names), dtype=np.int64)
    corrupt: list[tuple[str, str, int]] = []
    for b in scored.iter_batches(batch_size=4096, batch_format="numpy"):
        rank = b["rank"]
        for i in np.flatnonzero(rank < 0):
            corrupt.append((str(b["id"][i]), str(b["reason"][i]), int(b["label"][i])))
        np.add.at(per_class_read, b["label"][rank == 0], 1)
        good = rank >= 0
        keeper.offer_rows({col: b[col][good] for col in b})

    phase["score"] = time.time() - t0 - sum(phase.values())
    skipped = sorted(i for i, _, _ in corrupt)
    for where, reason, _ in sorted(corrupt):
        log.warning("select: undecodable image skipped: %s (%s)", where, reason)
    for label, n in enumerate(per_class_read):
        if n == 0:
            raise _empty_class_error(label, names, split.source,
                                     f"all {counts[label] or ''} image(s) of the class are undecodable")
    images_read = int(sum(per_class_read))
    crops_scored = images_read * sel.num_crop  # every decoded image had all its crops scored

    per_class = [core.fill_to_k(keeper.winners(c), k) for c in range(len(names))]
    pixels = {(c.image_id, c.crop): torch.as_tensor(c.patch) for cands in per_class for c in cands}
    images, labels = core.assemble(per_class, pixels, factor, sel.tile_order)     # [classes*ipc, S, S, 3]
    phase["stitch"] = time.time() - t0 - sum(phase.values())

    index = _index_frame(per_class, sel.ipc, factor, sel.tile_order)
    meta = {"ipc": sel.ipc, "factor": factor, "mipc": sel.mipc, "num_crop": sel.num_crop,
            "show": sel.show, "crop_source": sel.crop_source, "tile_order": sel.tile_order,
            "mipc_order": sel.mipc_order, "seed": sel.seed, "parent": inputs["teachers"], "image_source": "rded",
            "source": split.source}
    write_image_set(store, key, images.numpy(), labels.numpy(), names, index, meta)

    phase["write"] = time.time() - t0 - sum(phase.values())
    seconds = time.time() - t0
    summary = {
        "images_considered": split.num_rows, "images_read": images_read, "crops_scored": crops_scored, "corrupt_skipped": skipped,
        "per_class": {names[c]: int(n) for c, n in enumerate(per_class_read)},
        "repeated_patches": {names[c]: k - len(keeper.winners(c)) for c in range(len(names))
                             if len(keeper.winners(c)) < k},
        "num_images": int(len(images)), "seconds": round(seconds, 2),
        "phase_s": {p: round(v, 2) for p, v in phase.items()},
        "crops_per_s": round(crops_scored / max(seconds, 1e-9), 1),
        "crops_cut_by": "actors" if on_actor else "tasks",
        # The common form of every reading stage (hello_ray/data/corrupt.py), for the report.
        "corrupt": {"train": {"split": data.train_split, "images": images_read + len(corrupt),
                              "corrupt": len(corrupt),
                              "per_class": {names[c]: n for c, n in sorted(Counter(lab for _, _, lab in corrupt).items())},
                              "examples": [f"{i} ({r})" for i, r, _ in sorted(corrupt)[:20]]}},
    }
    counts = list(summary["per_class"].values())
    shown = ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
    log.info("[select] %d images read (%d undecodable skipped%s), %d crops scored, %d classes x %d-%d "
             "images -> %d images of %dx%d patches in %.1f s (%s crops/s)", images_read, len(skipped),
             ": " + shown if skipped else "", crops_scored, len(names), min(counts), max(counts), len(images),
             factor, factor, seconds, summary["crops_per_s"])
    return summary


def _index_frame(per_class: list[list[core.Candidate]], ipc: int, factor: int, order: str) -> pd.DataFrame:
    """One row per synthetic image and patch: where every patch's pixels came from. ``patch`` is
    the tile (r * factor + c), ``class_rank`` the patch's place among its class's winners (0 =
    best; ``select.tile_order`` maps it to image and tile), ``rank`` its crop's rank in its image."""
    rows = []
    for label, cands in enumerate(per_class):
        for p, c in enumerate(cands):
            image, tile = core.tile_of(p, ipc, factor, order)
            rows.append({"image": label * ipc + image, "class": label, "patch": tile, "class_rank": p,
                         "source_id": c.image_id, "crop": c.crop, "rank": c.rank,
                         "x0": c.box[0], "y0": c.box[1], "x1": c.box[2], "y1": c.box[3], "score": c.score})
    return pd.DataFrame(rows)
