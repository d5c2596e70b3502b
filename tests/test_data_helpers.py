"""Data helpers: image codecs, augmentation replay, image-set artifacts, class names, demo data."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hello_ray.config import DataConfig
from hello_ray.data import augment
from hello_ray.data.classnames import imagenet_wnids, readable_class_names
from hello_ray.data.demo import DEMO_CLASSES, DEMO_STAGE, ensure_demo_dataset
from hello_ray.data.errors import CorruptImageError, DataError, EmptyClassError, find_data_error
from hello_ray.data.images import decode_image, decode_resized, encode_png
from hello_ray.data.imageset import load_image_set, write_image_set
from hello_ray.store import open_store


def _rand_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------ images

# Image shapes (H, W) x seeds: wide, tall (both outside ratio's range: the fallback), square, ImageNet.
RRC_CASES = [((375, 500), s) for s in range(8)] + [((32, 32), s) for s in range(8)] + \
    [((100, 12), s) for s in range(4)] + [((12, 300), s) for s in range(4)] + [((7, 7), 3)]


@pytest.mark.parametrize("shape,seed", RRC_CASES)
def test_rrc_box_is_torchvision_get_params_for_the_same_seed(shape, seed):
    """The whole-image training crop draws torchvision's RandomResizedCrop box, draw for draw."""
    from torchvision.transforms import RandomResizedCrop

    from hello_ray.data.images import rrc_box

    for scale in ((0.08, 1.0), (0.35, 1.0)):
        torch.manual_seed(seed)
        ref = RandomResizedCrop.get_params(torch.empty(3, *shape), list(scale), [3 / 4, 4 / 3])
        assert rrc_box(*shape, scale, (3 / 4, 4 / 3), torch.Generator().manual_seed(seed)) == ref


def test_whole_image_crop_is_torchvision_random_resized_crop_on_the_pil_image():
    """decode_random_crop = RandomResizedCrop(size, bilinear, antialias) on the whole PIL image
    (torchvision's training recipe), pixel for pixel, for the same seed; the centred square is not."""
    from torchvision.transforms import InterpolationMode, RandomResizedCrop

    from hello_ray.data.images import decode_random_crop

    img = _rand_images(1, 60, 90, seed=5)[0]
    data = encode_png(img)
    rrc = RandomResizedCrop(24, scale=(0.08, 1.0), interpolation=InterpolationMode.BILINEAR, antialias=True)
    for seed in range(6):
        torch.manual_seed(seed)
        ref = np.asarray(rrc(Image.fromarray(img)))
        got = decode_random_crop(data, "x", 24, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))
        assert got.shape == (24, 24, 3) and np.array_equal(got, ref)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_worker_decode_cuts_the_cpu_paths_boxes_and_names_what_it_cannot_decode():
    """data.decode=worker (device_decode, here on the CPU; nvJPEG on a GPU): RGB, greyscale and CMYK
    JPEGs and a PNG, the same whole-image boxes as the CPU tasks' path for the same generator, pixels
    within the resize kernels' rounding; a truncated JPEG skipped or raised by name."""
    from hello_ray.data.device_decode import decode_batch
    from hello_ray.data.images import decode_random_crop
    from hello_ray.data.synthetic import synthetic_image

    rng = np.random.default_rng(0)
    datas = [_jpeg(synthetic_image(rng, 60, 120, mode)) for mode in ("RGB", "L", "CMYK", "RGB")]
    datas.append(encode_png(_rand_images(1, 40, 50)[0]))
    ids = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.png"]
    out, kept = decode_batch(datas, ids, 32, torch.device("cpu"), (0.08, 1.0), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    ref = np.stack([decode_random_crop(d, i, 32, (0.08, 1.0), (3 / 4, 4 / 3), g) for d, i in zip(datas, ids)])
    assert out.shape == (5, 32, 32, 3) and out.dtype == torch.uint8 and kept.all()
    diff = np.abs(out.numpy().astype(int) - ref.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())
    square, _ = decode_batch(datas, ids, 32, torch.device("cpu"), None, torch.Generator())
    assert np.abs(square.numpy().astype(int) - np.stack([decode_resized(d, i, 32) for d, i in zip(datas, ids)])
                  .astype(int)).mean() < 4  # the CPU path decodes JPEGs at a draft scale first

    bad = datas[:2] + [datas[0][:300]]
    out, kept = decode_batch(bad, ["a.jpg", "b.jpg", "cut.jpg"], 16, torch.device("cpu"), (0.35, 1.0),
                             torch.Generator().manual_seed(0))
    assert kept.tolist() == [True, True, False] and out.shape == (2, 16, 16, 3)
    with pytest.raises(CorruptImageError, match="cut.jpg"):
        decode_batch(bad, ["a.jpg", "b.jpg", "cut.jpg"], 16, torch.device("cpu"), (0.35, 1.0),
                     torch.Generator(), on_corrupt="fail")


def test_decode_crop_batch_draws_each_image_in_turn_and_keeps_the_corrupt_rule():
    from hello_ray.data.decode import DecodeBatch, DecodeCropBatch
    from hello_ray.data.images import decode_random_crop

    imgs = [_rand_images(1, h, w, seed=i)[0] for i, (h, w) in enumerate([(40, 50), (30, 30), (64, 20)])]
    batch = {"image": np.array([encode_png(i) for i in imgs] + [b"junk"], dtype=object),
             "label": np.arange(4), "id": np.array(["a", "b", "c", "bad.png"], dtype=object)}
    out = DecodeCropBatch(16, (0.35, 1.0), seed=7)(batch)
    g = torch.Generator().manual_seed(7)
    ref = np.stack([decode_random_crop(encode_png(i), "-", 16, (0.35, 1.0), (3 / 4, 4 / 3), g) for i in imgs])
    assert out["id"].tolist() == ["a", "b", "c"] and np.array_equal(out["image"], ref)
    assert not np.array_equal(out["image"], DecodeBatch(16)(batch)["image"])  # not the centred square
    unseeded = [DecodeCropBatch(16, (0.08, 1.0))(batch)["image"] for _ in range(2)]
    assert not np.array_equal(*unseeded)  # every pass (a new run of the UDF) draws new crops
    with pytest.raises(CorruptImageError, match="bad.png"):
        DecodeCropBatch(16, (0.35, 1.0), on_corrupt="fail")(batch)

def test_png_round_trip_and_resize_rule():
    img = _rand_images(1, 20, 30)[0]
    assert np.array_equal(decode_image(encode_png(img), "x"), img)
    assert np.array_equal(decode_resized(encode_png(img[:16, :16]), "x", 16), img[:16, :16])  # untouched
    out = decode_resized(encode_png(img), "x", 10)  # shorter side 20 -> 10, centre crop of 15 -> 10
    ref = np.asarray(Image.fromarray(img).resize((15, 10), Image.BILINEAR))[:, 2:12]
    assert out.shape == (10, 10, 3) and np.array_equal(out, ref)
    grey = io.BytesIO()
    Image.fromarray(img[..., 0]).save(grey, format="PNG")
    assert decode_image(grey.getvalue(), "g").shape == (20, 30, 3)


@pytest.mark.parametrize("data", [b"", b"not an image", encode_png(np.zeros((8, 8, 3), np.uint8))[:40]])
def test_corrupt_bytes_raise_with_where(data):
    with pytest.raises(CorruptImageError, match="corrupt image shard-7.parquet:3"):
        decode_image(data, "shard-7.parquet:3")


def test_remote_error_text_becomes_data_error():
    text = ("ray::MapBatches(DecodeBatch)()\n  File x\nhello_ray.data.errors.CorruptImageError: corrupt "
            "image /d/a.jpg: OSError: truncated (set data.on_corrupt=skip to skip undecodable images)")
    err = find_data_error(RuntimeError(text))
    assert isinstance(err, CorruptImageError) and "/d/a.jpg" in str(err)
    assert find_data_error(RuntimeError("KeyError: 'x'")) is None
    assert isinstance(find_data_error(EmptyClassError("c", "/d/c")), EmptyClassError)


# ------------------------------------------------------------------------------ augment

def test_crop_flip_replay_is_exact_and_boxes_valid():
    x = augment.to_float(torch.from_numpy(_rand_images(64, 24, 32)))  # [64, 3, 24, 32]
    g = torch.Generator().manual_seed(3)
    out, boxes, flips = augment.random_resized_crop_flip(x, 16, generator=g)
    assert out.shape == (64, 3, 16, 16) and boxes.dtype == torch.int64 and flips.dtype == torch.bool
    assert torch.equal(augment.apply_crop_flip(x, boxes, flips, 16), out)
    g2 = torch.Generator().manual_seed(3)
    _, boxes2, flips2 = augment.random_resized_crop_flip(x, 16, generator=g2)
    assert torch.equal(boxes, boxes2) and torch.equal(flips, flips2)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 32).all() and (boxes[:, 3] <= 24).all()
    frac = (w * h).double() / (24 * 32)
    assert (frac > 0.06).all() and (frac <= 1.0).all() and 0 < flips.sum() < 64
    assert ((w.double() / h) > 0.6).all() and ((w.double() / h) < 1.6).all()
    assert len(set(map(tuple, boxes.tolist()))) > 50  # per-sample boxes


def test_crop_of_whole_image_is_identity_and_flip_mirrors():
    x = augment.to_float(torch.from_numpy(_rand_images(3, 12, 12)))
    full = torch.tensor([[0, 0, 12, 12]] * 3)
    same = augment.apply_crop_flip(x, full, torch.tensor([False, True, False]), 12)
    assert torch.allclose(same[0], x[0], atol=1e-6) and torch.allclose(same[1], x[1].flip(-1), atol=1e-6)
    u8 = torch.from_numpy(_rand_images(2, 5, 7))
    assert torch.equal(augment.to_uint8(augment.to_float(u8)), u8)


def test_cutmix_replay_and_lambda():
    x = torch.rand(8, 3, 16, 16)
    y = torch.arange(8)
    g = torch.Generator().manual_seed(0)
    mixed, ya, yb, lam, perm, box = augment.cutmix(x, y, 1.0, generator=g)
    assert torch.equal(augment.apply_cutmix(x, perm, box), mixed)
    x0, y0, x1, y1 = box
    assert lam == pytest.approx(1 - (x1 - x0) * (y1 - y0) / 256)
    assert torch.equal(ya, y) and torch.equal(yb, y[perm])
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert torch.equal(mixed[:, :, inside], x[perm][:, :, inside])
    assert torch.equal(mixed[:, :, ~inside], x[:, :, ~inside])
    # same generator seed -> same draw; alpha 0 -> no mixing
    again = augment.cutmix(x, y, 1.0, generator=torch.Generator().manual_seed(0))
    assert again[3] == lam and torch.equal(again[4], perm) and again[5] == box
    off = augment.cutmix(x, y, 0.0)
    assert off[3] == 1.0 and torch.equal(off[0], x)


# ------------------------------------------------------------------------------ image sets

@pytest.mark.parametrize("where", ["file", "s3"])
def test_image_set_round_trip_is_bit_exact(where, file_store_uri, request):
    uri = file_store_uri if where == "file" else request.getfixturevalue("s3_bucket")
    store = open_store(uri)
    images = _rand_images(7, 16, 16, seed=1)
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    index = pd.DataFrame({"image": range(7), "class": labels, "patch": 0,
                          "source_id": [f"s{i}" for i in range(7)],
                          "x0": 0, "y0": 0, "x1": 16, "y1": 16, "score": np.linspace(0, 1, 7)})
    write_image_set(store, "select-abc123", images, torch.from_numpy(labels), ["a", "b", "c"], index,
                    {"ipc": 2, "factor": 1})
    got = load_image_set(store, "select-abc123")
    assert torch.equal(got.images, torch.from_numpy(images)) and got.images.dtype == torch.uint8
    assert got.labels.tolist() == labels.tolist() and got.labels.dtype == torch.int64
    assert got.class_names == ["a", "b", "c"] and got.meta == {"ipc": 2, "factor": 1}
    pd.testing.assert_frame_equal(got.index, index)
    assert not store.exists("select-abc123")  # the pipeline finalizes, not the writer
    assert sorted(store.list_files("select-abc123"))[:2] == ["images/00000.png", "images/00001.png"]


def test_image_set_rejects_bad_input(file_store_uri):
    store = open_store(file_store_uri)
    with pytest.raises(ValueError, match="uint8"):
        write_image_set(store, "k-1", np.zeros((2, 4, 4, 3), np.float32), [0, 0], ["a"])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 0\]"):
        write_image_set(store, "k-1", np.zeros((2, 4, 4, 3), np.uint8), [0, 1], ["a"])


# ------------------------------------------------------------------------------ class names

def test_imagenet_synsets_map_to_readable_names():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 == len(set(wnids)) and list(wnids) == sorted(wnids)
    assert readable_class_names(["n01440764", "n01443537", "n15075141"]) == ["tench", "goldfish",
                                                                            "toilet tissue"]
    # a subset (ImageNet-100 style) maps by synset id, not by position
    assert readable_class_names(["n01530575", "n02012849"]) == ["brambling", "crane bird"]
    assert readable_class_names(["n99999999", "golden_retriever"]) == ["n99999999", "golden retriever"]


# ------------------------------------------------------------------------------ demo dataset

def test_demo_dataset_written_once_and_read_as_parquet(ray_local, file_store_uri):
    from hello_ray.data.decode import decoded_split
    from hello_ray.data.sources import load_train_val

    store = open_store(file_store_uri)
    uri = ensure_demo_dataset(store)
    key = store.list_artifacts(DEMO_STAGE)
    assert len(key) == 1 and uri == store.uri_for(key[0])
    created = store.manifest(key[0])["created"]
    files = store.list_files(key[0])
    assert files == ["classes.json", "train-00000-of-00002.parquet", "train-00001-of-00002.parquet",
                     "val-00000-of-00002.parquet", "val-00001-of-00002.parquet"]
    assert ensure_demo_dataset(store) == uri and store.manifest(key[0])["created"] == created
    assert json.loads(store.get_bytes(key[0], "classes.json")) == DEMO_CLASSES

    data = DataConfig(source="demo", image_size=32)
    train, val = load_train_val(data, store)
    assert train.format == "parquet" and train.class_names == DEMO_CLASSES == val.class_names
    assert train.num_rows + val.num_rows == 1797 and (train.num_rows, val.num_rows) == (1437, 360)
    assert min(train.counts) >= 139 and min(val.counts) >= 35  # stratified 80/20
    batch = decoded_split(val, data).take_batch(360, batch_format="numpy")
    assert batch["image"].shape == (360, 32, 32, 3) and batch["image"].max() > 200
    assert np.array_equal(batch["image"][..., 0], batch["image"][..., 2])  # grey digits as RGB
    capped = load_train_val(DataConfig(source="demo", max_per_class=30), store)
    assert capped[0].num_rows == 300 and capped[1].num_rows == 360


def test_demo_needs_a_store():
    from hello_ray.data.sources import load_split

    with pytest.raises(DataError, match="needs an artifact store"):
        load_split(DataConfig(source="demo"), "train")
