"""Stage select: the plain-PyTorch RDED core, and the streaming Ray pipeline against it."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from builders import write_image_folder, write_observer
import torch
import torch.nn.functional as F

from hello_ray.data.subset import keep_per_class
from hello_ray.stages import select_core as core

# ---------------------------------------------------------------------------- core (no Ray)


@pytest.mark.parametrize("height,width,num_crop,seed", [(32, 32, 5, 0), (224, 224, 5, 3), (9, 9, 50, 1),
                                                       (375, 500, 20, 0), (500, 333, 20, 2), (40, 4, 10, 0)])
def test_crop_boxes_are_seeded_squares_inside_the_image(height, width, num_crop, seed):
    boxes = core.crop_boxes("cls/img_007.png", height, width, num_crop, seed)
    assert boxes.shape == (num_crop, 4) and boxes.dtype == torch.long
    x0, y0, x1, y1 = boxes.unbind(1)
    assert torch.equal(x1 - x0, y1 - y0)                            # aspect ratio 1
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= width).all() and (y1 <= height).all()
    frac = (x1 - x0).double() ** 2 / (height * width)
    short = min(height, width)
    fallback = (x1 - x0) == short                                   # torchvision's centre fallback
    assert ((frac >= 0.08 - 2 / short) | fallback).all() and (frac <= 1).all()
    assert torch.equal(boxes, core.crop_boxes("cls/img_007.png", height, width, num_crop, seed))
    assert not torch.equal(boxes, core.crop_boxes("cls/img_008.png", height, width, num_crop, seed))
    assert not torch.equal(boxes, core.crop_boxes("cls/img_007.png", height, width, num_crop, seed + 1))


def test_crop_box_fallback_is_torchvisions_centred_short_side():
    # A 100 x 2 strip: a square of >= 8 % of its area (side >= 4) never fits, so every box is the
    # fallback: the centred square of the shorter side (RandomResizedCrop, ratio (1, 1)).
    boxes = core.crop_boxes("strip", 100, 2, 20, 0)
    assert boxes.tolist() == [[0, 49, 2, 51]] * 20


def test_crop_seed_is_stable_across_processes():
    # sha256-derived: a fixed value, unlike Python's salted hash()
    assert core.crop_seed(0, "a") == core.crop_seed(0, "a") == 8348787342930090591
    assert core.crop_seed(0, "a") != core.crop_seed(1, "a")


def test_cut_crop_is_the_region_resized():
    img = torch.arange(32 * 32 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).view(32, 32, 3)
    same = core.cut_crop(img, (4, 6, 20, 22), 16)                  # 16 px box at 16 px: a plain slice
    assert torch.equal(same, img[6:22, 4:20])
    small = core.cut_crop(img, (0, 0, 32, 32), 16)
    ref = F.interpolate(img.permute(2, 0, 1)[None].float(), size=(16, 16), mode="bilinear",
                        align_corners=False, antialias=True).round().clamp(0, 255).to(torch.uint8)[0]
    assert torch.equal(small, ref.permute(1, 2, 0))


def test_crops_come_from_the_full_resolution_source():
    """A 96 x 64 source: boxes are in its own pixels and a crop is that region, resized."""
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (96, 64, 3), generator=g, dtype=torch.uint8)
    boxes, crops = core.make_crops([src], ["a/b.png"], 4, 16, seed=1)
    assert boxes.shape == (1, 4, 4) and crops.shape == (1, 4, 16, 16, 3)
    assert int(boxes[..., 3].max()) <= 96 and int(boxes[..., 2].max()) <= 64
    for j in range(4):
        assert torch.equal(crops[0, j], core.cut_crop(src, boxes[0, j].tolist(), 16))
    assert core.cap_side(src.numpy(), 200) is not None and core.cap_side(src.numpy(), 200).shape == (96, 64, 3)
    assert core.cap_side(src.numpy(), 48).shape == (48, 32, 3)     # longer side capped, aspect kept


def test_pad_colour_is_the_normalised_zero():
    """RDED normalises a crop, then zero-pads it: the pad is the mean colour. Ours pads [0, 1]
    pixels with the observer's mean, which its own normalisation maps to exactly zero."""
    from hello_ray.models.zoo import build_model

    observer = build_model("resnet18", 4, 16).eval()
    colour = core.pad_colour(observer)
    x = torch.rand(2, 3, 8, 8)
    shown = core.show_crops(x, 16, "pad", colour)
    normalised = (shown - observer.mean) / observer.std                    # what the network sees
    border = torch.ones(16, 16, dtype=torch.bool)
    border[4:12, 4:12] = False
    assert torch.equal(normalised[..., border], torch.zeros_like(normalised[..., border]))
    assert torch.equal(shown[..., 4:12, 4:12], x)
    assert torch.allclose(normalised[..., 4:12, 4:12], (x - observer.mean) / observer.std)


@pytest.mark.parametrize("crop,size,lo,hi", [(8, 16, 4, 4), (5, 8, 1, 2), (112, 224, 56, 56), (7, 8, 0, 1)])
def test_pad_places_the_crop_like_rded(crop, size, lo, hi):
    """Top/left gap = floor(gap / 2), the odd pixel bottom/right (RDED synthesize/utils.py pad)."""
    x = torch.ones(1, 3, crop, crop)
    for show, colour in (("pad", torch.zeros(3)), ("pad_black", None)):
        out = core.show_crops(x, size, show, colour)
        assert out.shape == (1, 3, size, size)
        assert torch.equal(out[0, 0, lo:size - hi, lo:size - hi], torch.ones(crop, crop))
        assert out.sum() == 3 * crop * crop


def test_show_resize_and_black_pad():
    x = torch.rand(2, 3, 8, 8)
    assert core.show_crops(x, 16, "resize").shape == (2, 3, 16, 16)
    padded = core.show_crops(x, 16, "pad_black")                    # zero border, crop in the centre
    assert torch.equal(padded[..., 4:12, 4:12], x)
    assert padded.sum() == pytest.approx(x.sum().item())
    assert core.show_crops(x, 8, "pad", torch.zeros(3)) is x       # full-size crops are shown as they are
    with pytest.raises(ValueError, match="pad_colour"):
        core.show_crops(x, 16, "pad")


def test_score_crops_is_per_crop_cross_entropy():
    torch.manual_seed(0)
    observer = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    crops = torch.randint(0, 256, (7, 8, 8, 3), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    got = core.score_crops(observer, crops, labels, 16, "pad", batch_size=3)
    x = core.show_crops(crops.permute(0, 3, 1, 2).float() / 255, 16, "pad", core.pad_colour(observer))
    want = -torch.log_softmax(observer(x), 1).gather(1, labels[:, None])[:, 0]  # RDED: -log p[true class]
    torch.testing.assert_close(got, want.detach())


@pytest.mark.parametrize("factor,ipc", [(1, 3), (2, 2), (2, 3), (3, 1)])
def test_stitch_rded_tile_order(factor, ipc):
    """Image b, tile (r, c) holds rank (r*factor + c)*ipc + b (RDED mix_images); rowmajor keeps
    ranks b*f^2 .. b*f^2 + f^2 - 1 in image b."""
    n = ipc * factor * factor
    patches = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 2, 2, 3)  # patch i == i
    images = core.stitch(patches, factor)                          # default: rded
    rowmajor = core.stitch(patches, factor, "rowmajor")
    assert images.shape == rowmajor.shape == (ipc, 2 * factor, 2 * factor, 3)
    for b in range(ipc):
        for r in range(factor):
            for c in range(factor):
                assert int(images[b, 2 * r, 2 * c, 0]) == (r * factor + c) * ipc + b
                assert int(rowmajor[b, 2 * r, 2 * c, 0]) == b * factor * factor + r * factor + c
                assert core.tile_of((r * factor + c) * ipc + b, ipc, factor) == (b, r * factor + c)
    if factor > 1:
        with pytest.raises(ValueError, match="do not fill"):
            core.stitch(patches[:n - 1], factor)


@pytest.mark.parametrize("k,n,classes", [(1, 50, 1), (4, 200, 3), (10, 7, 2), (6, 300, 5)])
def test_class_top_k_streaming_equals_full_sort(k, n, classes):
    rng = random.Random(k * 1000 + n)
    cands = [core.Candidate(rng.randrange(classes), f"img{rng.randrange(40):03d}", rng.randrange(5),
                            rng.randrange(2), (0, 0, 1, 1), rng.choice([0.5, 1.0, rng.random()]))
             for _ in range(n)]
    keeper = core.ClassTopK(classes, k)
    for c in cands:                                                 # arbitrary stream order
        keeper.offer(c)
    for label in range(classes):
        want = sorted((c for c in cands if c.label == label), key=lambda c: c.key)[:k]
        assert [c.key for c in keeper.winners(label)] == [c.key for c in want]
        assert len(keeper.heaps[label]) <= k                        # bounded, whatever n is


def test_best_rows_ranks_each_images_crops():
    scores = torch.tensor([[0.3, 0.1, 0.2], [0.5, 0.5, 0.4]])       # image 1: a tie broken by crop index
    boxes = torch.arange(24).view(2, 3, 4)
    rows = core.best_rows(np.array([0, 1]), ["a", "b"], boxes, scores, [1, 3])
    assert rows["id"].tolist() == ["a", "b", "b", "b"]
    assert rows["crop"].tolist() == [1, 2, 0, 1] and rows["rank"].tolist() == [0, 0, 1, 2]
    assert rows["x0"].tolist() == [4, 20, 12, 16]
    # with the crops, every competing row carries its own pixels (the stage reads the data once)
    crops = torch.arange(2 * 3 * 2 * 2 * 3, dtype=torch.uint8).view(2, 3, 2, 2, 3)
    with_px = core.best_rows(np.array([0, 1]), ["a", "b"], boxes, scores, [1, 3], crops=crops)
    assert with_px["patch"].shape == (4, 2, 2, 3)
    for r, (i, j) in enumerate([(0, 1), (1, 2), (1, 0), (1, 1)]):
        assert np.array_equal(with_px["patch"][r], crops[i, j].numpy())
    assert core.ranks_needed(10, 4, 5) == 1 and core.ranks_needed(3, 4, 5) == 2
    assert core.ranks_needed(1, 40, 5) == 5 and core.ranks_needed(0, 4, 5) == 0


def _tiny_images(per_class: list[int], size: int = 32, seed: int = 0):
    """Class-coloured noisy images: uint8 [N, S, S, 3], labels, ids."""
    g = torch.Generator().manual_seed(seed)
    images, labels, ids = [], [], []
    for c, n in enumerate(per_class):
        for i in range(n):
            base = torch.zeros(3, 1, 1)
            base[c % 3] = 200
            img = (base + 55 * torch.rand(3, size, size, generator=g)).clamp(0, 255).to(torch.uint8)
            images.append(img.permute(1, 2, 0))
            labels.append(c)
            ids.append(f"class{c}/img_{i:03d}.png")
    return torch.stack(images), labels, ids


@pytest.fixture(scope="module")
def tiny_observer():
    from hello_ray.models.zoo import build_model

    torch.manual_seed(0)
    return build_model("shufflenet_v2_x0_5", 3, 32).eval()


@pytest.mark.parametrize("factor", [1, 2])
def test_select_in_memory_picks_each_images_best_crop_and_fills_short_classes(tiny_observer, factor):
    images, labels, ids = _tiny_images([6, 9, 2])
    ipc, mipc, num_crop = 2, 8, 3
    k = ipc * factor * factor
    sel = core.select_in_memory(images, labels, ids, tiny_observer, 3, ipc=ipc, factor=factor, mipc=mipc,
                                num_crop=num_crop, show="pad", seed=0, batch_size=16)
    assert sel.images.shape == (3 * ipc, 32, 32, 3) and sel.labels.tolist() == [0, 0, 1, 1, 2, 2]
    chosen = keep_per_class(labels, ids, mipc, seed=0)             # the mipc cut: a seeded random subset
    for c, cands in enumerate(sel.patches):
        assert len(cands) == k and all(x.label == c for x in cands)
        class_ids = [i for i, lab, keep in zip(ids, labels, chosen) if lab == c and keep]
        assert len(class_ids) == min(mipc, labels.count(c))
        assert {x.image_id for x in cands} <= set(class_ids)
        if len(class_ids) >= k:                                     # enough images: one (best) crop each
            assert all(x.rank == 0 for x in cands) and len({x.image_id for x in cands}) == k
            assert [x.key for x in cands] == sorted(x.key for x in cands)
    # class 2 has 2 images: with factor 2 (k = 8 > 2 images x 3 crops) the 6 crops repeat
    short = sel.patches[2]
    if factor == 2:
        assert [x.rank for x in short[:6]] == [0, 0, 1, 1, 2, 2] and short[6:] == short[:2]
    # the winning crop of every image is its minimum-score crop
    best = sel.patches[1][0]
    img = images[ids.index(best.image_id)]
    boxes, crops = core.make_crops([img], [best.image_id], num_crop, 32 // factor, 0)
    scores = core.score_crops(tiny_observer, crops[0], torch.full((num_crop,), 1), 32, "pad")
    assert best.crop == int(scores.argmin()) and best.score == pytest.approx(float(scores.min()), rel=1e-5)
    # stitched pixels are the re-cut winning crops
    c = 32 // factor
    assert torch.equal(sel.images[0, :c, :c], core.cut_crop(images[ids.index(sel.patches[0][0].image_id)],
                                                             sel.patches[0][0].box, c))


# ---------------------------------------------------------------------------- the Ray pipeline

def _cfg(root, store_uri: str, on_corrupt: str = "skip", decode: str = "auto", **select):
    from hello_ray.config import load_config

    sel = {"ipc": 2, "factor": 1, "mipc": 5, "num_crop": 3, "batch_size": 7, "num_actors": 1,
           "actor_cpus": 0.5, "show": "pad", "seed": 3, **select}
    overrides = {"store": store_uri, "data.source": str(root), "data.format": "imagefolder",
                 "data.image_size": 32, "data.on_corrupt": on_corrupt, "compute.use_gpu": False,
                 "data.decode": decode,
                 **{f"select.{k}": v for k, v in sel.items()}}
    return load_config("demo", overrides=[f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                          for k, v in overrides.items()])


def _run_select(cfg, teachers_key: str | None = None):
    from hello_ray.data.imageset import load_image_set
    from hello_ray.pipeline import open_run_store, run_stage
    from hello_ray.stages import select

    store = open_run_store(cfg)
    if teachers_key is None:
        teachers_key = write_observer(store, sorted(p.name for p in (Path(cfg.data.source) / "train").iterdir()))
    key = run_stage(select, cfg, store, {"teachers": teachers_key})
    return store, key, load_image_set(store, key), store.manifest(key)["summary"]


@pytest.fixture(scope="module")
def parity_root(tmp_path_factory):
    # a: more images than mipc (the cut matters), b: exactly k*..., c: fewer than mipc and than k.
    # 40 x 52 sources: crops are cut at the source's own resolution, not from a 32 px square.
    return write_image_folder(tmp_path_factory.mktemp("parity"), {
        "a": [f"img_{i:03d}.png" for i in (7, 3, 11, 0, 5, 9, 1, 4)],
        "b": [f"img_{i:03d}.png" for i in range(6)],
        "c": ["only_0.png", "only_1.png"],
    }, size=(40, 52))


# decode=worker: the scoring actors decode and cut the crops themselves (what GPU actors do by default).
@pytest.mark.parametrize("factor,actors,decode", [(1, 1, "tasks"), (2, 2, "worker")])
def test_ray_selection_equals_in_memory_reference(ray_local, parity_root, tmp_path, factor, actors, decode):
    from hello_ray.data.images import decode_image
    from hello_ray.data.sources import load_split
    from hello_ray.models.ensemble import load_observer

    cfg = _cfg(parity_root, (tmp_path / "store").as_uri(), factor=factor, num_actors=actors,
               actor_cpus=0.5 / actors, decode=decode)
    store, key, image_set, summary = _run_select(cfg)
    assert summary["crops_cut_by"] == {"tasks": "tasks", "worker": "actors"}[decode]

    # the reference: every row of the split decoded at its own resolution in this process (in
    # reversed order: the seeded mipc subset must not depend on it), selected by select_in_memory
    split = load_split(cfg.data, "train", store)
    rows = split.ds.take_all()[::-1]
    sources = [decode_image(r["image"], r["id"]) for r in rows]
    assert {s.shape for s in sources} == {(40, 52, 3)}
    observer = load_observer(store, json_key(store, key), "cpu")
    ref = core.select_in_memory(sources, [int(r["label"]) for r in rows], [str(r["id"]) for r in rows], observer, 3,
                                ipc=2, factor=factor, mipc=5, num_crop=3, show="pad", seed=3, image_size=32,
                                batch_size=64)

    index = image_set.index.sort_values(["class", "class_rank"])
    for c in range(3):
        got = index[index["class"] == c]
        want = ref.patches[c]
        assert got["source_id"].tolist() == [x.image_id for x in want], f"class {c}"
        assert got[["x0", "y0", "x1", "y1"]].values.tolist() == [list(x.box) for x in want]
        np.testing.assert_allclose(got["score"].values, [x.score for x in want], rtol=1e-4)
    assert torch.equal(torch.as_tensor(image_set.images), ref.images)   # same pixels, stitched the same way
    assert image_set.labels.tolist() == ref.labels.tolist()
    assert image_set.class_names == ["a", "b", "c"]
    # the class with 8 images was cut to a seeded random mipc=5 (select.seed=3); c kept its 2
    assert summary["per_class"] == {"a": 5, "b": 5, "c": 2} and summary["crops_scored"] == 12 * 3
    a_ids = [str(r["id"]) for r in rows if int(r["label"]) == 0]
    a_kept = {Path(i).name for i, k in zip(a_ids, keep_per_class([0] * len(a_ids), a_ids, 5, seed=3)) if k}
    a_sources = set(index[index["class"] == 0]["source_id"])
    assert a_sources and all(Path(s).name in a_kept for s in a_sources)
    assert a_kept != {f"img_{i:03d}.png" for i in (0, 1, 3, 4, 5)}  # not the first five in file order
    if factor == 2:   # c: 2 images x 3 crops < k = 8 -> every crop once (best ranks first), then repeats
        c_rows = index[index["class"] == 2]
        assert c_rows["rank"].tolist()[:6] == [0, 0, 1, 1, 2, 2]
        assert summary["repeated_patches"] == {"c": 2}


def json_key(store, key: str) -> str:
    """The teachers key recorded as the select artifact's input."""
    return store.manifest(key)["inputs"]["teachers"]


@pytest.fixture(scope="module")
def corrupt_root(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("corrupt"), {
        "a": ["img_000.png", "img_001_bad.png", "img_002.png", "img_003.png"],
        "b": ["img_000.png", "img_001.png", "img_002.png"],
    })


def test_corrupt_image_is_reported_and_skipped(ray_local, corrupt_root, tmp_path, caplog):
    cfg = _cfg(corrupt_root, (tmp_path / "store").as_uri(), decode="worker")  # found by the scoring actor
    store, key, image_set, summary = _run_select(cfg)
    bad = [s for s in summary["corrupt_skipped"]]
    assert len(bad) == 1 and bad[0].endswith("img_001_bad.png")            # reported by its path
    assert summary["per_class"] == {"a": 3, "b": 3} and summary["crops_scored"] == 6 * 3
    assert not any("bad" in s for s in image_set.index["source_id"])
    assert image_set.images.shape == (4, 32, 32, 3)
    assert "img_001_bad.png" in caplog.text                                   # the summary line names it


@pytest.mark.parametrize("decode", ["tasks", "worker"])
def test_corrupt_image_fails_when_asked(ray_local, corrupt_root, tmp_path, decode):
    from hello_ray.data.errors import CorruptImageError

    cfg = _cfg(corrupt_root, (tmp_path / "store").as_uri(), on_corrupt="fail", decode=decode)
    with pytest.raises(CorruptImageError, match="img_001_bad.png"):
        _run_select(cfg)


@pytest.mark.parametrize("classes", [
    {"a": ["img_000.png", "img_001.png"], "b": ["img_000_bad.png"]},     # every image of b undecodable
    {"a": ["img_000.png", "img_001.png"], "b": []},                      # an empty class folder
])
def test_class_without_images_is_a_named_error(ray_local, tmp_path, classes):
    from hello_ray.data.errors import EmptyClassError

    root = write_image_folder(tmp_path / "data", classes)
    cfg = _cfg(root, (tmp_path / "store").as_uri())
    with pytest.raises(EmptyClassError, match="'b'"):
        _run_select(cfg)

