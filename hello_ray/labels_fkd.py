"""Stored labels <-> FKD label records (SRe2L / LPLD relabel output), both ways.

- :func:`import_fkd`: a folder of ``epoch_<e>/batch_<b>.tar`` records (local, ``file://`` or
  ``s3://``) made for an image set in the store (usually an ``external-*`` set read from the same
  distilled images: image ``i`` = sample ``i`` of torchvision's ImageFolder, the index the records
  count in) -> a ``labels-<hash>`` artifact holding ``labels/stored/`` in our format, which
  ``evaluate.stored_labels=<key>`` replays exactly (the same crops, flips, partners, boxes and fp16
  logits). The images of each batch come from LPLD's ``sampler_indices_epoch.json`` when the folder
  has one, else from SRe2L's seeded sampler (``formats.fkd.sre2l_batches``, seed ``--fkd-seed``).
- :func:`export_fkd`: the unpruned stored labels of an artifact (evaluate's ``labels/stored/``, or an
  imported set) -> records in SRe2L's list format plus LPLD's ``sampler_indices_epoch.json``.

Conventions (formats/fkd.py has the table): crop coords become pixel boxes by Pillow's rounding;
the CutMix box's axes are swapped (SRe2L's bbx runs along rows); lambda: SRe2L stores it as drawn,
we keep the area-corrected weight, so on import it is recomputed from the box, and on export the
area-corrected value is written as ``mix_lam`` (SRe2L's and LPLD's students never use it: the
stored logits label the mixed image). Our batches are not SRe2L's seeded order: SRe2L's own loader,
which rebuilds the order from the seed, would pair exported labels with other images; LPLD's loader
and our importer read ``sampler_indices_epoch.json`` and pair them right. Crops are re-cut with our
resampler (``data/augment.apply_crop_flip``, roi_align) on the same pixel box, not PIL's bilinear
``resized_crop``, so the pixels of a replayed view differ slightly from SRe2L's, not its box.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import posixpath
from typing import Any

import torch

from hello_ray.formats import fkd
from hello_ray.labels import LABELS_DIR, LabelError, RelabelPlan, StoredLabels, _pack, stored_name, write_stored_meta
from hello_ray.views import View

log = logging.getLogger(__name__)
STAGE = "labels"  # the artifact an import writes: labels-<hash>


def _fs(uri: str, store: Any):
    from hello_ray.data.sources import _fs_for

    fs, root = _fs_for(uri, store)
    return fs, root.rstrip("/")


def list_records(fs, root: str, where: str) -> tuple[dict[tuple[int, int], str], str | None]:
    """{(epoch, batch): path} of a record folder and the path of its sampler-index file (or None).
    FkdFormatError when an epoch or a batch is missing from the middle (a partial copy)."""
    import pyarrow.fs as pafs

    records: dict[tuple[int, int], str] = {}
    sampler = None
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root) + 1:]
        if rel == fkd.SAMPLER_INDICES:
            sampler = info.path
        eb = fkd.parse_record_name(rel)
        if eb:
            records[eb] = info.path
    if not records:
        raise fkd.FkdFormatError(f"{where}: no FKD records (epoch_<e>/batch_<b>.tar) found")
    by_epoch: dict[int, list[int]] = {}
    for e, b in records:  # one pass: an ImageNet import holds ~10^5 records
        by_epoch.setdefault(e, []).append(b)
    for e in range(max(by_epoch) + 1):
        batches = sorted(by_epoch.get(e, []))
        if not batches or batches != list(range(len(batches))):
            missing = sorted(set(range(max(batches, default=0) + 1)) - set(batches)) if batches else [0]
            raise fkd.FkdFormatError(f"{where}: missing {fkd.record_name(e, missing[0])} (epochs and batches must "
                                     "run 0, 1, ... without gaps)")
    return records, sampler


def import_fkd(src: str, store: Any, images_key: str, *, seed: int = 42, threads: int = 8) -> str:
    """Import the record folder ``src`` as stored labels of image set ``images_key``; returns the
    ``labels-*`` artifact key (reused when already imported). The folder's epochs, batch counts
    and image order are checked before anything is written; each record's shapes and class count
    as its epoch is converted (a bad record stops the import before the artifact is finalized)."""
    from hello_ray.data.fingerprint import folder_fingerprint
    from hello_ray.data.imageset import read_image_set_info
    from hello_ray.data.readers import display_path
    from hello_ray.data.sources import read_all

    fs, root = _fs(src, store)
    where = display_path(fs, root)
    config = {"fkd": folder_fingerprint(src, store), "seed": seed, "format": "sre2l-batch"}
    inputs = {"images": images_key}
    key = store.artifact_key(STAGE, config, inputs)
    if store.exists(key):
        log.info("[labels] cached: %s", store.uri_for(key))
        return key
    info = read_image_set_info(store, images_key)
    n_images, size, classes = int(info["num_images"]), int(info["image_size"]), len(info["class_names"])
    records, sampler = list_records(fs, root, where)
    n_epochs = max(e for e, _ in records) + 1
    per_epoch = dict.fromkeys(range(n_epochs), 0)
    for e, _ in records:
        per_epoch[e] += 1
    first = fkd.load_record(read_all(fs, records[(0, 0)]), f"{where}/{fkd.record_name(0, 0)}")
    batch_size = int(first.coords.shape[0])
    if sampler:
        order = fkd.split_epoch_indices(fkd.read_sampler_indices(read_all(fs, sampler), display_path(fs, sampler)),
                                        batch_size)
        how = f"LPLD's {fkd.SAMPLER_INDICES}"
    else:
        order = dict(enumerate(fkd.sre2l_batches(n_images, batch_size, n_epochs, seed)))
        how = f"SRe2L's seeded sampler (seed {seed}, {n_images} images, batch {batch_size})"
    plan = RelabelPlan(epochs=n_epochs, batch_size=batch_size, image_size=size, cutmix_alpha=1.0, seed=seed)
    expected = len(plan.kept(n_images)) // n_epochs
    for e, n in per_epoch.items():
        if n != expected or len(order.get(e, [])) != n:
            raise fkd.FkdFormatError(
                f"{where}/epoch_{e}: {n} batch records, but {n_images} images of image set {images_key} in batches "
                f"of {batch_size} make {expected} per epoch, and {how} gives {len(order.get(e, []))}; the records "
                "must cover every image of the set once per epoch (LPLD's pruned 'less label' folders do not)")
    files: dict[str, int] = {}
    name = stored_name(1)

    def view(e: int, b: int) -> tuple[int, View]:
        rel = f"{where}/{fkd.record_name(e, b)}"
        rec = first if (e, b) == (0, 0) else fkd.load_record(read_all(fs, records[(e, b)]), rel)
        return b, record_to_view(rec, order[e][b], size, classes, n_images, rel)

    # One epoch in memory at a time (ImageNet-1K at batch 1024: 1252 records of ~2 MB); the records
    # of an epoch are fetched in parallel (many small objects on S3).
    with cf.ThreadPoolExecutor(threads) as pool:
        for e in range(n_epochs):
            views = list(pool.map(lambda b: view(e, b), range(per_epoch[e])))
            fname = f"{LABELS_DIR}/{name}/epoch_{e:04d}.npz"
            data = _pack(views)
            store.put_bytes(key, fname, data)
            files[fname] = len(data)
    total = write_stored_meta(store, key, plan, n_images, classes, files)
    store.finalize(key, STAGE, config, inputs, {"source": where, "order": how, "epochs": n_epochs,
                                                "batches_per_epoch": expected, "label_bytes": total})
    log.info("[labels] imported %d epochs x %d batches from %s (%s) -> %s", n_epochs, expected, where, how,
             store.uri_for(key))
    return key


def record_to_view(rec: fkd.FkdRecord, index: list[int], image_size: int, num_classes: int, n_images: int,
                   where: str) -> View:
    """One record + its batch's image indices -> our View (boxes in pixels of the stored images)."""
    n = rec.coords.shape[0]
    if len(index) != n:
        raise fkd.FkdFormatError(f"{where}: {n} crops but its batch has {len(index)} images")
    if max(index) >= n_images or min(index) < 0:
        bad = max(index) if max(index) >= n_images else min(index)
        raise fkd.FkdFormatError(f"{where}: image index {bad} outside the image set's {n_images} images")
    if rec.logits.shape[1] != num_classes:
        raise fkd.FkdFormatError(f"{where}: logits for {rec.logits.shape[1]} classes, the image set has {num_classes}")
    box = (0, 0, 0, 0) if rec.mix_bbox is None else fkd.bbox_to_box(rec.mix_bbox)
    if not (0 <= box[0] <= box[2] <= image_size and 0 <= box[1] <= box[3] <= image_size):
        raise fkd.FkdFormatError(f"{where}: CutMix box {rec.mix_bbox} outside a {image_size} px image")
    boxes = fkd.coords_to_boxes(rec.coords, image_size, image_size)
    bad = ((boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > image_size) | (boxes[:, 3] > image_size)
           | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if bad.any():
        k = int(bad.nonzero()[0, 0])
        raise fkd.FkdFormatError(f"{where}: crop {k} (coords {rec.coords[k].tolist()}) is not a box inside a "
                                 f"{image_size} px image: {boxes[k].tolist()}")
    perm = rec.mix_index if rec.mix_index is not None else torch.arange(n)
    if sorted(perm.tolist()) != list(range(n)):
        raise fkd.FkdFormatError(f"{where}: mix_index is not a permutation of the batch")
    return View(index=torch.tensor(index, dtype=torch.int64),
                boxes=boxes,
                flips=rec.flips.bool(), perm=perm.long(), lam=fkd.area_lam(box, image_size, image_size),
                box=torch.tensor(box, dtype=torch.int64), logits=rec.logits.to(torch.float16))


def view_to_record(view: View, image_size: int) -> fkd.FkdRecord:
    """Our View -> an SRe2L record (lambda written area-corrected, see the module docstring)."""
    return fkd.FkdRecord(coords=fkd.boxes_to_coords(view.boxes, image_size, image_size), flips=view.flips.bool(),
                         mix_index=view.perm.long(), mix_lam=float(view.lam),
                         mix_bbox=fkd.box_to_bbox(tuple(int(v) for v in view.box)), logits=view.logits)


def export_fkd(store: Any, key: str, dest: str, *, image_set: str = "distilled",
               image_size: int | None = None) -> dict[str, Any]:
    """Write the unpruned stored labels of artifact ``key`` to ``dest`` as SRe2L records plus LPLD's
    sampler-index file. ``image_size``: the stored images' side the boxes are in (default: read from
    the artifact's ``images`` input, else the relabel plan's crop size)."""
    stored = StoredLabels(store, key, 1, image_set)
    size = image_size or _images_size(store, key) or stored.plan.image_size
    fs, root = _fs(dest, store)
    fs.create_dir(root, recursive=True)
    order: dict[str, list[int]] = {}
    written = 0
    for e in range(stored.plan.epochs):
        views = stored._epoch(e)
        if not views:
            raise LabelError(f"artifact {key}: no stored labels for epoch {e}")
        fs.create_dir(posixpath.join(root, f"epoch_{e}"), recursive=True)
        order[str(e)] = []
        for b in sorted(views):
            data = fkd.save_record(view_to_record(views[b], size))
            with fs.open_output_stream(posixpath.join(root, fkd.record_name(e, b))) as f:
                f.write(data)
            written += len(data)
            order[str(e)] += views[b].index.tolist()
    with fs.open_output_stream(posixpath.join(root, fkd.SAMPLER_INDICES)) as f:
        f.write(json.dumps(order).encode())
    out = {"epochs": stored.plan.epochs, "batch_size": stored.plan.batch_size, "image_size": size,
           "records_bytes": written, "dest": dest}
    log.info("[labels] exported %s/%s to %s: %d epochs, %d record bytes", key, stored.folder, dest,
             stored.plan.epochs, written)
    return out


def _images_size(store: Any, key: str) -> int | None:
    from hello_ray.data.imageset import read_image_set_info

    from hello_ray.store import ArtifactNotFound

    try:
        images = store.manifest(key).get("inputs", {}).get("images")
    except ArtifactNotFound:
        return None
    return int(read_image_set_info(store, images)["image_size"]) if images else None
