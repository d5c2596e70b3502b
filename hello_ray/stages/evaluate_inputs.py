"""What evaluate reads and checks before it trains: the floor rows' real images (read by id, only
those kept) and the class counts and stored-labels artifacts of its inputs (``Run.start`` calls
:func:`check_stored_labels` before any stage runs)."""
from __future__ import annotations

import logging

import numpy as np

from hello_ray.config import Config, ConfigError
from hello_ray.labels import StoredLabels, check_classes, parse_strategy

log = logging.getLogger("hello_ray.evaluate")


def _uses_teacher(cfg: Config) -> bool:
    """Whether a strategy of the grid labels with the teachers (teacher, stored)."""
    ev = cfg.evaluate
    specs = ev.strategies + ev.continual_strategies + (ev.floor_strategies if ev.floor else [])
    return bool({parse_strategy(s)[0] for s in specs} & {"teacher", "stored"})


#: Candidates read per class beyond ``ipc``: under ``data.on_corrupt=skip`` an undecodable pick
#: gives its place to the next one, as it did when every image was decoded first.
FLOOR_SPARE = 8


def pick_floor(rows, num_classes: int, ipc: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class the ipc rows of ``rows`` whose seeded order (:func:`hello_ray.data.subset.sample_order`,
    location-independent) is smallest, in that order (memory = ipc x classes images).

    rows: decoded {"image": uint8 [S, S, 3], "label", "id"}. -> (uint8 [N, S, S, 3], labels [N]).
    """
    from hello_ray.data.subset import sample_order

    best: dict[int, list[tuple[bytes, np.ndarray]]] = {c: [] for c in range(num_classes)}
    for batch in rows.iter_batches(batch_size=256, batch_format="numpy"):
        for img, lab, rid in zip(batch["image"], batch["label"], batch["id"]):
            keep = best[int(lab)]
            keep.append((sample_order(seed, rid), img))
            if len(keep) > ipc:
                keep.sort(key=lambda t: t[0])
                keep.pop()
    images, labels = [], []
    for c in range(num_classes):
        for _, img in sorted(best[c], key=lambda t: t[0]):
            images.append(img)
            labels.append(c)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def sample_floor(data, store, num_classes: int, ipc: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The floor rows' images: ipc random real training images per class, reading only those. The
    split is listed with a seeded per-class sample of ipc + FLOOR_SPARE rows (``load_split(sample=)``:
    decided from the listing or the label columns, before any image is read), the same order
    :func:`pick_floor` keeps; only those rows are read and decoded."""
    from hello_ray.data.decode import decoded_split
    from hello_ray.data.sources import load_split

    split = load_split(data, data.train_split, store, sample=(ipc + FLOOR_SPARE, seed))
    return pick_floor(decoded_split(split, data, columns=["image", "label", "id"]), num_classes, ipc, seed)


#: The most decoded bytes ``evaluate.full_data`` holds in the driver and each worker (CIFAR-100's
#: 50,000 images at 32 px are 150 MiB; ImageNet-1K's at 224 px, 188 GiB).
FULL_DATA_MAX_BYTES = 8 * 2**30


def load_full(data, store, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole training split, decoded (``evaluate.full_data``): uint8 [N, S, S, 3], labels [N], in
    each class's seeded order. It is held in memory: for small sets (the demo's digits, CIFAR); a split
    over ``FULL_DATA_MAX_BYTES`` decoded is refused before any image is read (give
    ``evaluate.full_top1`` instead)."""
    from hello_ray.data.decode import decoded_split
    from hello_ray.data.sources import load_split

    split = load_split(data, data.train_split, store)
    check_full_size(data, split)
    return pick_floor(decoded_split(split, data, columns=["image", "label", "id"]), num_classes, 1 << 62, 0)


def check_full_size(data, split) -> None:
    """``evaluate.full_data`` on a split too large to hold decoded: a ConfigError naming the key."""
    if split.num_rows is not None and split.num_rows * data.image_size ** 2 * 3 > FULL_DATA_MAX_BYTES:
        raise ConfigError(f"config key 'evaluate.full_data': the training split {data.train_split!r} holds "
                          f"{split.num_rows:,} images, {split.num_rows * data.image_size ** 2 * 3 / 2**30:,.1f} GiB "
                          f"decoded at {data.image_size} px, more than the {FULL_DATA_MAX_BYTES / 2**30:g} GiB "
                          "the full-data rows hold in memory; give its top-1 as evaluate.full_top1 instead "
                          "(DD-Ranking's for ImageNet-1K ResNet-18: 0.565)")


def check_sources(cfg: Config, store, n_images: int | None = None) -> None:
    """Before any stage runs (``runner.Run.start``): what evaluate reads besides the artifacts the
    recipe makes: the imported stored labels (:func:`check_stored_labels`) and, for
    ``evaluate.full_data``, whether the training split fits in memory (listing only, no image read)."""
    check_stored_labels(cfg, store, n_images)
    if cfg.evaluate.full_data:
        from hello_ray.data.sources import load_split

        check_full_size(cfg.data, load_split(cfg.data, cfg.data.train_split, store))


def _adapter_classes(store, key: str) -> int:
    from hello_ray.models.adapter import read_adapter_json

    return len(read_adapter_json(store.download(key))["class_names"])


def _teacher_classes(store, key: str) -> int:
    from hello_ray.formats.trajectory import load_trajectory

    return int(load_trajectory(store, key)["num_classes"])


def check_stored_labels(cfg: Config, store, n_images: int | None = None) -> None:
    """Before any stage runs (``pipeline.Run.start``): ``evaluate.stored_labels`` names a finished
    labels artifact, and, where the image count is already known (an external set's listing), one
    made for that many images."""
    key = cfg.evaluate.stored_labels
    if not key:
        return
    from hello_ray.labels import LabelError

    try:
        meta = StoredLabels(store, key).meta
    except LabelError as e:
        raise ConfigError(f"config key 'evaluate.stored_labels': {e}; import records with "
                          "hello-ray labels-import") from None
    if n_images is not None and meta["n_images"] != n_images:
        raise ConfigError(f"config key 'evaluate.stored_labels': {key} labels {meta['n_images']} images, the "
                          f"distilled set has {n_images}")


def check_imported_labels(store, key: str, n_images: int, num_classes: int, images_key: str) -> None:
    """``evaluate.stored_labels``: the imported labels must index this image set's images and classes."""
    meta = StoredLabels(store, key).meta
    if meta["n_images"] != n_images:
        raise ConfigError(f"config key 'evaluate.stored_labels': {key} labels {meta['n_images']} images, the "
                          f"image set {images_key} has {n_images}; import the records for this image set")
    check_classes(int(meta["num_classes"]), num_classes, f"stored labels {key}")
    made_for = store.manifest(key).get("inputs", {}).get("images")
    if made_for != images_key:
        log.warning("[evaluate] stored labels %s were imported for image set %s; replaying them on %s (same "
                    "image count)", key, made_for, images_key)


def validate_inputs(cfg: Config, store, inputs: dict[str, str], image_classes: int, dataset_classes: int) -> None:
    """Every class count must match the dataset's before any training starts."""
    check_classes(image_classes, dataset_classes, f"image set {inputs['images']}")
    bases = {parse_strategy(s)[0] for s in cfg.evaluate.strategies + cfg.evaluate.continual_strategies}
    if _uses_teacher(cfg):
        check_classes(_teacher_classes(store, inputs["teachers"]), dataset_classes,
                      f"teachers artifact {inputs['teachers']}")
        if cfg.evaluate.teacher_labels == "observer":
            from hello_ray.models.ensemble import check_observer

            check_observer(store, inputs["teachers"], cfg.teachers.observer)
    if "projector" in bases:
        check_classes(_adapter_classes(store, inputs["transfer"]), dataset_classes,
                      f"adapter of transfer artifact {inputs['transfer']}")
