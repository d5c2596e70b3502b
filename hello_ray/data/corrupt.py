"""Undecodable images, counted per split and per class before a stage trains on the split.

With ``data.on_corrupt=skip`` the readers drop an undecodable image with one worker log line; a
stage that trains on a split first asks :func:`corrupt_summary`, which

- counts the split's undecodable images per class (one decode pass at 8 px: every image is
  decoded in full, only the resize is cheap), remembered in the store as a ``scan-<hash>``
  artifact keyed by the split's fingerprint, so the stages of a run (and later runs) that read
  the same files share one pass;
- fails with an EmptyClassError naming the class and the split when a class of the *training*
  split has no readable image left (it would train as an empty class);
- returns the counts for the stage's manifest summary (``summary["corrupt"]``), which the report
  shows as one table.

With ``on_corrupt=fail`` nothing is scanned: the first undecodable image stops the stage, named.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from hello_ray.config import DataConfig
from hello_ray.data.decode import DecodeBatch
from hello_ray.data.errors import EmptyClassError, data_errors

log = logging.getLogger(__name__)

SCAN_STAGE = "scan"
SCAN_FILE = "scan.json"
SCAN_VERSION = 1  # bump when what counts as undecodable changes (decode.py / images.py)
EXAMPLES = 20  # undecodable images listed by name in a summary (all are in the scan artifact)


class CountDecodable:
    """``map_batches`` UDF: encoded rows -> one row per batch with the per-class counts of
    decodable and undecodable images [C] and the undecodable ones as JSON ``[[id, label, reason]]``."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.decode = DecodeBatch(8, "skip", keep_corrupt=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.decode(batch)
        ok, labels = np.asarray(out["ok"], bool), np.asarray(out["label"], np.int64)
        bad = [[str(i), int(lab), str(r)] for i, lab, r, good in zip(out["id"], labels, out["reason"], ok)
               if not good]
        return {"readable": np.bincount(labels[ok], minlength=self.num_classes)[None],
                "corrupt": np.bincount(labels[~ok], minlength=self.num_classes)[None],
                "bad": np.asarray([json.dumps(bad)], dtype=object)}


def _scan(split: Any, data: DataConfig) -> dict[str, Any]:
    """One decode pass over ``split``: per-class counts and every undecodable image."""
    n = len(split.class_names)
    ds = split.ds.map_batches(CountDecodable(n), batch_format="numpy", num_cpus=data.cpus_per_task)
    readable, corrupt, bad = np.zeros(n, np.int64), np.zeros(n, np.int64), []
    with data_errors():
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            readable += np.asarray(b["readable"]).sum(axis=0)
            corrupt += np.asarray(b["corrupt"]).sum(axis=0)
            for text in b["bad"]:
                bad += json.loads(text)
    return {"readable": readable.tolist(), "corrupt": corrupt.tolist(), "bad": sorted(bad)}


def scan_split(split: Any, data: DataConfig, store: Any) -> dict[str, Any]:
    """The scan of ``split`` (a DatasetSplit as a stage reads it), from the store when a pass over
    the same files was made before, else made now and stored."""
    from hello_ray.data.fingerprint import split_fingerprint

    cap = data.max_per_class if split.split == data.train_split else 0  # load_split's rule
    config = {"source": split.source, "split": split.split, "max_per_class": cap, "version": SCAN_VERSION,
              "fingerprint": split_fingerprint(data, split.split, store), "classes": list(split.class_keys)}
    key = store.artifact_key(SCAN_STAGE, config)
    if store.exists(key):
        return json.loads(store.get_bytes(key, SCAN_FILE))
    t0 = time.perf_counter()
    scan = _scan(split, data)
    store.put_bytes(key, SCAN_FILE, json.dumps(scan).encode())
    store.finalize(key, SCAN_STAGE, config, {}, {"images": sum(scan["readable"]) + sum(scan["corrupt"]),
                                                 "corrupt": len(scan["bad"])})
    log.info("data: %s split %r scanned in %.1f s: %d of %d images undecodable", split.source, split.split,
             time.perf_counter() - t0, len(scan["bad"]), sum(scan["readable"]) + sum(scan["corrupt"]))
    return scan


def corrupt_summary(splits: dict[str, Any], data: DataConfig, store: Any) -> dict[str, Any]:
    """``{role: {"images", "corrupt", "per_class": {name: n}, "examples": [...]}}`` for the
    DatasetSplits a stage reads (``{"train": ..., "val": ...}``); EmptyClassError when a class of
    the training split has no decodable image. ``{}`` with ``data.on_corrupt=fail``."""
    if data.on_corrupt == "fail":
        return {}
    out = {}
    for role, split in splits.items():
        scan = scan_split(split, data, store)
        names = list(split.class_names)
        for c, n in enumerate(scan["readable"]):
            if n == 0 and role == "train":
                raise EmptyClassError(names[c], f"split {split.split!r} of {split.source} that decode: its "
                                      f"{scan['corrupt'][c]} image(s) are all undecodable")
        per_class = {names[c]: int(k) for c, k in enumerate(scan["corrupt"]) if k}
        out[role] = {"split": split.split, "images": int(sum(scan["readable"]) + sum(scan["corrupt"])),
                     "corrupt": int(sum(scan["corrupt"])), "per_class": per_class,
                     "examples": [f"{i} ({r})" for i, _, r in scan["bad"][:EXAMPLES]]}
        if per_class:
            log.warning("data: %d undecodable image(s) skipped in split %r of %s: %s", out[role]["corrupt"],
                        split.split, split.source, ", ".join(f"{k}: {v}" for k, v in per_class.items()))
    return out
