"""Every way to lighten labels on one axis: LPQLD's top-k stored labels and temperature schedule,
HALD's phases, DD-Ranking's fair scores, the frontier; each pinned against hand values."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from hello_ray.accounting import LPQLD_PUBLISHED, format_report, storage_report, topk_label_bytes
from hello_ray.config import ConfigError, load_config
from hello_ray.config.evaluate import lpqld_temperature, parse_phases
from hello_ray.labels import (LABELS_DIR, LabelContext, RelabelPlan, StoredLabels, StrategySpec, StrategySpecError,
                              parse_spec, prune_stored, relabel, replay_top_k, stored_name, top_k_stored,
                              write_stored_meta)
from hello_ray.report.frontier import frontier_table, on_frontier
from hello_ray.scores import augmentation_robust_score, fair_scores, label_robust_score, normalise
from hello_ray.stages.evaluate_core import TrainSettings, phase_bounds, smoothed_mixed_target, student_loss
from hello_ray.store import open_store


# ------------------------------------------------------------------------------------- specs

@pytest.mark.parametrize("spec, expected", [
    ("hard", StrategySpec("hard")),
    ("stored/10", StrategySpec("stored", prune=10)),
    ("stored@top5", StrategySpec("stored", topk=5)),
    ("stored/10@top100+phases", StrategySpec("stored", prune=10, topk=100, phases=True)),
    ("projector@int8", StrategySpec("projector", adapter_dtype="int8")),
    ("projector+phases", StrategySpec("projector", phases=True)),
    ("teacher+noaug", StrategySpec("teacher", noaug=True)),
    ("hard+noaug", StrategySpec("hard", noaug=True)),
])
def test_strategy_specs_parse(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec, words", [
    ("soft", "unknown label strategy 'soft'"),
    ("teacher/10", "only stored/N"),
    ("stored@top0", "@topK (K >= 1)"),
    ("stored@int8", "stored takes @topK"),
    ("projector@top5", "projector takes @fp32"),
    ("hard@top5", "hard takes no @modifier"),
    ("hard+phases", "hard labels are hard in every phase"),
    ("stored+noaug", "stored labels only exist for the augmented views"),
    ("projector+phases+phases", "given twice"),
    ("projector+fast", "unknown flag +fast"),
    ("stored/x", "unknown label strategy"),
])
def test_bad_strategy_specs_name_what_is_wrong(spec, words):
    with pytest.raises(StrategySpecError, match=words.replace("+", r"\+").replace("(", r"\(").replace(")", r"\)")):
        parse_spec(spec)


# ------------------------------------------------------------------------------- top-k bytes

class _Linear:
    """A fixed labeller: logits = mean pixel per channel x a seeded [3, C] matrix (distinct values)."""

    def __init__(self, classes: int):
        self.w = torch.randn(3, classes, generator=torch.Generator().manual_seed(classes))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3)) @ self.w                    # [B, C]


def _payload(store, key, folder) -> tuple[int, int]:
    """(bytes of the label arrays, bytes of every file) under labels/<folder>/."""
    arrays = files = 0
    for f in store.list_files(key):
        if not f.startswith(f"{LABELS_DIR}/{folder}/"):
            continue
        data = store.get_bytes(key, f)
        files += len(data)
        if f.endswith(".npz"):
            z = np.load(io.BytesIO(data))
            arrays += sum(z[k].nbytes for k in z.files if k in ("topv", "topi", "logits"))
    return arrays, files


@pytest.mark.parametrize("classes, ipc, k, epochs, prune, batch", [
    (10, 2, 3, 4, 1, 8),      # every batch, a partial last batch per epoch
    (10, 2, 5, 6, 3, 8),      # LPLD's pool of floor(T/3) batches
    (40, 1, 7, 5, 4, 16),
    (12, 3, 12, 3, 2, 10),    # k = C: the ids cost more than they save
])
def test_top_k_bytes_are_exact(tmp_path, classes, ipc, k, epochs, prune, batch):
    """The k fp16 logits + k int16 ids of every kept view: the formula ``hello-ray storage`` prints
    equals the label arrays in the files, and the reported bytes equal the files."""
    store = open_store(str(tmp_path / "store"))
    n = classes * ipc
    images = torch.randint(0, 256, (n, 3, 12, 12), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    plan = RelabelPlan(epochs=epochs, batch_size=batch, image_size=8, cutmix_alpha=1.0, seed=3)
    write_stored_meta(store, "ev", plan, n, classes, relabel(_Linear(classes), images, plan, store, "ev"))
    if prune > 1:
        prune_stored(store, "ev", "ev", prune)
    src = StoredLabels(store, "ev", prune)
    top = top_k_stored(store, src, "ev", k)
    arrays, files = _payload(store, "ev", stored_name(prune, topk=k))
    assert arrays == topk_label_bytes(classes, ipc, epochs, batch, prune, k)
    assert top == files == StoredLabels(store, "ev", prune, topk=k).shipped_bytes()


def test_files_of_the_per_batch_layout_are_still_read(tmp_path):
    """Layout 1 (eight arrays per batch, ``b{b:05d}_<field>``, written before layout 2) replays the
    same views as the layout written now."""
    from hello_ray.labels import _pack, _unpack

    store = open_store(str(tmp_path / "store"))
    images = torch.randint(0, 256, (20, 3, 12, 12), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    plan = RelabelPlan(epochs=1, batch_size=8, image_size=8, cutmix_alpha=1.0, seed=3)
    write_stored_meta(store, "ev", plan, 20, 10, relabel(_Linear(10), images, plan, store, "ev"))
    views = StoredLabels(store, "ev").epoch_views(0, 0)
    old = {}
    for b, v in enumerate(views):
        p = f"b{b:05d}_"
        old.update({p + "index": v.index.numpy().astype(np.int32), p + "boxes": v.boxes.numpy().astype(np.int16),
                    p + "flips": v.flips.numpy(), p + "perm": v.perm.numpy().astype(np.int32),
                    p + "lam": np.asarray([v.lam], dtype=np.float32), p + "box": v.box.numpy().astype(np.int32),
                    p + "logits": v.logits.numpy()})
    buf = io.BytesIO()
    np.savez(buf, **old)
    again = _unpack(buf.getvalue(), "old")
    assert len(again) == len(views) == 3
    for b, v in enumerate(views):
        for field in ("index", "boxes", "flips", "perm", "box", "logits"):
            assert torch.equal(getattr(again[b], field), getattr(v, field)), field
        assert again[b].lam == v.lam
    assert len(_pack(list(enumerate(views)))) < len(buf.getvalue())     # one array per field, not per batch


def test_top_k_views_keep_the_views_and_the_k_largest_logits(tmp_path):
    store = open_store(str(tmp_path / "store"))
    images = torch.randint(0, 256, (20, 3, 12, 12), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    plan = RelabelPlan(epochs=2, batch_size=8, image_size=8, cutmix_alpha=1.0, seed=3)
    write_stored_meta(store, "ev", plan, 20, 10, relabel(_Linear(10), images, plan, store, "ev"))
    full = StoredLabels(store, "ev")
    top_k_stored(store, full, "ev", 4)
    top = StoredLabels(store, "ev", topk=4)
    assert top.name == "stored@top4" and top.distribution and not full.distribution
    for e in range(2):
        for a, b in zip(full.epoch_views(e, 0), top.epoch_views(e, 0)):
            for field in ("index", "boxes", "flips", "perm", "box"):
                assert torch.equal(getattr(a, field), getattr(b, field))
            assert a.lam == b.lam and b.classes.dtype == torch.int64 and b.logits.dtype == torch.float16
            vals, idx = torch.topk(a.logits.float(), 4, dim=1)
            assert torch.equal(b.logits.float(), vals) and torch.equal(b.classes, idx)


# ------------------------------------------------------------------------------- top-k replay

# LPQLD train_FKD_LPQLD.py l. 723-764: softmax over the k logits at T, scattered into C zeros.
# values [2, 1, 0] at classes [3, 0, 4] of C = 5: e^2, e, 1 over their sum 11.107338 (T = 1);
# at T = 2: e, e^0.5, 1 over 5.367003; at T = 20: e^0.1, e^0.05, 1 over 3.156442.
@pytest.mark.parametrize("temperature, expected", [
    (1.0, [0.244728, 0.0, 0.0, 0.665241, 0.090031]),
    (2.0, [0.307196, 0.0, 0.0, 0.506480, 0.186324]),
    (20.0, [0.333056, 0.0, 0.0, 0.350132, 0.316812]),
])
def test_top_k_replay_is_lpqld_softmax_scattered_into_zeros(temperature, expected):
    values = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float16)
    classes = torch.tensor([[3, 0, 4]])
    p = replay_top_k(values, classes, 5, temperature)
    assert p.shape == (1, 5) and p.dtype == torch.float32
    assert p[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert float(p.sum()) == pytest.approx(1.0)


def test_stored_top_k_labels_give_the_replay_at_the_epochs_temperature(tmp_path):
    store = open_store(str(tmp_path / "store"))
    images = torch.randint(0, 256, (8, 3, 12, 12), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    plan = RelabelPlan(epochs=1, batch_size=8, image_size=8, cutmix_alpha=1.0, seed=3)
    write_stored_meta(store, "ev", plan, 8, 6, relabel(_Linear(6), images, plan, store, "ev"))
    top_k_stored(store, StoredLabels(store, "ev"), "ev", 2)
    strategy = StoredLabels(store, "ev", topk=2)
    view = strategy.epoch_views(0, 0)[0]
    ctx = LabelContext(y_a=torch.zeros(8, dtype=torch.long), y_b=torch.zeros(8, dtype=torch.long), lam=1.0,
                       num_classes=6, stored_logits=view.logits, stored_classes=view.classes, temperature=14.0)
    p = strategy.label(torch.zeros(8, 3, 8, 8), ctx)
    assert torch.allclose(p, replay_top_k(view.logits, view.classes, 6, 14.0))
    assert ((p > 0).sum(1) == 2).all()


# LPQLD: T = 20 x 0.7^floor(e / 30) with e 1-based, used while above 2, else 2 (train_FKD_LPQLD.py
# l. 515-518, l. 597). Our epochs are 0-based: epoch 29 is its epoch 30.
@pytest.mark.parametrize("epoch, expected", [
    (0, 20.0), (28, 20.0), (29, 14.0), (58, 14.0), (59, 9.8), (89, 6.86), (119, 4.802),
    (149, 3.3614), (179, 2.352980), (208, 2.352980), (209, 2.0), (299, 2.0),
])
def test_lpqld_temperature_schedule(epoch, expected):
    assert lpqld_temperature(epoch) == pytest.approx(expected, rel=1e-9)


def test_the_schedule_reaches_the_loss_and_the_student_keeps_its_own_temperature():
    s = TrainSettings(epochs=60, batch_size=1, lr=1e-3, weight_decay=0.0, cutmix_alpha=1.0, loss="kl_plain",
                      ce_weight=0.0, temperature=20.0, image_size=8, temperature_schedule="lpqld",
                      student_temperature=1.0)
    assert (s.label_temperature(0), s.label_temperature(29), s.student_temp(29)) == (20.0, 14.0, 1.0)
    out, logits = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[3.0, 1.0, 0.0]])
    ctx = LabelContext(y_a=torch.zeros(1, dtype=torch.long), y_b=torch.zeros(1, dtype=torch.long), lam=1.0,
                       num_classes=3)
    # logits labels at epoch 29: softmax(logits / 14) against log_softmax(out / 1)
    p = torch.softmax(logits / 14.0, 1)
    want = float((p * (p.log() - torch.log_softmax(out, 1))).sum())
    assert float(student_loss(out, logits, ctx, True, s, epoch=29)) == pytest.approx(want, rel=1e-6)


def test_probability_labels_enter_the_kl_as_they_are_zeros_included():
    """KL(p || q) with p = [0.5, 0.5, 0] and a uniform student over 3: 0.5 ln 1.5 x 2 = ln 1.5."""
    s = TrainSettings(epochs=1, batch_size=1, lr=1e-3, weight_decay=0.0, cutmix_alpha=1.0, loss="kl_plain",
                      ce_weight=0.0, temperature=20.0, image_size=8, student_temperature=1.0)
    ctx = LabelContext(y_a=torch.zeros(1, dtype=torch.long), y_b=torch.zeros(1, dtype=torch.long), lam=1.0,
                       num_classes=3)
    loss = student_loss(torch.zeros(1, 3), torch.tensor([[0.5, 0.5, 0.0]]), ctx, True, s, distribution=True)
    assert float(loss) == pytest.approx(math.log(1.5), rel=1e-6)
    with pytest.raises(ValueError, match="need a kl loss"):
        student_loss(torch.zeros(1, 3), torch.tensor([[0.5, 0.5, 0.0]]), ctx, True,
                     TrainSettings(**{**s.__dict__, "loss": "mse_ce"}), distribution=True)


# ------------------------------------------------------------------------------------- phases

@pytest.mark.parametrize("epochs, phases, expected", [
    (300, "soft:75,hard:150,soft:75", [("soft", 0, 75), ("hard", 75, 225), ("soft", 225, 300)]),  # HALD's
    (15, "soft:75,hard:150,soft:75", [("soft", 0, 4), ("hard", 4, 11), ("soft", 11, 15)]),       # 3.75, 11.25
    (4, "soft:1,hard:2,soft:1", [("soft", 0, 1), ("hard", 1, 3), ("soft", 3, 4)]),
    (2, "soft:75,hard:150,soft:75", [("soft", 0, 1), ("hard", 1, 2)]),                          # 0.5 -> 1
    (10, "hard:1,soft:1", [("hard", 0, 5), ("soft", 5, 10)]),
    (7, "soft:3", [("soft", 0, 7)]),
])
def test_phase_boundaries_scale_to_the_runs_epochs(epochs, phases, expected):
    bounds = phase_bounds(parse_phases(phases), epochs)
    assert bounds == expected
    assert bounds[0][1] == 0 and bounds[-1][2] == epochs
    assert all(a[2] == b[1] for a, b in zip(bounds, bounds[1:]))


def test_a_phased_row_replays_in_soft_epochs_and_draws_fresh_views_in_hard_ones(tmp_path):
    """soft:1,hard:2,soft:1 over 4 epochs with stored labels: epoch 0 replays stored epoch 0, epochs 1-2
    train on fresh views (no stored logits), epoch 3 replays stored epoch 1 (the second soft epoch)."""
    from hello_ray.models.zoo import build_model
    from hello_ray.stages.evaluate_core import train_student

    store = open_store(str(tmp_path / "store"))
    images = torch.randint(0, 256, (20, 3, 12, 12), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    labels = torch.arange(20) % 10
    plan = RelabelPlan(epochs=4, batch_size=8, image_size=12, cutmix_alpha=1.0, seed=0)
    write_stored_meta(store, "ev", plan, 20, 10, relabel(_Linear(10), images, plan, store, "ev"))
    stored = StoredLabels(store, "ev")
    s = TrainSettings(epochs=4, batch_size=8, lr=1e-3, weight_decay=0.0, cutmix_alpha=1.0, loss="kl_plain",
                      ce_weight=0.0, temperature=4.0, image_size=12, phases=(("soft", 1), ("hard", 2), ("soft", 1)))
    seen: dict[int, list] = {}
    torch.manual_seed(0)
    out = train_student(build_model("conv3", 10, 12), images, labels, stored, s, 0, torch.device("cpu"),
                        on_view=lambda e, v: seen.setdefault(e, []).append(v))
    assert out["steps"] == 12 and np.isfinite(out["final_loss"])
    for epoch, replayed in ((0, 0), (3, 1)):
        assert [v.index.tolist() for v in seen[epoch]] == [v.index.tolist() for v in stored.epoch_views(replayed, 0)]
        assert all(v.logits is not None for v in seen[epoch])
    assert all(v.logits is None for e in (1, 2) for v in seen[e])          # fresh views, labelled hard


@pytest.mark.parametrize("bad", ["soft", "soft:0", "warm:3", "soft:1,,hard:2"])
def test_bad_phase_schedules_name_the_key(bad):
    with pytest.raises(ConfigError, match="evaluate.phases"):
        load_config(None, overrides=[f"evaluate.phases={bad}", "data.source=/data"])


def test_hard_phase_targets_are_halds_smoothed_cutmix_labels():
    """timm's mixup_target: eps/C on every class, 1 - eps more on the true one, mixed lam : 1 - lam.
    C = 4, eps 0.8: [0.4, 0.2, 0.2, 0.2] and [0.2, 0.2, 0.4, 0.2] mixed 0.75 : 0.25."""
    t = smoothed_mixed_target(torch.tensor([0]), torch.tensor([2]), 0.75, 4, 0.8)
    assert t[0].tolist() == pytest.approx([0.35, 0.2, 0.25, 0.2])
    t = smoothed_mixed_target(torch.tensor([5]), torch.tensor([5]), 0.3, 1000, 0.8)   # HALD at ImageNet-1K
    assert float(t[0, 5]) == pytest.approx(0.2008) and float(t[0, 0]) == pytest.approx(0.0008)


# ---------------------------------------------------------------------------------- fair scores

# DD-Ranking @ b8b0966: LRS = norm(w IOR - (1 - w) HLR), ARS = norm(g S_aug + (1 - g) S_naug),
# norm(x) = (e^x - e^-1) / (e - e^-1) (metrics/hard_label.py l. 380-383, soft_label.py l. 561-564,
# aug_robust.py l. 577-580).
@pytest.mark.parametrize("x, expected", [(-1, 0.0), (0, 0.268941), (1, 1.0), (-0.05, 0.248192), (0.1, 0.313687),
                                         (-5, -0.153651)])
def test_normalisation(x, expected):
    assert normalise(x) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("full, syn_hard, syn, rdm, w, hlr, ior, lrs", [
    (0.60, 0.40, 0.40, 0.30, 0.5, 0.20, 0.10, 0.248192),     # fractions: alpha = 0.05 - 0.10 = -0.05
    (60.0, 40.0, 40.0, 30.0, 0.5, 20.0, 10.0, -0.153651),    # percent, as DD-Ranking's code: alpha = -5
    (0.50, 0.45, 0.55, 0.35, 0.5, 0.05, 0.20, 0.302078),     # soft labels: alpha = 0.1 - 0.025
    (0.50, 0.45, 0.55, 0.35, 1.0, 0.05, 0.20, 0.363139),     # w = 1: IOR alone, alpha = 0.2
])
def test_label_robust_score(full, syn_hard, syn, rdm, w, hlr, ior, lrs):
    got = label_robust_score(full, syn_hard, syn, rdm, w)
    assert got["hlr"] == pytest.approx(hlr) and got["ior"] == pytest.approx(ior)
    assert got["lrs"] == pytest.approx(lrs, abs=1e-6)


@pytest.mark.parametrize("syn_aug, rdm_aug, syn_naug, rdm_naug, g, ars", [
    (0.50, 0.40, 0.45, 0.35, 0.5, 0.313687),     # both gaps 0.1
    (0.50, 0.40, 0.30, 0.40, 0.5, 0.268941),     # 0.1 and -0.1 cancel
    (0.50, 0.40, 0.30, 0.40, 0.0, 0.228454),     # only the gap without augmentation: -0.1
])
def test_augmentation_robust_score(syn_aug, rdm_aug, syn_naug, rdm_naug, g, ars):
    assert augmentation_robust_score(syn_aug, rdm_aug, syn_naug, rdm_naug, g)["ars"] == pytest.approx(ars, abs=1e-6)


def _rows(table):
    return [{"images": i, "student": "conv3", "strategy": s, "seed": seed, "top1": t, "continual_steps": 0}
            for (i, s), per_seed in table.items() for seed, t in enumerate(per_seed)]


def test_fair_scores_pair_each_seeds_rows_and_average_over_seeds():
    rows = _rows({("distilled", "hard"): [0.40, 0.42], ("floor", "hard"): [0.30, 0.30],
                  ("distilled", "stored"): [0.50, 0.46], ("floor", "stored"): [0.45, 0.45],
                  ("distilled", "projector"): [0.50, 0.50],                       # no floor row: no score
                  ("distilled", "hard+noaug"): [0.35, 0.35], ("floor", "hard+noaug"): [0.35, 0.33],
                  ("full", "hard"): [0.60, 0.62]})
    scores = {s["strategy"]: s for s in fair_scores(rows, scale="fraction")}
    assert set(scores) == {"hard", "stored"}
    # hard, seed 0: HLR 0.20, IOR 0.10 -> -0.05; seed 1: HLR 0.20, IOR 0.12 -> -0.04
    lrs = [normalise(0.5 * 0.10 - 0.5 * 0.20), normalise(0.5 * 0.12 - 0.5 * 0.20)]
    assert scores["hard"]["lrs_mean"] == pytest.approx(np.mean(lrs)) and scores["hard"]["lrs_std"] == pytest.approx(np.std(lrs))
    # ARS of hard: seed 0 gaps 0.10 and 0.00; seed 1 0.12 and 0.02
    ars = [normalise(0.05), normalise(0.07)]
    assert scores["hard"]["ars_mean"] == pytest.approx(np.mean(ars))
    # stored (the soft-label variant): IOR on its own labels, HLR from the hard rows
    lrs = [normalise(0.5 * 0.05 - 0.5 * 0.20), normalise(0.5 * 0.01 - 0.5 * 0.20)]
    assert scores["stored"]["lrs_mean"] == pytest.approx(np.mean(lrs)) and scores["stored"]["ars_mean"] is None
    # Without a full row, evaluate.full_top1 stands in; without either, no LRS
    given = fair_scores([r for r in rows if r["images"] != "full"], full_top1=0.6, scale="fraction")
    assert given[0]["lrs_seeds"] == 2 and given[0]["hlr_mean"] == pytest.approx(0.19)
    assert all(s["lrs_mean"] is None for s in fair_scores([r for r in rows if r["images"] != "full"]))
    # percent (DD-Ranking's code): the same gaps x 100
    pct = {s["strategy"]: s for s in fair_scores(rows)}
    assert pct["hard"]["hlr_mean"] == pytest.approx(20.0) and pct["hard"]["lrs_mean"] == pytest.approx(
        np.mean([normalise(0.5 * 10 - 0.5 * 20), normalise(0.5 * 12 - 0.5 * 20)]))


# ------------------------------------------------------------------------------------ frontier

def test_the_frontier_is_each_image_sets_points_nothing_dominates():
    points = [{"images": images, "student": "s", "strategy": name, "label_bytes": b, "top1_mean": t,
               "top1_std": 0.0, "continual_steps": 0, "train_images": 10}
              for images, name, b, t in [
                  ("distilled", "stored", 1000, 0.6), ("distilled", "stored/10", 100, 0.5),
                  ("distilled", "stored/10@top5", 100, 0.4), ("distilled", "projector", 2000, 0.55),
                  ("distilled", "hard", 50, 0.3), ("distilled", "teacher", 50, 0.3),
                  ("distilled", "hard+noaug", 50, 0.9),          # an ARS control: not compared
                  ("floor", "hard", 50, 0.35), ("floor", "stored", 1000, 0.5),   # the controls' own frontier
                  ("full", "hard", 200, 0.95)]]                  # a reference: not compared
    assert on_frontier(points) == [True, True, False, False, True, True, False, True, True, False]
    headers, body = frontier_table(points)
    rows = [dict(zip(headers, r)) for r in body]
    by = {(r["images"], r["strategy"]): r for r in rows}
    assert [r["images"] for r in rows] == ["distilled"] * 7 + ["floor"] * 2 + ["full"]
    assert [r["strategy"] for r in rows][:3] == ["hard+noaug", "hard", "teacher"]            # by bytes, then top-1
    assert by[("distilled", "stored/10")]["bytes / image"] == "10.0"
    assert by[("distilled", "stored/10")]["x smaller than stored"] == "10.0"
    assert by[("distilled", "projector")]["frontier"] == "" and by[("distilled", "stored")]["frontier"] == "yes"
    assert by[("distilled", "hard+noaug")]["frontier"] == "-" and by[("full", "hard")]["frontier"] == "-"
    assert by[("floor", "hard")]["x smaller than stored"] == "20.0"                          # the floor's stored


# ------------------------------------------------------------------------------- storage, config

def test_storage_prints_top_k_rows_beside_lpqlds_published_sizes(capsys):
    from hello_ray import cli

    assert cli.main(["storage", "--classes", "1000", "--ipc", "10"]) == 0          # as the README shows it
    out = capsys.readouterr().out
    assert "stored / 10 @ top10 (LPQLD)" in out and "x200  stored/10@top10    published 0.03 GB" in out
    r = storage_report(1000, 10)
    views = 300 * 10_000 // 10          # LPLD's pool of 1/10 at batch 100: 30,000 batches -> 3,000
    assert r["stored_topk_bytes"] == {f"10@top{k}": views * k * 4 for k in (100, 50, 10)}
    text = format_report(r)
    for (n, k), (tag, gb, top1) in LPQLD_PUBLISHED.items():
        assert f"published {gb:.2f} GB, top-1 {top1} %" in text
    assert "stored / 10 @ top100 (LPQLD)" in text
    assert "LPQLD's published" not in format_report(storage_report(100, 10))


def test_top_k_needs_a_kl_loss_and_phases_a_schedule():
    with pytest.raises(ConfigError, match="evaluate.loss.*kl"):
        load_config("smoke", overrides=["evaluate.strategies=[stored@top5]"])
    with pytest.raises(ConfigError, match="evaluate.phases.*needs a phase schedule"):
        load_config("smoke", overrides=["evaluate.strategies=[projector+phases]"])
    cfg = load_config("smoke", overrides=["evaluate.strategies=[stored@top5]", "evaluate.protocol=lpqld"])
    ev = cfg.evaluate
    assert (ev.loss, ev.temperature, ev.temperature_schedule, ev.student_temperature) == ("kl_plain", 20.0, "lpqld", 1.0)
    ev = load_config("smoke", overrides=["evaluate.protocol=hald", "evaluate.strategies=[stored+phases]"]).evaluate
    assert (ev.phases, ev.label_smoothing, ev.schedule) == ("soft:75,hard:150,soft:75", 0.8, "half_cosine_epoch")


def test_the_new_keys_at_their_defaults_leave_evaluate_keys_as_they_were():
    from hello_ray.stages import evaluate

    plain = evaluate.stage_config(load_config("smoke"))["evaluate"]
    assert not {"temperature_schedule", "student_temperature", "phases", "label_smoothing", "full_data",
                "full_top1", "score_scale", "score_weight"} & set(plain)
    lpqld = evaluate.stage_config(load_config("smoke", overrides=["evaluate.protocol=lpqld"]))["evaluate"]
    assert lpqld["temperature_schedule"] == "lpqld" and lpqld["student_temperature"] == 1.0


def test_hello_ray_scores_names_what_it_cannot_score(tmp_path, capsys):
    from hello_ray import cli

    store = str(tmp_path / "store")
    assert cli.main(["scores", "--store", store]) == 1
    assert "no finished evaluate artifact" in capsys.readouterr().err
    assert cli.main(["scores", "--store", store, "--key", "evaluate-0123456789ab"]) == 1
    assert "evaluate-0123456789ab" in capsys.readouterr().err
    assert cli.main(["scores", "--store", store, "--weight", "2"]) == 2
    assert "fractions in [0, 1]" in capsys.readouterr().err


def test_full_data_refuses_a_split_it_cannot_hold_before_reading_it():
    """ImageNet-1K's 1,281,167 training images at 224 px are 180 GiB decoded: refused by name, with the
    way out (evaluate.full_top1); CIFAR-100's 50,000 at 32 px pass."""
    from types import SimpleNamespace

    from hello_ray.stages.evaluate_inputs import check_full_size

    data = load_config("imagenet1k", overrides=["data.source=/data"]).data
    with pytest.raises(ConfigError, match=r"evaluate.full_data.*1,281,167 images.*evaluate.full_top1"):
        check_full_size(data, SimpleNamespace(num_rows=1_281_167))
    small = load_config("smoke").data
    small.image_size = 32
    check_full_size(small, SimpleNamespace(num_rows=50_000))
    check_full_size(data, SimpleNamespace(num_rows=None))       # unknown without reading (webdataset): not refused
