"""Dataset fingerprints: what a split holds, cheaply, for the artifact keys of the stages that read it.

A key built from ``data.source`` alone reuses teachers trained on a dataset that has since been
edited in place. The fingerprint of a split is a digest of its file listing, taken on the driver
before any image is read:

- **imagefolder**: every image file of ``<root>/<split>/`` (its path below the split folder, so a
  class added or renamed shows), with its size and version;
- **parquet / webdataset**: the split's shards with size and version, and apart from them the
  class-name file beside them (``classes.json``), which only the stages that use names key on.

The version is the modification time in nanoseconds on local disk and the ETag on S3 (a
content hash for single-part uploads: a copied dataset keeps it). Nothing is read but the
listing (one ``list_objects_v2`` page per 1,000 objects on S3).
"""
from __future__ import annotations

import hashlib
import logging
import posixpath
import time
from typing import Any

import pyarrow.fs as pafs

from hello_ray.config import DataConfig
from hello_ray.data.images import is_image_file
from hello_ray.data.sources import CLASS_FILES, _fs_for, _list, dataset_root, detect_layout

log = logging.getLogger(__name__)

Listing = dict[str, tuple[int, str]]  # path (as the filesystem names it) -> (size, version)


def _local_listing(fs: pafs.FileSystem, paths: list[str], recursive_dir: str | None) -> Listing:
    infos = (_list(fs, recursive_dir, recursive=True) if recursive_dir is not None
             else fs.get_file_info(paths))
    return {i.path: (int(i.size), str(i.mtime_ns)) for i in infos if i.type == pafs.FileType.File}


def _s3_listing(store: Any, folder: str, recursive: bool) -> Listing:
    """Keys below ``folder`` ("bucket/prefix") with size and ETag, through boto3 (pyarrow's
    listing has no ETags), with the store's endpoint and the standard credential chain."""
    from hello_ray.store import open_store

    bucket, _, prefix = folder.partition("/")
    client = open_store(f"s3://{bucket}", getattr(store, "endpoint_url", None), check=False)._client
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": f"{prefix.rstrip('/')}/" if prefix else ""}
    if not recursive:
        kwargs["Delimiter"] = "/"
    out: Listing = {}
    for page in client.get_paginator("list_objects_v2").paginate(**kwargs):
        for obj in page.get("Contents", []):
            out[f"{bucket}/{obj['Key']}"] = (int(obj["Size"]), str(obj["ETag"]).strip('"'))
    return out


def _digest(listing: Listing, base: str) -> str:
    lines = sorted(f"{posixpath.relpath(p, base)}\t{size}\t{version}" for p, (size, version) in listing.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def split_fingerprint(data: DataConfig, split: str, store: Any = None) -> dict[str, Any]:
    """``{"format", "files", "bytes", "sha256", "class_file"}`` of split ``split`` (a split name,
    e.g. ``data.train_split``). ``class_file`` is the digest of the class-name file beside the
    shards ("" when there is none, and for imagefolder, whose names are its folder names).
    ``store`` is needed for ``source=demo`` (the shards live there) and lends its S3 endpoint."""
    t0 = time.perf_counter()
    uri = dataset_root(data, store)
    fs, root = _fs_for(uri, store)
    layout = detect_layout(fs, root, split, "parquet" if data.source == "demo" else data.format)
    s3 = fs.type_name == "s3"
    if layout.format == "imagefolder":
        base = layout.files[0]
        listing = (_s3_listing(store, base, recursive=True) if s3
                   else _local_listing(fs, [], recursive_dir=base))
        listing = {p: v for p, v in listing.items() if is_image_file(posixpath.basename(p))}
        names: Listing = {}
    else:
        base = posixpath.dirname(layout.files[0])
        candidates = [posixpath.join(d, n) for d in layout.meta_dirs for n in CLASS_FILES]
        if s3:
            found: Listing = {}
            for folder in dict.fromkeys([base, *layout.meta_dirs]):
                found.update(_s3_listing(store, folder, recursive=False))
        else:
            found = _local_listing(fs, list(dict.fromkeys(layout.files + candidates)), None)
        listing = {p: found[p] for p in layout.files if p in found}
        class_file = next((p for p in candidates if p in found), None)  # the reader's order
        names = {class_file: found[class_file]} if class_file else {}
    out = {"format": layout.format, "files": len(listing), "bytes": sum(s for s, _ in listing.values()),
           "sha256": _digest(listing, base),
           "class_file": _digest(names, posixpath.dirname(next(iter(names)))) if names else ""}
    log.info("data: fingerprint of %s split %r: %d files, %d bytes in %.2f s", uri, split, out["files"],
             out["bytes"], time.perf_counter() - t0)
    return out


def folder_fingerprint(uri: str, store: Any = None) -> dict[str, Any]:
    """``{"files", "bytes", "sha256"}`` of every file below ``uri`` (local path, file:// or s3://):
    the same listing digest as a split's (path below ``uri``, size, mtime or ETag), for a folder
    that is not a dataset split (an external distilled set). ``store`` lends its S3 endpoint."""
    fs, root = _fs_for(uri, store)
    root = root.rstrip("/")
    listing = (_s3_listing(store, root, recursive=True) if fs.type_name == "s3"
               else _local_listing(fs, [], recursive_dir=root))
    return {"files": len(listing), "bytes": sum(s for s, _ in listing.values()), "sha256": _digest(listing, root)}
