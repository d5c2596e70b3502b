"""The student's views: one sequence per seed for every label strategy, rows built alone equal the
whole batch's, the draws are those of the batched augmentations, and the step's loss checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hello_ray.config import ConfigError, load_config
from hello_ray.data.augment import cutmix, random_resized_crop_flip
from hello_ray.failures import NonFiniteLoss
from hello_ray.labels import (HardLabels, LabelStrategy, ProjectorLabels, RelabelPlan, StoredLabels, TeacherLabels,
                              relabel, write_stored_meta)
from hello_ray.models.zoo import build_model
from hello_ray.stages.evaluate import stored_seed
from hello_ray.failures import LossLog
from hello_ray.stages.evaluate_core import TrainSettings, train_student
from hello_ray.store import open_store
from hello_ray.views import View, draw_epoch, draw_view, epoch_order, view_batch

C, N, S, B, EPOCHS = 4, 20, 16, 6, 3       # classes, images, side, batch, epochs (4 batches, the last short)


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 3, S, S), generator=g, dtype=torch.uint8)   # [N, 3, S, S]
    labels = torch.arange(N) % C
    torch.manual_seed(0)
    teacher = TeacherLabels(build_model("conv3", C, S), C, S)
    torch.manual_seed(1)
    projector = ProjectorLabels(build_model("conv3", C, S), C, S, adapter_bytes=1)
    return images, labels, teacher, projector


def _settings() -> TrainSettings:
    return TrainSettings(epochs=EPOCHS, batch_size=B, lr=1e-3, weight_decay=0.0, cutmix_alpha=1.0, loss="mse_ce",
                         ce_weight=0.025, temperature=4.0, image_size=S, loss_check_every=3)


def _trace(strategy: LabelStrategy, images, labels, seed: int) -> list[tuple[int, View]]:
    """The (epoch, view) sequence a student of ``seed`` trains on with ``strategy``."""
    seen: list[tuple[int, View]] = []
    torch.manual_seed(seed)
    train_student(build_model("conv3", C, S), images, labels, strategy, _settings(), seed, torch.device("cpu"),
                  on_view=lambda e, v: seen.append((e, v)))
    return seen


def _same(a: View, b: View) -> bool:
    return (torch.equal(a.index, b.index) and torch.equal(a.boxes, b.boxes) and torch.equal(a.flips, b.flips)
            and torch.equal(a.perm, b.perm) and torch.equal(a.box, b.box) and abs(a.lam - b.lam) < 1e-6)


def _stored(store, key, images, teacher, seed: int, prune: int, folder_seed: int | None) -> StoredLabels:
    plan = RelabelPlan(epochs=EPOCHS, batch_size=B, image_size=S, cutmix_alpha=1.0, seed=seed, prune=prune)
    files = relabel(teacher.logits, images, plan, store, key, seed=folder_seed)
    write_stored_meta(store, key, plan, N, C, files, seed=folder_seed)
    return StoredLabels(store, key, prune, seed=folder_seed)


@pytest.mark.parametrize("seed,folder_seed", [(0, None), (5, 5)], ids=["first-seed", "later-seed"])
def test_every_strategy_of_a_seed_trains_on_one_view_sequence(tmp_path, tiny, seed, folder_seed):
    """hard, teacher, projector and stored see the same views in the same order; stored/4 replays
    views of that sequence (LPLD's pool, its first floor(T/4) batches); both replay bit for bit the
    logits the relabel wrote, which are the teacher's on exactly those pixels."""
    images, labels, teacher, projector = tiny
    store = open_store(str(tmp_path / "store"))
    stored = _stored(store, "evaluate-v", images, teacher, seed, 1, folder_seed)
    pruned = _stored(store, "evaluate-v", images, teacher, seed, 4, folder_seed)
    hard = HardLabels(np.asarray(labels), C, 1)
    ref = _trace(hard, images, labels, seed)
    per_epoch = math.ceil(N / B)
    assert len(ref) == EPOCHS * per_epoch
    for strategy in (teacher, projector, stored):
        got = _trace(strategy, images, labels, seed)
        assert [e for e, _ in got] == [e for e, _ in ref]
        assert all(_same(a, b) for (_, a), (_, b) in zip(got, ref)), strategy.name
    sequence = [v for _, v in ref]                    # global batch g = epoch * per_epoch + b
    replayed = _trace(pruned, images, labels, seed)
    pool = len(pruned.meta["kept"])
    assert pool == EPOCHS * per_epoch // 4
    for epoch, view in replayed:
        assert any(_same(view, sequence[g]) for g in range(pool)), f"epoch {epoch}: a view outside the pool"
    for strategy in (stored, pruned):
        for _, view in _trace(strategy, images, labels, seed):
            x = view.materialise(images, S)
            assert torch.equal(view.logits, teacher.logits(x).half())
    # Another seed is another sequence (the test can tell sequences apart).
    other = _trace(hard, images, labels, seed + 1)
    assert not all(_same(a, b) for (_, a), (_, b) in zip(other, ref))


@pytest.mark.parametrize("views,spec,seed,imported,expected", [
    ("per_seed", "stored", 0, "", None),           # the first seed: the set that ships
    ("per_seed", "stored", 2, "", 2),              # a later seed: its own views, its own folder
    ("per_seed", "stored/10", 2, "", 2),
    ("per_seed", "hard", 2, "", None),             # online strategies have nothing stored
    ("per_seed", "stored", 2, "labels-abc", None),  # imported records are replayed as they are
    ("first_seed", "stored", 2, "", None),         # one relabel pass for every seed (SRe2L/FKD)
])
def test_which_relabel_a_stored_row_replays(views, spec, seed, imported, expected):
    cfg = load_config(None, overrides=["data.source=/data", "evaluate.seeds=[0, 1, 2]", f"evaluate.stored_views={views}"]
                      + ([f"evaluate.stored_labels={imported}"] if imported else []))
    assert stored_seed(cfg, spec, seed) == expected


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_a_ranks_rows_equal_those_rows_of_the_whole_batch(tiny, world, alpha):
    images = tiny[0]
    g = torch.Generator().manual_seed(3)
    view = draw_view(torch.randperm(N, generator=g)[:9], S, S, S - 4, alpha, g)
    whole = view.materialise(images, S - 4)                                   # [9, 3, S-4, S-4]
    for rank, part in enumerate(torch.tensor_split(torch.arange(9), world)):
        assert torch.equal(view.materialise(images, S - 4, part), whole[part]), f"rank {rank}"


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_drawing_then_building_is_the_batched_augmentation(tiny, alpha):
    """draw_view walks the generator exactly as RandomResizedCrop + flip then CutMix on the built
    batch did, so a seed gives the views (and pixels) it gave before views were drawn apart."""
    images, labels = tiny[0], tiny[1]
    index = torch.arange(N)[::2]
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    x, boxes, flips = random_resized_crop_flip(images[index].float() / 255, 12, generator=g1)
    x, _, _, lam, perm, box = cutmix(x, labels[index], alpha, generator=g1)
    view, built = view_batch(images, index, 12, alpha, g2)
    assert torch.equal(view.boxes, boxes) and torch.equal(view.flips, flips) and torch.equal(view.perm, perm)
    assert tuple(view.box.tolist()) == tuple(box) and view.lam == pytest.approx(lam)
    assert torch.equal(built, x)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))   # same stream position


def test_draw_epoch_is_epoch_order_then_one_view_per_batch():
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    views = draw_epoch(N, S, S, B, S, 1.0, g1)
    order = epoch_order(N, B, g2)
    assert [len(v.index) for v in views] == [len(o) for o in order] == [6, 6, 6, 2]
    assert torch.equal(views[0].index, order[0])


def test_the_loss_log_reads_every_n_steps_and_names_the_first_bad_step():
    log = LossLog(torch.device("cpu"), every=4, stage="evaluate", hint="row r")
    for _ in range(5):
        log.add(torch.tensor(1.0), epoch=1)
    assert log.n == 1 and log.last == 1.0                     # read once after 4 steps
    log.add(torch.tensor(float("nan")), epoch=1)              # step 6
    log.add(torch.tensor(2.0), epoch=1)
    with pytest.raises(NonFiniteLoss, match="evaluate.*epoch 1, step 6"):
        log.read(epoch=1)


def test_bf16_students_train_with_a_finite_loss(tiny):
    images, labels = tiny[0], tiny[1]
    s = _settings()
    s.precision, s.epochs = "bf16", 1
    torch.manual_seed(0)
    out = train_student(build_model("conv3", C, S), images, labels, HardLabels(np.asarray(labels), C, 1), s, 0,
                        torch.device("cpu"))
    assert out["steps"] == math.ceil(N / B) and math.isfinite(out["final_loss"])


def test_the_new_evaluate_keys_are_checked():
    for key, value, words in [("evaluate.stored_views", "all", "'per_seed' or 'first_seed'"),
                              ("evaluate.precision", "fp16", "'fp32' or 'bf16'")]:
        with pytest.raises(ConfigError, match=f"config key '{key}': must be {words}"):
            load_config(None, overrides=["data.source=/data", f"{key}={value}"])


def test_loss_check_every_is_not_in_the_evaluate_key():
    from hello_ray.stages.evaluate import stage_config

    a = load_config(None, overrides=["data.source=/data"])
    b = load_config(None, overrides=["data.source=/data", "evaluate.loss_check_every=7"])
    c = load_config(None, overrides=["data.source=/data", "evaluate.precision=bf16"])
    assert stage_config(a) == stage_config(b) != stage_config(c)



DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_views_built_on_a_device_equal_the_cpu_pixels(tiny, device):
    """The same draws give the same pixels wherever the set lives (float tolerance on a GPU)."""
    images = tiny[0]
    g = torch.Generator().manual_seed(9)
    views = draw_epoch(N, S, S, B, 12, 1.0, g)
    on = images.to(device)
    for v in views:
        for rows in (None, torch.arange(len(v.index))[1::2]):
            cpu = v.materialise(images, 12, rows)
            dev = v.materialise(on, 12, rows)
            assert dev.device.type == device
            torch.testing.assert_close(dev.cpu(), cpu, rtol=0, atol=1e-5)
