"""Ray Data read UDFs: one input row names a file or shard, the output rows are
``{"image": encoded bytes, "label": int64, "id": str}``.

They run in Ray tasks with the pyarrow filesystem the driver resolved (it carries the S3
endpoint, timeouts and retries; credentials are resolved in the task's own process), stream
their input (a tar shard is never loaded whole) and yield batches of at most ``ROWS_PER_BATCH``
rows so blocks stay small. A transient I/O error is retried where it happened (a file, a
parquet row group, a tar stream re-read past what was already emitted: no row twice); a
permanent one (missing object, access refused) fails at once naming the object (io_retry.py).
"""
from __future__ import annotations

import contextlib
import posixpath
import tarfile
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hello_ray.data.errors import DataError
from hello_ray.data.io_retry import is_transient, retry_io, retry_iter

ROWS_PER_BATCH = 256
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")


def display_path(fs: pafs.FileSystem, path: str) -> str:
    """The path as a user would type it (``s3://bucket/key`` on S3)."""
    return f"s3://{path}" if fs.type_name == "s3" else path


def read_attempts(fs: pafs.FileSystem) -> int:
    """Reads per file / row group / stream: the S3 filesystem's own attempts (config
    ``s3_max_attempts``), each of which pyarrow already retries per request."""
    return int(getattr(fs, "max_attempts", 3))


def _batch(images: list, labels: list[int], ids: list[str]) -> dict[str, np.ndarray]:
    img = np.empty(len(images), dtype=object)
    img[:] = images
    return {"image": img, "label": np.asarray(labels, dtype=np.int64),
            "id": np.asarray(ids, dtype=object)}


class ReadFiles:
    """Rows {"path", "label"} (an ImageFolder listing) -> rows with the file's bytes."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, ids = [], []
        for path in batch["path"]:
            where = display_path(self.fs, path)
            images.append(retry_io(lambda: self._read(path), where, read_attempts(self.fs)))
            ids.append(where)
        return _batch(images, list(batch["label"]), ids)


# Words of a storage failure (pyarrow's S3 client, curl), not of a damaged file: left to
# io_retry, which retries the transient ones and names the others (access denied, no such key).
_STORAGE_WORDS = ("AWS Error", "curl", "onnection", "imeout", "timed out")


def _bad_file(e: BaseException) -> bool:
    """Whether a pyarrow error while reading parquet means the file itself is unreadable."""
    if isinstance(e, OSError):  # parquet decoding errors are OSErrors without an errno too
        return (e.errno is None and not is_transient(e)
                and not any(w in str(e) for w in _STORAGE_WORDS))
    return isinstance(e, pa.ArrowException)


@contextlib.contextmanager
def parquet_errors(where: str, rows: str = "") -> Iterator[None]:
    """Re-raise pyarrow's errors about a bad parquet file (its text names no file, e.g. "Could not
    open Parquet input source '<Buffer>'") as a DataError naming the shard and ``rows``. Used
    inside io_retry's retried call, so that storage errors still reach its retries."""
    try:
        yield
    except DataError:
        raise
    except (pa.ArrowException, OSError) as e:
        if not _bad_file(e):
            raise
        raise DataError(f"parquet shard {where}{' ' + rows if rows else ''}: not readable as parquet "
                        f"({type(e).__name__}: {e}); rewrite or remove the shard") from None


def null_label_error(where: str, column: pa.ChunkedArray | pa.Array, label_col: str,
                     rows: np.ndarray | None = None) -> DataError | None:
    """DataError naming the first row whose label is null, or None when every row has one.
    ``rows``: the shard's row number of each value (default: the value's position)."""
    if column.null_count == 0:
        return None
    nulls = np.flatnonzero(np.asarray(column.is_null()))
    first = int(nulls[0] if rows is None else rows[nulls[0]])
    return DataError(f"parquet shard {where} row {first}: label column {label_col!r} is null "
                     f"({len(nulls)} null labels here); every row needs an integer class")


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
        attempts = read_attempts(self.fs)
        opened: list = []  # [file, ParquetFile] while open; emptied by an I/O error (reopen)

        def parquet() -> pq.ParquetFile:
            if not opened:
                opened.append(self.fs.open_input_file(shard))
                try:
                    with parquet_errors(where):
                        opened.append(pq.ParquetFile(opened[0]))  # reads the footer
                except BaseException:
                    _close(opened)
                    raise
            return opened[1]

        def row_group(g: int, rows: str) -> pa.Table:
            try:
                with parquet_errors(where, rows):
                    return parquet().read_row_group(g, columns=[self.image_col, self.label_col])
            except OSError:
                _close(opened)
                raise

        try:
            meta = retry_io(lambda: parquet().metadata, where, attempts)
            start = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                rows = np.arange(start, start + n)
                if keep is not None:
                    rows = keep[(keep >= start) & (keep < start + n)]
                if len(rows):
                    # A failed row group is read again from a reopened file; the rows of earlier
                    # groups are out already and are not read (or emitted) again.
                    span = f"rows {start}-{start + n - 1} (row group {g})"
                    table = retry_io(lambda: row_group(g, span), f"{where} {span}", attempts)
                    table = table.take(pa.array(rows - start))
                    images = image_bytes_column(table[self.image_col])
                    null = null_label_error(where, table[self.label_col], self.label_col, rows)
                    if null is not None:  # the driver checked the labels it listed; the shard changed
                        raise null
                    labels = table[self.label_col].to_numpy()
                    for lo in range(0, len(rows), ROWS_PER_BATCH):
                        sl = slice(lo, lo + ROWS_PER_BATCH)
                        yield _batch([b or b"" for b in images[sl]], list(labels[sl]),
                                     [f"{where}:{r}" for r in rows[sl]])
                start += n
        finally:
            _close(opened)


def _close(opened: list) -> None:
    if opened:
        try:
            opened[0].close()
        except OSError:
            pass  # a connection already broken: nothing left to release
        opened.clear()


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
        """The shard's samples; a transient error re-reads the stream, skipping those emitted."""
        where = display_path(self.fs, shard)
        return retry_iter(lambda: self._parse(shard, where), where, read_attempts(self.fs))

    def _parse(self, shard: str, where: str) -> Iterator[tuple[str, dict[str, bytes]]]:
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
