"""Label strategies: exact replay of stored views, LPLD pruning, real shipped bytes, class checks."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hello_ray.accounting import stored_soft_label_bytes
from hello_ray.labels import (LABELS_DIR, ClassCountMismatch, HardLabels, LabelContext, LabelError, RelabelPlan,
                              StoredLabels, TeacherLabels, relabel, stored_name, write_stored_meta)
from hello_ray.models.zoo import build_model
from hello_ray.store import open_store

C, N, S = 4, 24, 16          # classes, distilled images, image side


@pytest.fixture(scope="module")
def tiny():
    """A tiny distilled set (uint8 [N,3,S,S], labels [N]) and a frozen zoo teacher labelling it."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 3, S, S), generator=g, dtype=torch.uint8)
    labels = torch.arange(N) % C
    torch.manual_seed(0)
    teacher = TeacherLabels(build_model("resnet18", C, S), C, S)
    return images, labels, teacher


def _relabel(store, key, tiny, prune=1, epochs=3, batch_size=8):
    images, labels, teacher = tiny
    plan = RelabelPlan(epochs=epochs, batch_size=batch_size, image_size=S, cutmix_alpha=1.0, seed=7, prune=prune)
    files = relabel(teacher.logits, images, plan, store, key)
    write_stored_meta(store, key, plan, N, C, files)
    return plan, StoredLabels(store, key, prune)


def _store_bytes(store, key, folder):
    names = [f for f in store.list_files(key) if f.startswith(f"{LABELS_DIR}/{folder}/")]
    return sum(len(store.get_bytes(key, f)) for f in names), names


def test_stored_replays_exactly_the_views_it_stored(tmp_path, tiny):
    images, labels, teacher = tiny
    store = open_store(str(tmp_path / "store"))
    plan, stored = _relabel(store, "evaluate-test", tiny)
    # Walk the same plan again: every stored view must rebuild the same pixels, and its stored
    # logits must be the teacher's logits of exactly those pixels (in fp16).
    seen = 0
    for epoch, b, view in plan.views(images):
        x = view.materialise(images, S)
        replay = stored.epoch_views(epoch, seed=123)[b]
        assert torch.equal(replay.index, view.index)
        assert torch.equal(replay.boxes, view.boxes) and torch.equal(replay.flips, view.flips)
        assert torch.equal(replay.perm, view.perm) and torch.equal(replay.box, view.box)
        assert replay.lam == pytest.approx(view.lam, rel=1e-6)
        assert torch.equal(replay.materialise(images, S), x)
        assert torch.equal(replay.logits, teacher.logits(x).half())
        ctx = LabelContext(y_a=labels[view.index], y_b=labels[view.index][view.perm], lam=view.lam,
                           num_classes=C, stored_logits=replay.logits)
        assert torch.equal(stored.label(x, ctx), replay.logits.float())
        seen += 1
    assert seen == 3 * 3                                   # 3 epochs x ceil(24 / 8) batches
    # The views really are augmented (not the identity crop of every image).
    assert any((v.boxes[:, 2:] - v.boxes[:, :2] < S).any() for v in stored.epoch_views(0, 0))


def test_stored_without_labels_is_a_named_error(tmp_path):
    store = open_store(str(tmp_path / "store"))
    store.put_bytes("evaluate-x", "other.txt", b"x")
    with pytest.raises(LabelError, match="evaluate-x.*stored-10/meta.json"):
        StoredLabels(store, "evaluate-x", prune=10)


def test_pruning_keeps_the_fraction_and_bytes_shrink(tmp_path, tiny):
    store = open_store(str(tmp_path / "store"))
    epochs, per_epoch = 8, 3
    plan_full, full = _relabel(store, "evaluate-p", tiny, prune=1, epochs=epochs)
    plan_4, pruned = _relabel(store, "evaluate-p", tiny, prune=4, epochs=epochs)
    total = epochs * per_epoch
    kept = plan_4.kept(N)
    assert len(kept) == total // 4 == len(pruned.pool())
    assert kept == plan_4.kept(N)                          # the seeded draw is reproducible
    # A kept batch is the very batch the unpruned pass stored (same RNG stream, fewer logits).
    for (e, b), view in zip(kept, pruned.pool()):
        ref = full.epoch_views(e, 0)[b]
        assert torch.equal(view.boxes, ref.boxes) and torch.equal(view.logits, ref.logits)
    # Each epoch draws a full epoch of batches from the pool, with replacement, seeded.
    draws = [pruned.epoch_views(e, seed=1) for e in range(epochs)]
    assert all(len(d) == per_epoch for d in draws)
    pool_ids = {id(v) for v in pruned.pool()}
    assert all(id(v) in pool_ids for d in draws for v in d)
    assert [id(v) for v in pruned.epoch_views(3, 1)] == [id(v) for v in draws[3]]
    # Bytes: real files, about 1/4 of the unpruned ones.
    full_bytes, _ = _store_bytes(store, "evaluate-p", "stored")
    pruned_bytes, _ = _store_bytes(store, "evaluate-p", "stored-4")
    assert full.shipped_bytes() == full_bytes and pruned.shipped_bytes() == pruned_bytes
    assert 0.2 < pruned_bytes / full_bytes < 0.3


def test_reported_bytes_equal_the_bytes_in_the_store(tmp_path, tiny):
    images, labels, teacher = tiny
    store = open_store(str(tmp_path / "store"))
    _, stored = _relabel(store, "evaluate-b", tiny, epochs=2)
    nbytes, names = _store_bytes(store, "evaluate-b", stored_name(1))
    assert stored.shipped_bytes() == nbytes
    assert sorted(names) == [f"{LABELS_DIR}/stored/epoch_0000.npz", f"{LABELS_DIR}/stored/epoch_0001.npz",
                             f"{LABELS_DIR}/stored/meta.json"]
    # The fp16 logits inside are exactly what `hello-ray storage` counts (one view per image per epoch).
    logits = sum(np.load(io.BytesIO(store.get_bytes("evaluate-b", n)))[k].nbytes
                 for n in names if n.endswith(".npz")
                 for k in np.load(io.BytesIO(store.get_bytes("evaluate-b", n))).files if k == "logits")
    assert logits == stored_soft_label_bytes(C, N // C, 2)
    assert nbytes > logits                                 # + boxes, flips, CutMix, index, meta
    hard = HardLabels.write(labels.numpy(), C, store, "evaluate-b")
    assert hard.shipped_bytes() == len(store.get_bytes("evaluate-b", f"{LABELS_DIR}/hard/labels.npy"))
    assert np.array_equal(np.load(io.BytesIO(store.get_bytes("evaluate-b", f"{LABELS_DIR}/hard/labels.npy"))),
                          labels.numpy())
    buf = io.BytesIO()
    torch.save(teacher.model.state_dict(), buf)
    assert teacher.shipped_bytes() == buf.tell() > 4 * 11_000_000  # ResNet-18 in fp32


def test_hard_labels_give_the_cutmix_mixed_cross_entropy():
    from hello_ray.stages.evaluate_core import TrainSettings, student_loss

    out = torch.randn(6, C)
    y_a, y_b = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([1, 1, 0, 2, 3, 3])
    ctx = LabelContext(y_a=y_a, y_b=y_b, lam=0.3, num_classes=C)
    hard = HardLabels(np.zeros(1), C, 1)
    target = hard.label(torch.zeros(6, 3, S, S), ctx)
    assert torch.allclose(target.sum(1), torch.ones(6))
    s = TrainSettings(1, 6, 1e-3, 0.0, 1.0, "mse_ce", 0.025, 4.0, S)
    want = 0.3 * F.cross_entropy(out, y_a) + 0.7 * F.cross_entropy(out, y_b)
    assert torch.allclose(student_loss(out, target, ctx, hard.soft, s), want, atol=1e-6)
    soft = torch.randn(6, C)
    assert torch.allclose(student_loss(out, soft, ctx, True, s), F.mse_loss(out, soft) + 0.025 * want, atol=1e-6)


def test_a_teacher_with_another_class_count_is_a_named_error():
    with pytest.raises(ClassCountMismatch, match="teachers artifact t1: the labeller predicts 5 classes.*has 4"):
        TeacherLabels(build_model("resnet18", 5, S), C, S, where="teachers artifact t1")


def test_bf16_labelling_returns_float32_logits_close_to_fp32():
    torch.manual_seed(0)
    teacher = TeacherLabels(build_model("resnet18", 10, 32), 10, 32)
    x = torch.rand(4, 3, 32, 32)
    exact = teacher.with_precision("fp32").logits(x)
    fast = teacher.with_precision("bf16").logits(x)
    assert fast.dtype == torch.float32 and fast.shape == exact.shape == (4, 10)
    assert not torch.equal(fast, exact)                          # autocast really ran in bf16
    torch.testing.assert_close(fast, exact, rtol=0.05, atol=0.05 * float(exact.abs().max()))
    with pytest.raises(ValueError, match="label precision 'fp16'"):
        teacher.with_precision("fp16")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def test_auto_precision_is_fp32_on_cpu_and_bf16_warns_where_the_cpu_emulates_it(caplog):
    import logging

    from hello_ray import labels as labels_module
    from hello_ray.runtime import native_bf16

    cpu = torch.device("cpu")
    flags = _cpu_flags()
    if flags and not any(f.startswith("avx512") or f.startswith("amx") for f in flags):
        assert not native_bf16(cpu)                              # AVX2 and older: oneDNN emulates bf16
    torch.manual_seed(0)
    teacher = TeacherLabels(build_model("resnet18", 10, 32), 10, 32).to(cpu)
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(teacher.with_precision("auto").logits(x), teacher.with_precision("fp32").logits(x))
    labels_module._warned_emulated.clear()
    with caplog.at_level(logging.WARNING, logger="hello_ray"):
        teacher.with_precision("bf16")
        teacher.with_precision("bf16")
    warned = [r for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warned) == (0 if native_bf16(cpu) else 1)         # once per process, not per call


@pytest.mark.parametrize("epochs,n_images,batch,prune,expected", [
    (300, 10, 10, 10, 30),      # T = 300 -> 30 (LPLD's float int((1 - 0.9) * 300) would give 29)
    (300, 100, 25, 10, 120),    # T = 1200
    (3, 7, 3, 4, 2),            # T = 9 (partial last batches) -> 2
    (1, 5, 5, 40, 1),           # T = 1 -> at least one batch
    (10, 1000, 100, 40, 2),     # T = 100 -> 2
])
def test_lpld_pool_is_the_first_floor_t_over_n_batches(epochs, n_images, batch, prune, expected):
    plan = RelabelPlan(epochs=epochs, batch_size=batch, image_size=8, cutmix_alpha=1.0, seed=0, prune=prune)
    per_epoch = -(-n_images // batch)
    every = [(e, b) for e in range(epochs) for b in range(per_epoch)]
    assert plan.kept(n_images) == every[:expected]           # a prefix in (epoch, batch) order
    old = RelabelPlan(epochs=epochs, batch_size=batch, image_size=8, cutmix_alpha=1.0, seed=0, prune=prune,
                      pool="random")
    assert len(old.kept(n_images)) == max(1, -(-len(every) // prune)) and set(old.kept(n_images)) <= set(every)


@pytest.mark.parametrize("per_epoch,pool,seed", [(3, 12, 0), (4, 7, 1), (1, 5, 2), (10, 30, 3)])
def test_lpld_epoch_draws_replace_an_epochs_last_batch_by_its_predecessor(per_epoch, pool, seed):
    stored = StoredLabels.__new__(StoredLabels)   # the draw needs only the plan and the meta
    stored.plan = RelabelPlan(epochs=100, batch_size=10, image_size=8, cutmix_alpha=1.0, seed=0, prune=10)
    stored.meta = {"n_images": 10 * per_epoch, "kept": [[0, 0]] * pool}
    draws = [stored.epoch_draw(e, seed) for e in range(20)]
    assert all(len(d) == per_epoch for d in draws)
    flat = [i for d in draws for i in d]
    assert all(0 <= i < pool for i in flat)
    if per_epoch > 1:
        assert not any((i + 1) % per_epoch == 0 for i in flat)   # never an epoch's last batch
    assert draws == [stored.epoch_draw(e, seed) for e in range(20)]  # seeded
    assert len(set(map(tuple, draws))) > 1                   # with replacement, other draws per epoch


@pytest.mark.parametrize("pool", ["lpld", "random"])
def test_pruned_labels_copied_from_the_unpruned_ones_equal_a_pruned_relabel(tmp_path, tiny, pool):
    """evaluate builds stored/N from the unpruned labels of the same views when it has them: the
    files are byte for byte those a pruned relabel pass writes (same views, same logits)."""
    from hello_ray.labels import prune_stored

    images, labels, teacher = tiny
    store = open_store(str(tmp_path / "store"))
    plan = RelabelPlan(epochs=4, batch_size=8, image_size=S, cutmix_alpha=1.0, seed=7, prune=3, pool=pool)
    write_stored_meta(store, "evaluate-a", plan, N, C, relabel(teacher.logits, images, plan, store, "evaluate-a",
                                                               seed=2), seed=2)
    full = RelabelPlan(epochs=4, batch_size=8, image_size=S, cutmix_alpha=1.0, seed=7, prune=1)
    write_stored_meta(store, "evaluate-b", full, N, C, relabel(teacher.logits, images, full, store, "evaluate-b",
                                                               seed=2), seed=2)
    prune_stored(store, "evaluate-b", "evaluate-b", 3, pool, seed=2, src_seed=2)
    folder = f"{LABELS_DIR}/{stored_name(3, seed=2)}/"
    made = {f: store.get_bytes("evaluate-a", f) for f in store.list_files("evaluate-a") if f.startswith(folder)}
    copied = {f: store.get_bytes("evaluate-b", f) for f in store.list_files("evaluate-b") if f.startswith(folder)}
    assert made and made == copied
