"""Ray Data read UDFs: one input row names a file or shard, the output rows are
``{"image": encoded bytes, "label": int64, "id": str}``.

They run in Ray tasks with the pyarrow filesystem the driver resolved (it carries the S3
endpoint and credentials), stream their input (a tar shard is never loaded whole) and yield
batches of at most ``ROWS_PER_BATCH`` rows so blocks stay small.
"""
from __future__ import annotations

import posixpath
import tarfile
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hello_ray.data.errors import DataError

ROWS_PER_BATCH = 256
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")


def display_path(fs: pafs.FileSystem, path: str) -> str:
    """The path as a user would type it (``s3://bucket/key`` on S3)."""
    return f"s3://{path}" if fs.type_name == "s3" else path


def _batch(images: list, labels: list[int], ids: list[str]) -> dict[str, np.ndarray]:
    img = np.empty(len(images), dtype=object)
    img[:] = images
    return {"image": img, "label": np.asarray(labels, dtype=np.int64),
            "id": np.asarray(ids, dtype=object)}


class ReadFiles:
    """Rows {"path", "label"} (an ImageFolder listing) -> rows with the file's bytes."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, ids = [], []
        for path in batch["path"]:
            with self.fs.open_input_stream(path) as f:
                images.append(f.read())
            ids.append(display_path(self.fs, path))
        return _batch(images, list(batch["label"]), ids)


def image_bytes_column(col: pa.ChunkedArray | pa.Array) -> list[bytes | None]:
    """A parquet image column as Python bytes: plain binary, or the Hugging Face struct
    ``{"bytes": binary, "path": string}``."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_struct(col.type):
        col = col.field("bytes")
    return col.to_pylist()


class ReadParquetShards:
    """Rows {"shard"} -> the shard's (image, label) rows, read one row group at a time.

    ``keep`` (shard path -> sorted row numbers) restricts the rows (``data.max_per_class``).
    Labels were range-checked on the driver before any image was read.
    """

    def __init__(self, fs: pafs.FileSystem, image_col: str, label_col: str,
                 keep: dict[str, np.ndarray] | None = None):
        self.fs, self.image_col, self.label_col, self.keep = fs, image_col, label_col, keep

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for shard in batch["shard"]:
            yield from self._read(str(shard))

    def _read(self, shard: str) -> Iterator[dict[str, np.ndarray]]:
        where = display_path(self.fs, shard)
        keep = None if self.keep is None else self.keep.get(shard, np.empty(0, np.int64))
        if keep is not None and len(keep) == 0:
            return
        with self.fs.open_input_file(shard) as f:
            pf = pq.ParquetFile(f)
            start = 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                rows = np.arange(start, start + n)
                if keep is not None:
                    rows = keep[(keep >= start) & (keep < start + n)]
                if len(rows):
                    table = pf.read_row_group(g, columns=[self.image_col, self.label_col])
                    table = table.take(pa.array(rows - start))
                    images = image_bytes_column(table[self.image_col])
                    labels = table[self.label_col].to_numpy()
                    for lo in range(0, len(rows), ROWS_PER_BATCH):
                        sl = slice(lo, lo + ROWS_PER_BATCH)
                        yield _batch([b or b"" for b in images[sl]], list(labels[sl]),
                                     [f"{where}:{r}" for r in rows[sl]])
                start += n


def _sample_key(name: str) -> tuple[str, str]:
    """webdataset convention: ``dir/base.ext.more`` -> key ``dir/base``, extension ``ext.more``."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(d, stem), ext.lower()


class ReadTarShards:
    """Rows {"shard"} -> webdataset samples (an image member + a ``.cls`` member per key).

    Reads the tar as a stream. ``labels_only`` drops the image bytes in the task (a cheap
    label index pass); ``num_classes`` range-checks labels; ``keep`` is a set of sample ids.
    """

    def __init__(self, fs: pafs.FileSystem, num_classes: int | None = None,
                 keep: set[str] | None = None, labels_only: bool = False):
        self.fs, self.num_classes, self.keep, self.labels_only = fs, num_classes, keep, labels_only

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for shard in batch["shard"]:
            yield from self._read(str(shard))

    def _samples(self, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        where = display_path(self.fs, shard)
        key, fields = None, {}
        with self.fs.open_input_stream(shard) as stream:
            try:
                with tarfile.open(fileobj=stream, mode="r|*") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        k, ext = _sample_key(member.name)
                        if k != key:
                            if key is not None:
                                yield key, fields
                            key, fields = k, {}
                        if ext == "cls" or (ext in WDS_IMAGE_EXTS and not self.labels_only):
                            fields[ext] = tar.extractfile(member).read()
                        elif ext in WDS_IMAGE_EXTS:
                            fields[ext] = b""  # seen; bytes not needed for a label pass
            except tarfile.TarError as e:
                raise DataError(f"webdataset shard {where}: not a readable tar ({e})") from None
        if key is not None:
            yield key, fields

    def _read(self, shard: str) -> Iterator[dict[str, np.ndarray]]:
        where = display_path(self.fs, shard)
        images, labels, ids = [], [], []
        for key, fields in self._samples(shard):
            sid = f"{where}:{key}"
            if self.keep is not None and sid not in self.keep:
                continue
            ext = next((e for e in WDS_IMAGE_EXTS if e in fields), None)
            if ext is None or "cls" not in fields:
                missing = "an image (.jpg/.png/...)" if ext is None else "a .cls label"
                raise DataError(f"webdataset shard {where}: sample {key!r} has no {missing}; "
                                f"members found: {sorted(fields)}")
            try:
                label = int(fields["cls"].decode().strip())
            except ValueError:
                raise DataError(f"webdataset shard {where}: sample {key!r}: .cls is not an integer: "
                                f"{fields['cls'][:20]!r}") from None
            if self.num_classes is not None and not 0 <= label < self.num_classes:
                raise DataError(f"webdataset shard {where}: sample {key!r}: label {label} is outside "
                                f"the {self.num_classes} classes [0, {self.num_classes - 1}]")
            images.append(fields[ext])
            labels.append(label)
            ids.append(sid)
            if len(ids) == ROWS_PER_BATCH:
                yield _batch(images, labels, ids)
                images, labels, ids = [], [], []
        if ids:
            yield _batch(images, labels, ids)
