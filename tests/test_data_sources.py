"""Dataset sources through real Ray Data, on local folders and the moto S3 server.

One tiny dataset (3 classes x 4 images, PNG and JPEG of different sizes) is written as an
ImageFolder tree, parquet shards and webdataset tars; every layout must give the same
(pixels hash, label) multiset.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import CLASSES, make_samples, upload, write_parquet

from hello_ray.config import DataConfig
from hello_ray.data.decode import DecodeBatch, decoded_split, find_corrupt
from hello_ray.data.errors import (ClassMismatchError, CorruptImageError, DataError, EmptyClassError,
                                   data_errors)
from hello_ray.data.images import decode_image
from hello_ray.data.sources import load_split, load_train_val




def write_imagefolder(root: Path, split: str, samples, classes=CLASSES) -> None:
    for c, name, data in samples:
        d = root / split / classes[c]
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)


def write_wds(root: Path, split: str, samples, shards: int = 2, classes=CLASSES) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for s, part in enumerate(np.array_split(np.arange(len(samples)), shards)):
        with tarfile.open(root / f"{split}-{s:06d}.tar", "w") as tar:
            for i in part:
                c, name, data = samples[i]
                key = f"s{i:04d}"
                for ext, payload in ((name.rsplit(".", 1)[1], data), ("cls", str(c).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    if classes is not None:
        (root / "classes.json").write_text(json.dumps(list(classes)))


def expected_multiset(samples) -> list[tuple[str, int]]:
    return sorted((hashlib.sha256(decode_image(d, n).tobytes()).hexdigest(), c) for c, n, d in samples)


def multiset(split) -> list[tuple[str, int]]:
    rows = split.ds.take_all()
    return sorted((hashlib.sha256(decode_image(r["image"], r["id"]).tobytes()).hexdigest(),
                   int(r["label"])) for r in rows)


@pytest.fixture(scope="module")
def samples():
    return make_samples()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, samples) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    write_imagefolder(base / "folder", "train", samples)
    write_parquet(base / "parquet", "train", samples)
    write_wds(base / "wds", "train", samples)
    write_wds(base / "wds_nonames", "train", samples, classes=None)
    return {"imagefolder": base / "folder", "parquet": base / "parquet", "webdataset": base / "wds",
            "webdataset_nonames": base / "wds_nonames"}


@pytest.mark.parametrize("fmt,units", [("imagefolder", 24), ("parquet", 6), ("webdataset", 6)])
def test_shuffled_files_reads_every_image_once_per_pass_in_new_orders(ray_local, tmp_path, fmt, units):
    """The teachers' per-epoch shuffle: the listing (imagefolder files, parquet / webdataset shards)
    is shuffled before the read, never the read bytes, and every pass reads each image once."""
    from hello_ray.data.sources import shuffled_files

    samples = make_samples(per_class=8)
    root = tmp_path / fmt
    {"imagefolder": write_imagefolder, "parquet": lambda r, sp, sm: write_parquet(r, sp, sm, shards=6),
     "webdataset": lambda r, sp, sm: write_wds(r, sp, sm, shards=6)}[fmt](root, "train", samples)
    split = load_split(DataConfig(source=str(root), image_size=8), "train")
    shuffled = shuffled_files(split)
    op, ops = shuffled.ds._logical_plan.dag, []                     # the plan's operators, last first
    while op is not None:
        ops.append(op.name)
        op = op.input_dependencies[0] if op.input_dependencies else None
    ops = ops[::-1]
    first_read = next(i for i, name in enumerate(ops) if "Read" in name)
    assert "RandomShuffle" in ops[:first_read] and "RandomShuffle" not in ops[first_read:], ops
    listed = [r["id"] for r in split.ds.iter_rows()]
    passes = [[r["id"] for r in shuffled.ds.iter_rows()] for _ in range(3)]
    for ids in passes:
        assert sorted(ids) == sorted(listed) and len(set(ids)) == len(ids) == 24
    assert len({tuple(ids) for ids in passes + [listed]}) >= 3       # the order is drawn again per pass
    assert split.listing.count() == units


@pytest.mark.parametrize("fmt", ["imagefolder", "parquet", "webdataset", "webdataset_nonames"])
def test_same_multiset_from_every_layout(ray_local, samples, layouts, fmt):
    split = load_split(DataConfig(source=str(layouts[fmt]), image_size=8), "train")
    assert split.format == fmt.split("_")[0]
    assert multiset(split) == expected_multiset(samples)
    if fmt == "webdataset_nonames":  # no classes.json: the label pass finds 3 classes
        assert split.class_keys == ["0", "1", "2"] and split.num_rows == 12
    else:
        assert split.class_keys == CLASSES
        # Readable names for the prompts: '_' -> space, ImageNet synset -> torchvision's name.
        assert split.class_names == ["apple pie", "tench", "zebra"]
        if fmt != "webdataset":  # tars are not read before the images are needed
            assert split.num_rows == 12 and split.counts == [4, 4, 4]


def test_explicit_format_and_ids(ray_local, layouts):
    split = load_split(DataConfig(source=str(layouts["parquet"]), format="parquet"), "train")
    ids = sorted(r["id"] for r in split.ds.select_columns(["id"]).take_all())
    assert ids[0].endswith("train-00000-of-00002.parquet:0") and len(ids) == 12
    with pytest.raises(DataError, match="no imagefolder layout.*expected .*train/<class>"):
        load_split(DataConfig(source=str(layouts["parquet"]), format="imagefolder"), "train")


def test_decode_batch_fixed_size(ray_local, layouts):
    data = DataConfig(source=str(layouts["imagefolder"]), image_size=12)
    rows = decoded_split(load_split(data, "train"), data).take_all()
    assert len(rows) == 12
    assert all(r["image"].shape == (12, 12, 3) and r["image"].dtype == np.uint8 for r in rows)


def test_s3_layouts_match_local(ray_local, s3_bucket, samples, layouts):
    want = expected_multiset(samples)
    for fmt in ("imagefolder", "parquet", "webdataset"):
        uri = upload(layouts[fmt], f"{s3_bucket}/{fmt}")
        split = load_split(DataConfig(source=uri), "train")
        assert split.class_keys == CLASSES, fmt
        assert multiset(split) == want, fmt
        assert all(r["id"].startswith("s3://") for r in split.ds.select_columns(["id"]).take(3))


def test_max_per_class_keeps_first_ids(ray_local, samples, layouts):
    first_two = [s for i, s in enumerate(samples) if i % 4 < 2]  # dataset order = sorted names
    for fmt in ("imagefolder", "parquet", "webdataset"):
        data = DataConfig(source=str(layouts[fmt]), max_per_class=2)
        split = load_split(data, "train")
        assert split.counts == [2, 2, 2] and split.num_rows == 6, fmt
        assert multiset(split) == expected_multiset(first_two), fmt
        # only the training split is capped
        assert load_split(dataclasses.replace(data, train_split="other"), "train").ds.count() == 12


def test_corrupt_jpeg_reported_by_path(ray_local, tmp_path, samples):
    write_imagefolder(tmp_path, "train", samples)
    bad = tmp_path / "train" / CLASSES[1] / "img01.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated JPEG
    skip = DataConfig(source=str(tmp_path), image_size=8, on_corrupt="skip")
    split = load_split(skip, "train")
    assert [w for w, _ in find_corrupt(split)] == [str(bad)]
    assert decoded_split(split, skip).count() == 11  # skip mode continues with the rest
    fail = dataclasses.replace(skip, on_corrupt="fail")
    with pytest.raises(CorruptImageError, match=str(bad)):
        with data_errors():
            decoded_split(load_split(fail, "train"), fail).take_all()
    # keep_corrupt: the row stays, flagged, for callers that report themselves
    rows = split.ds.map_batches(DecodeBatch(8, "fail", keep_corrupt=True)).take_all()
    assert [r["id"] for r in rows if not r["ok"]] == [str(bad)]


def test_empty_class_is_named(ray_local, tmp_path, samples):
    write_imagefolder(tmp_path, "train", samples)
    (tmp_path / "train" / "empty_one").mkdir()
    (tmp_path / "train" / "empty_one" / "notes.txt").write_text("no images here")
    with pytest.raises(EmptyClassError, match=f"'empty_one'.*{tmp_path}/train/empty_one"):
        load_split(DataConfig(source=str(tmp_path)), "train")
    # parquet: a class of classes.json with no rows
    write_parquet(tmp_path / "pq", "train", samples, classes=CLASSES + ["unicorn"])
    with pytest.raises(EmptyClassError, match="'unicorn'"):
        load_split(DataConfig(source=str(tmp_path / "pq")), "train")


def test_label_out_of_range_names_shard_and_row(ray_local, tmp_path, samples):
    bad = [(c if i != 7 else 5, n, d) for i, (c, n, d) in enumerate(samples)]
    write_parquet(tmp_path, "train", bad)
    with pytest.raises(DataError, match=r"train-00001-of-00002.parquet row 1: label 5 is outside the 3"):
        load_split(DataConfig(source=str(tmp_path)), "train")
    write_wds(tmp_path / "wds", "train", bad)
    split = load_split(DataConfig(source=str(tmp_path / "wds")), "train")
    with pytest.raises(DataError, match=r"train-000001.tar.*sample 's0007': label 5 is outside"):
        with data_errors():
            split.ds.take_all()


def test_class_mismatch_lists_differences(ray_local, tmp_path, samples):
    write_imagefolder(tmp_path, "train", samples)
    write_imagefolder(tmp_path, "val", samples, classes=["apple_pie", "n01440764", "zorro"])
    with pytest.raises(ClassMismatchError, match=r"only in train: 'zebra'; only in val: 'zorro'"):
        load_train_val(DataConfig(source=str(tmp_path)))


def test_unknown_layout_says_found_and_expected(ray_local, tmp_path):
    (tmp_path / "readme.md").write_text("hi")
    (tmp_path / "train.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"found \[readme.md, train.csv\]; expected .*parquet"):
        load_split(DataConfig(source=str(tmp_path)), "train")
    with pytest.raises(DataError, match="does not exist"):
        load_split(DataConfig(source=str(tmp_path / "nope")), "train")


def test_class_names_from_config_and_hf_metadata(ray_local, tmp_path, samples):
    write_parquet(tmp_path, "train", samples, classes=None, hf_struct=False)
    plain = load_split(DataConfig(source=str(tmp_path)), "train")
    assert plain.class_names == ["0", "1", "2"]
    named = load_split(DataConfig(source=str(tmp_path), class_names=["x", "y", "z"]), "train")
    assert named.class_names == ["x", "y", "z"]
    with pytest.raises(DataError, match="row 2: label 2 is outside the 2 classes.*config data.class_names"):
        load_split(DataConfig(source=str(tmp_path), class_names=["x", "y"]), "train")
    # Hugging Face exports keep ClassLabel names in the schema metadata
    hf = tmp_path / "hf"
    hf.mkdir()
    for p in sorted(tmp_path.glob("train-*.parquet")):
        t = pq.read_table(p)
        meta = {"info": {"features": {"image": {"_type": "Image"},
                                      "label": {"names": ["a", "b", "c"], "_type": "ClassLabel"}}}}
        pq.write_table(t.replace_schema_metadata({"huggingface": json.dumps(meta)}), hf / p.name)
    assert load_split(DataConfig(source=str(hf)), "train").class_names == ["a", "b", "c"]
    # a mapping names the classes the split has (here the HF names), by key, whatever its order
    mapped = load_split(DataConfig(source=str(hf), class_names={"c": "z/3", "a": "x", "b": "y"}), "train")
    assert mapped.class_names == ["x", "y", "z/3"] and mapped.class_keys == ["a", "b", "c"]
    with pytest.raises(DataError, match=r"no name for classes \['b'\]"):
        load_split(DataConfig(source=str(hf), class_names={"c": "z", "a": "x"}), "train")


KEYS = ["n01440764", "n01443537", "zebra"]


@pytest.mark.parametrize("configured, expected", [
    (["b", "a", "c"], ["b", "a", "c"]),                                            # list: by position
    ({"zebra": "Zebra", "n01440764": "fish/tench", "n01443537": "gold"}, ["fish/tench", "gold", "Zebra"]),
    ({"n01443537": "1", "zebra": "2", "n01440764": "0"}, ["0", "1", "2"]),         # any mapping order
])
def test_resolve_class_names(configured, expected):
    """Without Ray: a mapping resolves by folder name (a '/' in a name is fine), a list by position."""
    from hello_ray.data.classnames import resolve_class_names

    assert resolve_class_names(KEYS, configured, "split 'train' of /d") == expected


@pytest.mark.parametrize("configured, message", [
    (["a", "b"], "has 2 names but split 'train' of /d has 3 classes"),
    ({"n01440764": "a", "zebra": "z"}, r"no name for classes \['n01443537'\]"),
    ({**{k: k for k in KEYS}, "n0999": "x", "tench": "y"},
     r"names classes the split does not have: \['n0999', 'tench'\]"),
    ({"zebra": "z"}, r"no name for classes \['n01440764', 'n01443537'\]; the split's classes are"),
])
def test_resolve_class_names_errors_name_the_classes(configured, message):
    from hello_ray.data.classnames import resolve_class_names

    with pytest.raises(DataError, match=message):
        resolve_class_names(KEYS, configured, "split 'train' of /d")


@pytest.mark.parametrize("keys, names, n, line", [
    (KEYS, ["tench", "goldfish", "zebra"], 5, "0: n01440764 -> tench, 1: n01443537 -> goldfish, 2: zebra [3 classes]"),
    (KEYS, ["a", "b", "c"], 2, "0: n01440764 -> a, 1: n01443537 -> b, ... (+1 more) [3 classes]"),
])
def test_pairing_line(keys, names, n, line):
    from hello_ray.data.classnames import pairing_line

    assert pairing_line(keys, names, n) == line



def test_bad_parquet_shards_are_named_with_the_rows(ray_local, tmp_path, samples):
    """A truncated shard fails on the driver naming the shard (pyarrow alone says '<Buffer>'); a
    shard whose image pages are damaged fails where the rows are read, naming shard and rows."""
    paths = write_parquet(tmp_path / "cut", "train", samples)
    paths[1].write_bytes(paths[1].read_bytes()[:200])
    with pytest.raises(DataError, match=rf"parquet shard {paths[1]}: not readable as parquet"):
        load_split(DataConfig(source=str(tmp_path / "cut")), "train")

    paths = write_parquet(tmp_path / "pages", "train", samples)  # 6 rows per shard, row groups of 3
    meta = pq.ParquetFile(paths[0]).metadata
    chunk = meta.row_group(1).column(0)  # the image column of rows 3-5
    data = bytearray(paths[0].read_bytes())
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data[start:start + 16] = b"\xff" * 16  # the page header: unreadable, the footer still fine
    paths[0].write_bytes(bytes(data))
    split = load_split(DataConfig(source=str(tmp_path / "pages")), "train")  # labels read fine
    with pytest.raises(DataError, match=rf"parquet shard {paths[0]} rows 3-5 \(row group 1\): not readable"):
        with data_errors():
            split.ds.take_all()


def test_a_null_label_is_named_not_cast(ray_local, tmp_path, samples):
    write_parquet(tmp_path, "train", samples)
    shard = sorted(tmp_path.glob("train-*.parquet"))[1]
    table = pq.read_table(shard)
    labels = table["label"].to_pylist()
    labels[4] = None
    pq.write_table(table.set_column(1, "label", pa.array(labels, pa.int64())), shard)
    with pytest.raises(DataError, match=rf"parquet shard {shard} row 4: label column 'label' is null \(1 null"):
        load_split(DataConfig(source=str(tmp_path)), "train")
