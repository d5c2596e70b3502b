"""Which images of a class take part: the first N in dataset order, or a seeded random N.

RDED (LINs-lab/RDED at 3f6453d, ``validation/utils.py`` ``ImageFolder(..., shuffle=True)``) takes a
random ``mipc`` of each class's files, from Python's unseeded ``random.shuffle``. Ours is seeded
and independent of file order, listing order and Ray's block order: a class keeps the N images
whose ``sha256(seed, location key)`` is smallest, where the location key is the sample id's last
two path parts (``<class folder>/<file>`` or ``<dataset folder>/<shard>:<row>``), so the same
dataset in two places (a local folder and its S3 upload) gives the same subset. The same rule
draws the floor's random real images (evaluate).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


def location_key(sample_id: str) -> str:
    """The part of a sample id that does not depend on where the dataset lives."""
    return "/".join(str(sample_id).replace("\\", "/").split("/")[-2:])


def sample_order(seed: int, sample_id: str) -> bytes:
    """The seeded random order of a sample (smaller = drawn first)."""
    return hashlib.sha256(f"{seed}:{location_key(sample_id)}".encode()).digest()


def keep_per_class(labels: np.ndarray | Sequence[int], ids: Sequence[str] | None, n: int,
                   seed: int | None = None) -> np.ndarray:
    """Boolean mask: per label, the first ``n`` rows in array order (``seed=None``) or the ``n``
    rows of smallest :func:`sample_order` (``seed`` given). ``n <= 0`` keeps everything."""
    labels = np.asarray(labels, dtype=np.int64)
    keep = np.zeros(len(labels), dtype=bool)
    if n <= 0:
        keep[:] = True
        return keep
    if seed is not None and (ids is None or len(ids) != len(labels)):
        raise ValueError(f"keep_per_class: a seeded draw needs one id per label ({len(labels)} labels)")
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if seed is not None:
            assert ids is not None
            rows = np.asarray(sorted(rows, key=lambda r: sample_order(seed, ids[r])), dtype=np.int64)
        keep[rows[:n]] = True
    return keep
