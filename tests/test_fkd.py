"""FKD label records (SRe2L / LPLD relabel output): the conversions against values worked by hand from
the reference's formulas, our stored labels exported and imported back bit for bit, SRe2L-written
records (numpy scalars, seeded order) read, and a pickle that would run code refused unrun. No Ray."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from builders import write_sre2l_records
import torch

from hello_ray.data.imageset import write_image_set
from hello_ray.formats import fkd
from hello_ray.labels import RelabelPlan, StoredLabels, relabel, write_stored_meta
from hello_ray.labels_fkd import export_fkd, import_fkd
from hello_ray.store import open_store

SIZE, N, C = 16, 7, 3


@pytest.fixture
def store(tmp_path):
    s = open_store(str(tmp_path / "store"))
    rng = np.random.default_rng(0)
    write_image_set(s, "external-x", rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8),
                    [0, 0, 1, 1, 2, 2, 2], ["a", "b", "c"])
    s.finalize("external-x", "external", {}, {})
    return s


def _relabelled(store, alpha: float = 1.0) -> RelabelPlan:
    """Our relabel pass on the set (a fixed random linear labeller), as evaluate writes it."""
    from hello_ray.data.imageset import load_image_set

    s = load_image_set(store, "external-x")
    images = s.images.permute(0, 3, 1, 2)
    plan = RelabelPlan(epochs=2, batch_size=3, image_size=SIZE, cutmix_alpha=alpha, seed=4)
    w = torch.randn(3 * SIZE * SIZE, C, generator=torch.Generator().manual_seed(1))
    files = relabel(lambda x: x.flatten(1) @ w, images, plan, store, "evaluate-x")
    write_stored_meta(store, "evaluate-x", plan, N, C, files)
    store.finalize("evaluate-x", "evaluate", {}, {"images": "external-x"})
    return plan


# (coords as SRe2L stores them, H, W) -> our box, worked by hand: i = c0*H, j = c1*W, h = c2*H, w = c3*W;
# Pillow crops (round(j), round(i), round(j + w), round(i + h)) with Python's round (half to even).
COORDS = [
    ((10 / 224, 20 / 224, 100 / 224, 50 / 224), 224, 224, (20, 10, 70, 110)),
    ((0.05, 0.1, 0.5, 0.25), 200, 300, (30, 10, 105, 110)),
    # i = 1.5 -> 2, j = 0.5 -> 0 (half to even), j + w = 0.5 + 2.5 = 3, i + h = 1.5 + 2 = 3.5 -> 4
    ((0.375, 0.125, 0.5, 0.625), 4, 4, (0, 2, 3, 4)),
    # i = 2.5 -> 2, j = 1.5 -> 2, j + w = 2.5 -> 2 (an empty crop is what Pillow would cut), i + h = 3.5 -> 4
    ((0.625, 0.375, 0.25, 0.25), 4, 4, (2, 2, 2, 4)),
]


@pytest.mark.parametrize("coords, h, w, box", COORDS)
def test_coords_to_boxes_follow_pillows_rounding(coords, h, w, box):
    c = torch.tensor([coords], dtype=torch.float32)
    assert fkd.coords_to_boxes(c, h, w).tolist() == [list(box)]


@pytest.mark.parametrize("bbox, box, lam", [
    # SRe2L: images[:, :, bbx1:bbx2, bby1:bby2] on [B, C, 16, 16] -> rows 2:10, columns 5:12
    ((2, 5, 10, 12), (5, 2, 12, 10), 1 - 7 * 8 / 256),
    ((0, 0, 16, 4), (0, 0, 4, 16), 1 - 4 * 16 / 256),
    ((3, 3, 3, 9), (3, 3, 9, 3), 1.0),                      # clipped to nothing: the image keeps all
])
def test_bbox_axes_and_area_corrected_lambda(bbox, box, lam):
    assert fkd.bbox_to_box(bbox) == box and fkd.box_to_bbox(box) == bbox
    assert fkd.area_lam(box, 16, 16) == pytest.approx(lam, abs=0)
    # the same pixels: SRe2L's paste (rows bbx, columns bby) == ours (rows y, columns x)
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    perm = torch.tensor([1, 0])
    ref = x.clone()
    ref[:, :, bbox[0]:bbox[2], bbox[1]:bbox[3]] = x[perm, :, bbox[0]:bbox[2], bbox[1]:bbox[3]]
    from hello_ray.data.augment import apply_cutmix

    assert torch.equal(apply_cutmix(x, perm, box), ref)


def test_boxes_to_coords_round_trip_exactly():
    g = torch.Generator().manual_seed(0)
    for h, w in ((224, 224), (32, 32), (500, 375)):
        x0 = torch.randint(0, w - 1, (200,), generator=g)
        y0 = torch.randint(0, h - 1, (200,), generator=g)
        x1 = x0 + 1 + (torch.rand(200, generator=g) * (w - x0 - 1)).long()
        y1 = y0 + 1 + (torch.rand(200, generator=g) * (h - y0 - 1)).long()
        boxes = torch.stack([x0, y0, x1, y1], 1)
        coords = fkd.boxes_to_coords(boxes, h, w)
        assert coords.dtype == torch.float32 and torch.equal(fkd.coords_to_boxes(coords, h, w), boxes)


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_export_then_import_replays_identical_views_and_logits(store, tmp_path, alpha):
    plan = _relabelled(store, alpha)
    out = tmp_path / "fkd"
    info = export_fkd(store, "evaluate-x", str(out))
    assert info["epochs"] == 2 and sorted(os.listdir(out / "epoch_1")) == ["batch_0.tar", "batch_1.tar", "batch_2.tar"]
    rec = torch.load(out / "epoch_0" / "batch_0.tar", weights_only=True)     # plain data, no allow-list
    assert len(rec) == 6 and rec[0].dtype == torch.float32 and rec[5].dtype == torch.float16
    key = import_fkd(str(out), store, "external-x")
    assert key.startswith("labels-") and import_fkd(str(out), store, "external-x") == key   # cached
    ours, back = StoredLabels(store, "evaluate-x"), StoredLabels(store, key)
    assert back.plan.epochs == plan.epochs and back.plan.batch_size == plan.batch_size
    for e in range(plan.epochs):
        a, b = ours.epoch_views(e, 0), back.epoch_views(e, 0)
        assert len(a) == len(b) == 3
        for va, vb in zip(a, b):
            for f in ("index", "boxes", "flips", "perm", "box", "logits"):
                assert torch.equal(getattr(va, f), getattr(vb, f)), (e, f)
            assert va.lam == vb.lam
    assert any(v.lam < 1 for v in ours.epoch_views(0, 0)) == (alpha > 0)


def test_sre2l_records_import_with_the_seeded_image_order(store, tmp_path):
    saved = write_sre2l_records(tmp_path / "sre2l", N, 3, 2, C, size=SIZE)
    back = StoredLabels(store, import_fkd(str(tmp_path / "sre2l"), store, "external-x"))
    views = {e: back.epoch_views(e, 0) for e in (0, 1)}
    for e, b, idx, rec in saved:
        v = views[e][b]
        assert v.index.tolist() == idx and torch.equal(v.logits, rec[5]) and torch.equal(v.perm, rec[2])
        assert v.box.tolist() == [5, 2, 12, 10] and v.lam == np.float32(1 - 7 * 8 / 256)
        i, j = (rec[0][:, 0] * SIZE).round().long(), (rec[0][:, 1] * SIZE).round().long()
        assert torch.equal(v.boxes, torch.stack([j, i, torch.full_like(i, SIZE), torch.full_like(i, SIZE)], 1))
    # the seeded order is torch's RandomSampler, two epochs differ
    assert views[0][0].index.tolist() != views[1][0].index.tolist()


class _Marker:
    """Unpickling this calls open(path, 'w'): a file appears if the loader runs it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_record_that_would_run_code_is_refused_unrun(store, tmp_path):
    marker = tmp_path / "PWNED"
    src = tmp_path / "evil"
    (src / "epoch_0").mkdir(parents=True)
    torch.save([torch.zeros(3, 4), torch.zeros(3, dtype=torch.bool), torch.arange(3), 0.5,
                [0, 0, 1, 1], _Marker(str(marker))], src / "epoch_0" / "batch_0.tar")
    with pytest.raises(fkd.FkdFormatError, match=r"evil/epoch_0/batch_0.tar: refusing to load it.*global (builtins|io).open"):
        import_fkd(str(src), store, "external-x")
    assert not marker.exists()
    assert not [k for k in store.list_artifacts() if k.startswith("labels-")]


@pytest.mark.parametrize("record, words", [
    ({"coords": 1}, "expected the list .* got dict"),
    ([torch.zeros(3, 4), torch.zeros(3), torch.arange(3), 0.5, None, torch.zeros(3, 3)], ".*MixUp"),
    ([torch.zeros(3, 5), torch.zeros(3), None, None, None, torch.zeros(3, 3)], r"coords must be a \[B, 4\]"),
])
def test_malformed_records_are_named(record, words):
    buf = io.BytesIO()
    torch.save(record, buf)
    with pytest.raises(fkd.FkdFormatError, match=f"x/batch_0.tar: {words}"):
        fkd.load_record(buf.getvalue(), "x/batch_0.tar")
    with pytest.raises(fkd.FkdFormatError, match="x/batch_0.tar: not a plain tensor/list record"):
        fkd.load_record(b"garbage", "x/batch_0.tar")


@pytest.mark.parametrize("pool", ["lpld", "random"])
def test_imported_labels_pruned_replay_the_kept_batches(store, tmp_path, pool):
    """stored/N on imported labels: the kept batches (RelabelPlan.kept) copied as real files."""
    from hello_ray.labels import prune_stored

    write_sre2l_records(tmp_path / "rec", N, 2, 3, C, size=SIZE)                    # 3 epochs x 4 batches: T = 12
    key = import_fkd(str(tmp_path / "rec"), store, "external-x")
    nbytes = prune_stored(store, key, "evaluate-p", 4, pool)
    pruned, full = StoredLabels(store, "evaluate-p", 4), StoredLabels(store, key)
    kept = RelabelPlan(3, 2, SIZE, 1.0, 42, prune=4, pool=pool).kept(N)
    assert pruned.meta["kept"] == [list(k) for k in kept] and len(kept) == 3 and pruned.shipped_bytes() == nbytes
    assert (kept == [(0, 0), (0, 1), (0, 2)]) == (pool == "lpld")
    for (e, b), v in zip(kept, pruned.pool()):
        assert torch.equal(v.logits, full.epoch_views(e, 0)[b].logits) and torch.equal(v.index, full.epoch_views(e, 0)[b].index)
    assert nbytes < full.shipped_bytes()


def test_a_crop_outside_the_image_is_named(store, tmp_path):
    src = tmp_path / "bad"
    (src / "epoch_0").mkdir(parents=True)
    coords = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * N)
    coords[3] = torch.tensor([0.5, 0.5, 0.75, 0.25])                         # rows 8..20 of 16
    torch.save([coords, torch.zeros(N, dtype=torch.bool), None, None, None, torch.zeros(N, C).half()],
               src / "epoch_0" / "batch_0.tar")
    with pytest.raises(fkd.FkdFormatError, match=r"bad/epoch_0/batch_0.tar: crop 3 .* not a box inside a 16 px"):
        import_fkd(str(src), store, "external-x", threads=2)


def test_sampler_indices_and_gaps(store, tmp_path):
    _relabelled(store)
    out = tmp_path / "fkd"
    export_fkd(store, "evaluate-x", str(out))
    order = json.loads((out / fkd.SAMPLER_INDICES).read_text())
    assert sorted(order["0"]) == list(range(N))                               # every image once per epoch
    (out / "epoch_1" / "batch_1.tar").unlink()
    with pytest.raises(fkd.FkdFormatError, match="missing epoch_1/batch_1.tar"):
        import_fkd(str(out), store, "external-x")


def test_cli_export_then_import(store, tmp_path, capsys):
    from hello_ray.cli import main

    _relabelled(store)
    assert main(["labels-export", "evaluate-x", "--store", store.uri, "--to", str(tmp_path / "out")]) == 0
    assert main(["labels-import", str(tmp_path / "out"), "--store", store.uri, "--images", "external-x"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("labels-") and StoredLabels(store, key).meta["n_images"] == N
    assert main(["labels-import", str(tmp_path / "nothing"), "--store", store.uri, "--images", "external-x"]) == 2
    assert "no FKD records" in capsys.readouterr().err
