"""The mipc / floor subset: seeded, independent of file order and of where the dataset lives."""
from __future__ import annotations

import random

import numpy as np
import pytest

from hello_ray.data.subset import keep_per_class, location_key, sample_order


@pytest.mark.parametrize("sample_id,key", [
    ("/data/imagenet/train/n01440764/x.JPEG", "n01440764/x.JPEG"),
    ("s3://bucket/imagenet/train/n01440764/x.JPEG", "n01440764/x.JPEG"),
    ("/tmp/demo/train-00000-of-00002.parquet:17", "demo/train-00000-of-00002.parquet:17"),
    ("C:\\data\\train\\cat\\1.png", "cat/1.png"),
    ("plain", "plain"),
])
def test_location_key_is_the_last_two_path_parts(sample_id, key):
    assert location_key(sample_id) == key


@pytest.mark.parametrize("n,seed", [(1, 0), (3, 0), (3, 1), (7, 5), (50, 0)])
def test_seeded_subset_is_order_and_location_independent(n, seed):
    ids = [f"/a/train/c{c}/img_{i:02d}.png" for c in range(3) for i in range(10)]
    labels = [c for c in range(3) for _ in range(10)]
    keep = keep_per_class(labels, ids, n, seed)
    picked = {i for i, k in zip(ids, keep) if k}
    assert np.bincount(np.asarray(labels)[keep], minlength=3).tolist() == [min(n, 10)] * 3
    # any order of the listing, and another location of the same dataset: the same images
    order = list(range(len(ids)))
    random.Random(seed).shuffle(order)
    moved = [ids[i].replace("/a/", "s3://bucket/elsewhere/") for i in order]
    keep2 = keep_per_class([labels[i] for i in order], moved, n, seed)
    assert {location_key(i) for i, k in zip(moved, keep2) if k} == {location_key(i) for i in picked}
    # per class: the n smallest seeded orders
    for c in range(3):
        want = sorted((i for i, lab in zip(ids, labels) if lab == c), key=lambda i: sample_order(seed, i))[:n]
        assert {i for i in picked if f"/c{c}/" in i} == set(want)


def test_first_n_keeps_array_order_and_seeds_change_the_draw():
    labels = [0, 1, 0, 1, 0, 1, 0]
    assert keep_per_class(labels, None, 2).tolist() == [True, True, True, True, False, False, False]
    assert keep_per_class(labels, None, 0).all()
    ids = [f"x/{i}" for i in range(40)]
    draws = {tuple(keep_per_class([0] * 40, ids, 5, seed)) for seed in range(5)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match="one id per label"):
        keep_per_class([0, 1], None, 1, seed=0)
