"""Dataset sources -> ``ray.data.Dataset`` rows ``{"image": bytes, "label": int64, "id": str}``
plus the ordered class names.

Layouts under the dataset root (local path, ``file://`` or ``s3://``), for split ``train``:

- **imagefolder**: ``<root>/train/<class>/**/*.{jpg,jpeg,png,...}``; classes are the sorted
  folder names (torchvision's ImageFolder order), ids the file paths.
- **parquet**: ``<root>/train-*.parquet``, ``<root>/train.parquet`` or ``<root>/train/*.parquet``
  with an image column (bytes, or the Hugging Face struct ``{"bytes", "path"}``) and an integer
  label column; ids are ``<shard>:<row>``. Class names from ``data.class_names`` (a list), else a
  ``classes.json`` / ``class_names.json`` beside the shards (a list, or a mapping with key
  ``class_names``/``classes``/``names``), else the ClassLabel names Hugging Face stores in the
  shard metadata, else ``"0".."K-1"``.
- **webdataset**: ``<root>/train-*.tar`` or ``<root>/train/*.tar``, samples ``<key>.jpg|png|...``
  + ``<key>.cls``; ids are ``<shard>:<key>``. Class names as for parquet; without any, one
  label-only pass over the tars finds the classes.

Checks before any image is read where the layout allows it (ImageFolder listing, parquet label
columns): an empty class -> EmptyClassError, a label outside the class list -> DataError naming
shard and row. ``data.max_per_class`` keeps the first N images of each class in dataset order
(sorted paths; shard order then row / tar order). ImageNet synset folders get readable names
(classnames.py). ``data.class_names`` as a mapping class key (folder name) -> name is resolved
against the classes found (``resolve_class_names``); the pairing used is logged either way. Reading is lazy: the images stream when the dataset is consumed.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hello_ray.config import DataConfig
from hello_ray.data.classnames import CLASS_FILES, pairing_line, resolve_class_names
from hello_ray.data.subset import keep_per_class, sample_order
from hello_ray.data.errors import ClassMismatchError, DataError, EmptyClassError, data_errors
from hello_ray.data.images import is_image_file
from hello_ray.data.io_retry import retry_io
from hello_ray.data.readers import (ROWS_PER_BATCH, ReadFiles, ReadParquetShards, ReadTarShards,
                                    display_path, null_label_error, parquet_errors, read_attempts)

if TYPE_CHECKING:  # annotations only: importing ray here would slow every import of the module
    import ray

log = logging.getLogger(__name__)

FORMATS = ("imagefolder", "parquet", "webdataset")
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "image_bytes")
LABEL_COLUMNS = ("label", "labels", "cls", "class", "target")


@dataclass
class DatasetSplit:
    """One split of a dataset: lazy rows + the ordered class names (label i = class_names[i])."""

    ds: "ray.data.Dataset"  # rows {"image": bytes, "label": int64, "id": str}
    class_names: list[str]
    source: str  # the URI it was read from (dataset root)
    split: str = ""
    format: str = ""
    class_keys: list[str] = field(default_factory=list)  # raw class ids (folder names, synsets)
    num_rows: int | None = None  # known without reading images (all but unlisted webdataset)
    counts: list[int] | None = None  # images per class, when known
    # What ``ds`` reads and how: one row per image file (imagefolder) or per shard (parquet,
    # webdataset), and the reader that turns such a listing into rows (``ds = read(listing)``).
    listing: "ray.data.Dataset | None" = None
    read: "Callable[[ray.data.Dataset], ray.data.Dataset] | None" = None


def shuffled_files(split: DatasetSplit) -> DatasetSplit:
    """The split read from its listing shuffled again at every pass: the order of the files
    (imagefolder: every image; parquet / webdataset: the shards), not of the bytes. A pass starts
    as soon as its first file is read, and moves no image between nodes; a reader's local shuffle
    buffer mixes the rows of a shard (the teachers' ``iter_torch_batches``). ImageNet-style trainers
    do the same (a shuffled file list or shard list, a bounded buffer)."""
    if split.listing is None or split.read is None:
        raise ValueError(f"split {split.split!r} of {split.source}: no file listing to shuffle")
    return dataclasses.replace(split, ds=split.read(split.listing.random_shuffle()))


@dataclass
class _Layout:
    format: str
    files: list[str]  # shard paths (parquet/webdataset) or [split folder] (imagefolder)
    meta_dirs: list[str]  # where a classes.json may sit


def _fs_for(uri: str, store) -> tuple[pafs.FileSystem, str]:
    """The dataset's filesystem; an S3 store lends its endpoint, timeouts and attempts."""
    from hello_ray.store import resolve_filesystem

    net = {k: getattr(store, k) for k in ("timeout", "max_attempts") if hasattr(store, k)}
    return resolve_filesystem(uri, getattr(store, "endpoint_url", None), **net)


def _list(fs: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    return fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))


def _shards(entries: list[pafs.FileInfo], prefix: str | None, ext: str) -> list[str]:
    """Files ``<prefix>-*.ext`` / ``<prefix>_*.ext`` / ``<prefix>.ext`` (or all ``*.ext``)."""
    out = []
    for e in entries:
        if e.type != pafs.FileType.File or not e.base_name.lower().endswith(ext):
            continue
        stem = e.base_name[: -len(ext)]
        if prefix is None or stem == prefix or stem.startswith((f"{prefix}-", f"{prefix}_")):
            out.append(e.path)
    return sorted(out)


def detect_layout(fs: pafs.FileSystem, root: str, split: str, fmt: str = "auto") -> _Layout:
    """Find split ``split`` under ``root``; DataError saying what was found and expected."""
    root = root.rstrip("/")
    where = display_path(fs, root)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise DataError(f"dataset root {where} does not exist or is not a folder")
    top = _list(fs, root)
    split_dir = posixpath.join(root, split)
    inner = _list(fs, split_dir) if any(
        e.base_name == split and e.type == pafs.FileType.Directory for e in top) else []
    found: dict[str, _Layout] = {}
    for name, ext in (("parquet", ".parquet"), ("webdataset", ".tar")):
        files = _shards(top, split, ext) or _shards(inner, None, ext)
        if files:
            found[name] = _Layout(name, files, [posixpath.dirname(files[0]), root])
    if any(e.type == pafs.FileType.Directory for e in inner):
        found["imagefolder"] = _Layout("imagefolder", [split_dir], [split_dir, root])
    if fmt != "auto" and fmt in found:
        return found[fmt]
    if fmt == "auto" and found:
        return found[next(f for f in FORMATS[::-1] if f in found)]  # shards beat folders
    seen = sorted(e.base_name + ("/" if e.type == pafs.FileType.Directory else "") for e in top)
    seen_s = ", ".join(seen[:20]) + (f" ... (+{len(seen) - 20})" if len(seen) > 20 else "")
    want = {
        "imagefolder": f"{where}/{split}/<class>/*.jpg",
        "parquet": f"{where}/{split}-*.parquet or {where}/{split}/*.parquet",
        "webdataset": f"{where}/{split}-*.tar or {where}/{split}/*.tar",
    }
    expected = want[fmt] if fmt != "auto" else "; ".join(f"{k}: {v}" for k, v in want.items())
    raise DataError(f"no {fmt if fmt != 'auto' else 'known'} layout for split {split!r} in {where}: "
                    f"found [{seen_s or 'nothing'}]; expected {expected}")


def _read_class_file(fs: pafs.FileSystem, dirs: list[str]) -> tuple[list[str], str] | None:
    for d in dirs:
        for name in CLASS_FILES:
            path = posixpath.join(d, name)
            if fs.get_file_info(path).type != pafs.FileType.File:
                continue
            where = display_path(fs, path)
            try:
                obj = json.loads(retry_io(lambda: read_all(fs, path), where, read_attempts(fs)))
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON: {e}") from None
            if isinstance(obj, dict):
                obj = next((obj[k] for k in ("class_names", "classes", "names") if k in obj), None)
            if not isinstance(obj, list) or not all(isinstance(x, str) for x in obj) or not obj:
                raise DataError(f"{where}: expected a list of class names (or a mapping with "
                                "'class_names'), e.g. [\"cat\", \"dog\"]")
            return [str(x) for x in obj], where
    return None


def read_all(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole of one file of ``fs`` (one stream, no temporary copy)."""
    with fs.open_input_stream(path) as f:
        return f.read()


def _check_counts(counts: np.ndarray, names: list[str], where: str) -> None:
    for c, n in enumerate(counts):
        if n == 0:
            raise EmptyClassError(names[c], where)


def _blocks(table: pa.Table, rows: int = ROWS_PER_BATCH) -> list[pa.Table]:
    return [table.slice(i, rows) for i in range(0, max(table.num_rows, 1), rows)]


# ------------------------------------------------------------------------------ the formats

def _imagefolder(fs, layout: _Layout, data: DataConfig, split: str, sample: tuple[int, int] | None) -> dict:
    import ray

    split_dir = layout.files[0]
    where = display_path(fs, split_dir)
    entries = _list(fs, split_dir, recursive=True)
    classes = sorted(e.base_name for e in entries
                     if e.type == pafs.FileType.Directory and posixpath.dirname(e.path) == split_dir)
    index = {c: i for i, c in enumerate(classes)}
    per_class: list[list[str]] = [[] for _ in classes]
    for e in entries:
        if e.type == pafs.FileType.File and is_image_file(e.base_name):
            rel = e.path[len(split_dir) + 1:]
            if "/" in rel:  # files directly in the split folder belong to no class
                per_class[index[rel.split("/", 1)[0]]].append(e.path)
    for c, files in enumerate(per_class):
        if not files:
            raise EmptyClassError(classes[c], f"{where}/{classes[c]}")
    cap = data.max_per_class or None
    paths, labels, counts = [], [], []
    for c, files in enumerate(per_class):
        chosen = sorted(files)[:cap]
        if sample is not None:
            n, seed = sample
            chosen = sorted(sorted(chosen, key=lambda p: sample_order(seed, display_path(fs, p)))[:n])
        paths += chosen
        labels += [c] * len(chosen)
        counts.append(len(chosen))
    table = pa.table({"path": paths, "label": pa.array(labels, pa.int64())})
    listing = ray.data.from_arrow(_blocks(table))

    def read(files: "ray.data.Dataset") -> "ray.data.Dataset":
        return files.map_batches(ReadFiles(fs), batch_size=ROWS_PER_BATCH, batch_format="numpy",
                                 num_cpus=data.cpus_per_task)

    return dict(ds=read(listing), class_keys=classes, num_rows=len(paths), counts=counts, listing=listing,
                read=read)


def _parquet_columns(fs, shard: str) -> tuple[str, str, list[str] | None]:
    """(image column, label column, Hugging Face ClassLabel names or None) of a shard."""
    where = display_path(fs, shard)

    def read_schema() -> pa.Schema:
        with fs.open_input_file(shard) as f, parquet_errors(where):
            return pq.read_schema(f)

    schema = retry_io(read_schema, where, read_attempts(fs))
    image_col = next((c for c in IMAGE_COLUMNS if c in schema.names), None)
    label_col = next((c for c in LABEL_COLUMNS if c in schema.names), None)
    if image_col is None or label_col is None:
        raise DataError(f"parquet shard {where}: needs an image column (one of {IMAGE_COLUMNS}) and a "
                        f"label column (one of {LABEL_COLUMNS}); has {schema.names}")
    t = schema.field(image_col).type
    if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)
            or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)):
        raise DataError(f"parquet shard {where}: image column {image_col!r} has type {t}; expected "
                        "binary or a struct with a 'bytes' field (Hugging Face Image)")
    if not pa.types.is_integer(schema.field(label_col).type):
        raise DataError(f"parquet shard {where}: label column {label_col!r} has type "
                        f"{schema.field(label_col).type}; expected integers")
    hf_names = None
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta:
        try:
            feat = json.loads(meta)["info"]["features"][label_col]
            hf_names = list(feat["names"]) if feat.get("names") else None
        except (KeyError, TypeError, ValueError):
            hf_names = None
    return image_col, label_col, hf_names


def _parquet(fs, layout: _Layout, data: DataConfig, split: str, names: list[str] | None,
             names_from: str | None, sample: tuple[int, int] | None) -> dict:
    import ray

    shards = layout.files
    image_col, label_col, hf_names = _parquet_columns(fs, shards[0])

    def labels_of(shard: str) -> np.ndarray:
        where = display_path(fs, shard)

        def read() -> pa.ChunkedArray:
            with fs.open_input_file(shard) as f, parquet_errors(where):
                schema = pq.read_schema(f)
                if label_col not in schema.names:  # the first shard's columns name the others'
                    raise DataError(f"parquet shard {where}: has no label column {label_col!r} (the "
                                    f"first shard's); has {schema.names}")
                return pq.read_table(f, columns=[label_col])[label_col]

        column = retry_io(read, where, read_attempts(fs))
        null = null_label_error(where, column, label_col)
        if null is not None:
            raise null
        if not pa.types.is_integer(column.type):
            raise DataError(f"parquet shard {where}: label column {label_col!r} has type {column.type}; "
                            "expected integers")
        return column.to_numpy()

    with cf.ThreadPoolExecutor(16) as pool:  # label columns only: a few KB per shard
        per_shard = list(pool.map(labels_of, shards))
    if names is None and hf_names:
        names, names_from = hf_names, f"{display_path(fs, shards[0])} (Hugging Face metadata)"
    all_labels = np.concatenate(per_shard) if per_shard else np.empty(0, np.int64)
    if names is None:
        names = [str(i) for i in range(int(all_labels.max()) + 1 if len(all_labels) else 0)]
    for shard, lab in zip(shards, per_shard):
        bad = np.flatnonzero((lab < 0) | (lab >= len(names)))
        if len(bad):
            r = int(bad[0])
            raise DataError(f"parquet shard {display_path(fs, shard)} row {r}: label {int(lab[r])} is "
                            f"outside the {len(names)} classes [0, {len(names) - 1}]"
                            + (f" of {names_from}" if names_from else "")
                            + f" ({len(bad)} such rows in this shard)")
    counts = np.bincount(all_labels, minlength=len(names))
    _check_counts(counts, names, f"{display_path(fs, posixpath.dirname(shards[0]))} "
                  f"({len(shards)} {split} shards)")
    keep = None
    if data.max_per_class or sample is not None:
        mask = keep_per_class(all_labels, None, data.max_per_class)
        if sample is not None:  # ids as the reader names rows: "<shard>:<row>"
            ids = [f"{display_path(fs, sh)}:{r}" for sh, lab in zip(shards, per_shard) for r in range(len(lab))]
            rows = np.flatnonzero(mask)
            sub = keep_per_class(all_labels[rows], [ids[i] for i in rows], sample[0], sample[1])
            mask = np.zeros_like(mask)
            mask[rows[sub]] = True
        offsets = np.cumsum([0] + [len(x) for x in per_shard])
        keep = {s: np.flatnonzero(mask[offsets[i]:offsets[i + 1]]) for i, s in enumerate(shards)}
        counts = np.bincount(all_labels[mask], minlength=len(names))
    listing = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))

    def read(shard_list: "ray.data.Dataset") -> "ray.data.Dataset":
        return shard_list.map_batches(ReadParquetShards(fs, image_col, label_col, keep), batch_size=1,
                                      batch_format="numpy", num_cpus=data.cpus_per_task)

    return dict(ds=read(listing), class_keys=list(names), num_rows=int(counts.sum()),
                counts=[int(c) for c in counts], listing=listing, read=read)


def _webdataset(fs, layout: _Layout, data: DataConfig, split: str, names: list[str] | None,
                sample: tuple[int, int] | None) -> dict:
    import ray

    shards = layout.files

    def shard_ds() -> "ray.data.Dataset":
        return ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))

    keep, counts, num_rows = None, None, None
    if names is None or data.max_per_class or sample is not None:
        # The labels live inside the tars: one pass reading only the .cls members' values.
        index = shard_ds().map_batches(
            ReadTarShards(fs, len(names) if names else None, labels_only=True),
            batch_size=1, batch_format="numpy", num_cpus=data.cpus_per_task,
        ).select_columns(["label", "id"], num_cpus=data.cpus_per_task)
        with data_errors():
            rows = index.to_pandas()  # in shard order: from_items + map keep block order
        labels = rows["label"].to_numpy(np.int64)
        if names is None:
            names = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
        cnt = np.bincount(labels, minlength=len(names))
        _check_counts(cnt, names, f"{display_path(fs, posixpath.dirname(shards[0]))} "
                      f"({len(shards)} {split} shards)")
        if data.max_per_class or sample is not None:
            mask = keep_per_class(labels, None, data.max_per_class)
            if sample is not None:
                sel = np.flatnonzero(mask)
                sub = keep_per_class(labels[sel], [str(i) for i in rows["id"].to_numpy()[sel]], *sample)
                mask = np.zeros_like(mask)
                mask[sel[sub]] = True
            keep = set(rows["id"][mask])
            cnt = np.bincount(labels[mask], minlength=len(names))
        counts, num_rows = [int(c) for c in cnt], int(cnt.sum())
    n_classes = len(names)

    def read(shard_list: "ray.data.Dataset") -> "ray.data.Dataset":
        return shard_list.map_batches(ReadTarShards(fs, n_classes, keep), batch_size=1,
                                      batch_format="numpy", num_cpus=data.cpus_per_task)

    listing = shard_ds()
    return dict(ds=read(listing), class_keys=list(names), num_rows=num_rows, counts=counts, listing=listing,
                read=read)


# ------------------------------------------------------------------------------ entry points

def dataset_root(data: DataConfig, store=None) -> str:
    """The URI of the dataset: ``data.source``, or the demo artifact for ``source=demo``."""
    if data.source == "demo":
        if store is None:
            raise DataError("data.source=demo needs an artifact store to hold the demo shards; "
                            "pass store=open_store(cfg.store)")
        from hello_ray.data.demo import ensure_demo_dataset

        return ensure_demo_dataset(store)
    return data.source


def load_split(data: DataConfig, split: str, store=None, sample: tuple[int, int] | None = None) -> DatasetSplit:
    """One split (``data.train_split`` / ``data.val_split`` or any name) as a lazy Ray dataset.

    ``data.max_per_class`` applies to the training split only. ``sample=(n, seed)`` then keeps a
    seeded random ``n`` of each class (:mod:`hello_ray.data.subset`), decided from the listing or
    label columns before any image is read (select's ``mipc``).

    ``store`` is needed for ``source=demo``; its S3 endpoint is also used for the dataset.
    """
    from hello_ray.runtime import ensure_ray

    ensure_ray()
    uri = dataset_root(data, store)
    fs, root = _fs_for(uri, store)
    layout = detect_layout(fs, root, split, "parquet" if data.source == "demo" else data.format)
    if split != data.train_split:  # max_per_class caps training images only
        data = dataclasses.replace(data, max_per_class=0)
    # A list of names stands for the classes themselves (parquet / webdataset class keys); a
    # mapping names the classes the split already has, so those are found first, then resolved.
    listed = data.class_names if isinstance(data.class_names, list) else []
    names: list[str] | None = list(listed) or None
    names_from = "config data.class_names" if names else None
    if names is None and layout.format != "imagefolder":
        found = _read_class_file(fs, layout.meta_dirs)
        if found:
            names, names_from = found
    if layout.format == "imagefolder":
        out = _imagefolder(fs, layout, data, split, sample)
    elif layout.format == "parquet":
        out = _parquet(fs, layout, data, split, names, names_from, sample)
    else:
        out = _webdataset(fs, layout, data, split, names, sample)
    keys = out["class_keys"]
    readable = resolve_class_names(keys, data.class_names, f"split {split!r} of {uri}")
    if isinstance(data.class_names, list) and data.class_names:
        # By position only: a list in the dataset's own label order would silently misname classes.
        log.warning("data: config data.class_names is a list, paired by position with the sorted classes "
                    "of %s split %r: %s; if that is not what you meant, give a mapping class -> name",
                    uri, split, pairing_line(keys, readable))
    else:
        log.info("data: class names of %s split %r (%s): %s", uri, split,
                 "config data.class_names, by class" if data.class_names else "derived",
                 pairing_line(keys, readable))
    log.info("data: %s split %r (%s): %s images, %d classes", uri, split, layout.format,
             out["num_rows"] if out["num_rows"] is not None else "?", len(keys))
    return DatasetSplit(ds=out["ds"], class_names=readable, source=uri, split=split,
                        format=layout.format, class_keys=list(keys), num_rows=out["num_rows"],
                        counts=out["counts"], listing=out["listing"], read=out["read"])


def check_same_classes(train: DatasetSplit, val: DatasetSplit) -> None:
    """ClassMismatchError unless both splits have the same classes in the same order."""
    if train.class_keys != val.class_keys:
        raise ClassMismatchError(train.class_keys, val.class_keys, train.source)


def load_train_val(data: DataConfig, store=None) -> tuple[DatasetSplit, DatasetSplit]:
    """Train and val splits (val is never capped by ``data.max_per_class``), same classes."""
    train = load_split(data, data.train_split, store)
    val = load_split(data, data.val_split, store)
    check_same_classes(train, val)
    return train, val
