"""Stage recover: SRe2L / LPLD image synthesis. The plain-PyTorch core on a tiny BatchNorm net, then
one Ray run on the smoke data against the core."""
from __future__ import annotations

import copy
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from builders import write_teachers
import torch
from torch import nn

from hello_ray.stages import recover_core as core

C, S = 3, 12  # classes, image side of the core tests


class TinyBN(nn.Module):
    """Two conv + BatchNorm layers and a linear head: [N, 3, S, S] in [0, 1] -> logits [N, C]."""

    def __init__(self, classes: int = C):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def _images(n_per_class: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [C * n, S, S, 3]: class c is tinted in channel c, so the classes' statistics differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(C * n_per_class, S, S, 3, generator=g) * 0.6
    labels = torch.arange(C).repeat_interleave(n_per_class)
    x[torch.arange(len(x)), :, :, labels] += 0.4
    return (x * 255).round().to(torch.uint8), labels


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as a half-CPU Ray actor runs: on a busy 2-core machine two threads make
    these tiny ops 30x slower, and the Ray test compares pixels with the actor's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def observer() -> nn.Module:
    """TinyBN trained on the tinted classes (60 Adam steps, 0.2 s), then frozen in eval mode: a
    classifier with real running statistics."""
    torch.manual_seed(0)
    net = TinyBN()
    images, labels = _images(16, seed=1)
    x = images.permute(0, 3, 1, 2).float() / 255
    opt = torch.optim.Adam(net.parameters(), 0.02)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), labels).backward()
        opt.step()
    return net.eval().requires_grad_(False)


def _direct_moments(observer: nn.Module, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every image of one class in one forward pass; mean / biased var of each BN input, float64."""
    with core.BNInputs(observer, detach=True) as hooks:
        observer(images.permute(0, 3, 1, 2).float() / 255)
    return [(x.double().mean((0, 2, 3)), x.double().var((0, 2, 3), unbiased=False)) for x in hooks.captured()]


def test_class_stats_are_exact_mergeable_and_differ_by_class(observer):
    images, labels = _images()
    whole = core.class_stats(observer, images, labels, C, batch_size=5)     # batches straddle classes
    # Two halves in the other order, one of them through the Ray-row form: the same sums.
    a = core.class_stats(observer, images[13:], labels[13:], C, batch_size=7)
    b = core.class_stats(observer, images[:13], labels[:13], C, batch_size=13)
    merged = a.merge(core.ClassStats.empty(C, core.bn_layers(observer)))
    merged.add_rows(b.rows())
    restored = core.ClassStats.from_state(whole.state())
    for c in range(C):
        direct = _direct_moments(observer, images[labels == c])
        for stats in (whole, merged, restored):
            for (mean, var), (dm, dv) in zip(stats.moments(c), direct):
                assert torch.allclose(mean.double(), dm, rtol=1e-6, atol=1e-6)
                assert torch.allclose(var.double(), dv, rtol=1e-6, atol=1e-6)
    # Class-wise statistics differ from each other and from the global running ones.
    running = core.running_moments(observer)
    for layer in range(2):
        m0, m1 = whole.moments(0)[layer][0], whole.moments(1)[layer][0]
        assert (m0 - m1).abs().max() > 1e-2
        assert (m0 - running[layer][0]).abs().max() > 1e-2 and (m1 - running[layer][0]).abs().max() > 1e-2


def test_plan_units_cover_every_image_once():
    lpld = core.plan_units("lpld", 3, 5, 2)       # each class alone, its 5 images in batches of 2
    assert [u.slots for u in lpld[:3]] == [((0, 0), (0, 1)), ((0, 2), (0, 3)), ((0, 4),)]
    assert all(len(u.classes) == 1 for u in lpld) and len(lpld) == 9
    sre2l = core.plan_units("sre2l", 5, 2, 3)     # per image index k, 3 classes per batch
    assert [u.slots for u in sre2l[:2]] == [((0, 0), (1, 0), (2, 0)), ((3, 0), (4, 0))]
    for units, n_classes, ipc in ((lpld, 3, 5), (sre2l, 5, 2)):
        indices = [i for u in units for i in u.image_indices(ipc)]
        assert sorted(indices) == list(range(n_classes * ipc))
    seeds = {core.unit_seed(0, "lpld", u) for u in lpld}
    assert len(seeds) == len(lpld) and core.unit_seed(0, "lpld", lpld[0]) != core.unit_seed(1, "lpld", lpld[0])


@pytest.mark.parametrize("variant", ["lpld", "sre2l"])
def test_recover_lowers_its_objective_against_the_right_statistics(observer, variant):
    images, labels = _images()
    stats = core.class_stats(observer, images, labels, C)
    settings = core.RecoverSettings(iterations=40, lr=0.25, r_bn=0.05, first_bn_multiplier=10.0, jitter=2)
    unit = core.plan_units(variant, C, 2, 3)[1]                  # lpld: class 1's 2 images; sre2l: k = 1
    targets = core.unit_targets(variant, unit, observer, stats)
    seed = core.unit_seed(7, variant, unit)
    res = core.recover_unit(observer, torch.tensor([c for c, _ in unit.slots]), targets, settings, seed, S)
    assert len(res.objective) == len(res.bn) == len(res.ce) == 40
    assert res.objective[-1] < 0.2 * res.objective[0], (res.objective[0], res.objective[-1])
    assert res.bn[-1] < 0.5 * res.bn[0], (res.bn[0], res.bn[-1])
    assert res.images.dtype == torch.uint8 and res.images.shape == (len(unit.slots), S, S, 3)

    # The logged BN term of iteration 0 is measured against this unit's targets: rebuild that
    # iteration from the seed (the initial noise, then the first augmentation draws).
    gen = torch.Generator().manual_seed(seed)
    mean, std = core.input_normalisation(observer)
    z = torch.randn(len(unit.slots), 3, S, S, generator=gen)
    with torch.no_grad(), core.BNInputs(observer) as hooks:
        observer(core.augment(z, gen, settings.jitter) * std + mean)
        inputs = hooks.captured()
    assert float(core.bn_term(inputs, targets, 10.0)) == pytest.approx(res.bn[0], rel=1e-5)
    others = [core.running_moments(observer)] if variant == "lpld" else [stats.moments(0)]
    if variant == "lpld":
        others.append(stats.moments(0))                             # another class's statistics
    for other in others:
        assert abs(float(core.bn_term(inputs, other, 10.0)) - res.bn[0]) > 1e-3 * res.bn[0]

    # Seeded: the same seed gives the same pixels, another seed others.
    again = core.recover_unit(observer, torch.tensor([c for c, _ in unit.slots]), targets, settings, seed, S)
    assert torch.equal(again.images, res.images) and again.objective == res.objective
    other = core.recover_unit(observer, torch.tensor([c for c, _ in unit.slots]), targets, settings, seed + 1, S)
    assert not torch.equal(other.images, res.images)


def test_plan_steps_pack_equal_sized_batches_in_plan_order():
    units = core.plan_units("lpld", 3, 5, 2)                   # per class: batches of 2, 2, 1 images
    steps = core.plan_steps(units, 4)
    assert [[u.index for u in s] for s in steps] == [[0, 1, 3, 4], [6, 7], [2, 5, 8]]
    assert all(len({len(u.slots) for u in s}) == 1 for s in steps)
    assert sorted(u.index for s in steps for u in s) == list(range(len(units)))
    assert core.plan_steps(units, 1) == [[u] for u in units if len(u.slots) == 2] + \
        [[u] for u in units if len(u.slots) == 1]
    with pytest.raises(ValueError, match="units_per_step 0"):
        core.plan_steps(units, 0)


# (variant, ipc, batch_size, units per step, seed): every class in one step; classes split over steps
# with batches of two sizes (2, 2, 1 images per class); SRe2L's batches against the global statistics.
BATCHED = [("lpld", 3, 3, 3, 0), ("lpld", 5, 2, 4, 1), ("sre2l", 3, 2, 2, 2)]


@pytest.mark.parametrize("variant,ipc,batch_size,per_step,seed", BATCHED,
                         ids=[f"{v}-ipc{i}-b{b}-x{k}" for v, i, b, k, _ in BATCHED])
def test_batched_recover_equals_one_batch_at_a_time(observer, variant, ipc, batch_size, per_step, seed):
    """Several batches per forward pass, each against its own statistics, with its own draws and
    its own loss: the same pixels and per-iteration objective as each batch alone, up to float
    rounding (measured on a 2-core EPYC: at most 2e-6 in [0, 1] after 40 iterations, objective
    logs within a tenth of the tolerance). On this model the rounding stays small; on a deeper one
    Adam can amplify it in a pixel whose gradient is ~1e-8 (recover_core's docstring)."""
    images, labels = _images()
    stats = core.class_stats(observer, images, labels, C)
    settings = core.RecoverSettings(iterations=40, lr=0.25, r_bn=0.05, first_bn_multiplier=10.0, jitter=2)
    steps = core.plan_steps(core.plan_units(variant, C, ipc, batch_size), per_step)
    assert max(len(s) for s in steps) > 1                       # batches really share a forward pass
    alone, alone_res = core.recover_images(observer, variant, C, ipc, batch_size, settings, seed, S, stats,
                                           keep_pixels=True)
    packed, packed_res = core.recover_images(observer, variant, C, ipc, batch_size, settings, seed, S, stats,
                                             units_per_step=per_step, keep_pixels=True)
    for a, b in zip(alone_res, packed_res):
        assert a.pixels is not None and b.pixels is not None
        assert torch.allclose(a.pixels, b.pixels, rtol=0, atol=1e-4), float((a.pixels - b.pixels).abs().max())
        for k in ("objective", "bn", "ce"):
            assert len(getattr(b, k)) == 40
            assert getattr(b, k) == pytest.approx(getattr(a, k), rel=1e-4, abs=1e-5), k
    assert (alone.int() - packed.int()).abs().max() <= 1        # uint8: a rounding step at most
    # Not a trivial equality: the batches moved far from their noise, each its own way.
    assert all(r.objective[-1] < 0.5 * r.objective[0] for r in packed_res)
    assert (packed_res[0].pixels.mean((0, 2, 3)) - packed_res[-1].pixels.mean((0, 2, 3))).abs().max() > 1e-2


def test_recover_errors_name_what_is_wrong(observer):
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(C))
    with pytest.raises(core.RecoverError, match="no BatchNorm2d layer"):
        core.bn_layers(no_bn)
    images, labels = _images()
    keep = labels != 2                                              # class 2 has no training images
    stats = core.class_stats(observer, images[keep], labels[keep], C)
    with pytest.raises(core.RecoverError, match=r"class 'two' \(index 2\) has no training images"):
        core.unit_targets("lpld", core.plan_units("lpld", C, 1, 1)[2], observer, stats, ["zero", "one", "two"])
    # An infinite target makes the objective infinite: named by the batch and the iteration.
    bad = [(m, v) for m, v in core.running_moments(observer)]
    bad[1] = (bad[1][0], torch.full_like(bad[1][1], float("inf")))
    settings = core.RecoverSettings(iterations=3, lr=0.1, r_bn=0.05, first_bn_multiplier=10.0, jitter=0)
    with pytest.raises(core.RecoverError, match="class 'one' \\(index 1\\): the objective is not finite at iteration 0"):
        core.recover_unit(observer, torch.tensor([1]), bad, settings, 0, S, where="class 'one' (index 1)")
    # In a packed step the error names the batch that diverged; losses reach the host every
    # check_every iterations, and the error still names the first non-finite iteration.
    good = core.running_moments(observer)
    with pytest.raises(core.RecoverError, match="recover class 2: the objective is not finite at iteration 0"):
        core.recover_step(observer, [torch.tensor([0]), torch.tensor([2])], [good, bad], settings, [0, 1], S,
                          wheres=["class 0", "class 2"], check_every=2)
    # Packed batches need an eval-mode observer (train-mode BatchNorm would mix them) and one size.
    with pytest.raises(core.RecoverError, match="training mode"):
        core.recover_step(copy.deepcopy(observer).train(), [torch.tensor([0]), torch.tensor([2])], [good, good],
                          settings, [0, 1], S)
    with pytest.raises(ValueError, match="every batch of one size"):
        core.recover_step(observer, [torch.tensor([0]), torch.tensor([2, 2])], [good, good], settings, [0, 1], S)


# ---------------------------------------------------------------------------- on Ray

def _teachers_artifact(store, class_names: list[str], size: int) -> str:
    """A finished teachers artifact holding a random-init zoo ResNet-18 (with BatchNorm)."""
    return write_teachers(store, "resnet18", class_names, size, (0,), config={"test": "recover"})


def test_recover_actor_packs_classes_and_keeps_finished_ones(file_store_uri, monkeypatch):
    """The actor's call, without Ray: the unfinished batches of a call share a step, each gets its
    PNGs then its own marker; a batch with a marker is kept, not redone; the pixels are the core's
    for the same packing (batched = one at a time is the core test above)."""
    import io

    from hello_ray.data.images import decode_image
    from hello_ray.data.imageset import image_name
    from hello_ray.models.ensemble import load_observer
    from hello_ray.stages import recover
    from hello_ray.store import open_store

    monkeypatch.setattr("hello_ray.runtime.quiet_library_logs", lambda worker=False: None)  # this process's logs
    names, size, ipc = ["zero", "one", "two", "three"], 16, 2
    store = open_store(file_store_uri)
    teachers_key = _teachers_artifact(store, names, size)
    key = store.artifact_key(recover.STAGE, {"test": "actor"}, {"teachers": teachers_key})
    observer = load_observer(store, teachers_key)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(4 * len(names), size, size, 3, generator=g) * 255).to(torch.uint8)
    stats = core.class_stats(observer, images, torch.arange(len(names)).repeat(4), len(names))
    buf = io.BytesIO()
    torch.save(stats.state(), buf)
    store.put_bytes(key, recover.STATS_FILE, buf.getvalue())
    settings = dict(iterations=6, lr=0.25, r_bn=0.01, first_bn_multiplier=10.0, jitter=2)
    actor = recover.RecoverActor(store, key, teachers_key, "lpld", settings, seed=3, ipc=ipc, batch_size=ipc,
                                 class_names=names, image_size=size, use_gpu=False, classes_per_step=3)

    out = actor({"unit": np.array([0, 1, 2])})                  # one step of three classes
    assert out["unit"].tolist() == [0, 1, 2] and not out["resumed"].any()
    markers = [json.loads(store.get_bytes(key, recover.marker_name(i))) for i in range(3)]
    assert [m["step_units"] for m in markers] == [3, 3, 3] and [m["classes"] for m in markers] == [[0], [1], [2]]
    assert all(m["iterations"] == 6 for m in markers)
    root = Path(store.uri_for(key).removeprefix("file://"))
    written = (root / recover.marker_name(2)).stat().st_mtime_ns
    out = actor({"unit": np.array([2, 3])})                     # 2 is finished: kept; 3 alone
    assert out["resumed"].tolist() == [True, False] and (root / recover.marker_name(2)).stat().st_mtime_ns == written
    assert json.loads(store.get_bytes(key, recover.marker_name(3)))["step_units"] == 1
    assert out["objective_last"][0] == markers[2]["objective_last"]

    # The core packed the same way ([0, 1, 2], then [3]): the very same pixels, under each image's name.
    expected, _ = core.recover_images(observer, "lpld", len(names), ipc, ipc, core.RecoverSettings(**settings), 3,
                                      size, stats, names, units_per_step=3)
    got = torch.from_numpy(np.stack([decode_image(store.get_bytes(key, image_name(i)), image_name(i))
                                     for i in range(len(names) * ipc)]))
    assert torch.equal(got, expected)


def test_lpld_on_ray_matches_memory_and_resumes_after_a_killed_actor(ray_local, file_store_uri):
    """One real Ray run of the stage (statistics pass + actor pool) on the smoke data, with its
    recover actor killed (SIGKILL) once the first class finished; it needs Ray because the statistics
    pass, the actor restart and the resume are what is tested. Ray restarts the actor and retries its
    unfinished batches; a batch whose marker exists is kept, not redone. Checked against the core in
    memory: the statistics, and the very same pixels. Then a re-run that finds every class done."""
    from hello_ray.config import load_config
    from hello_ray.data.decode import decoded_split
    from hello_ray.data.imageset import load_image_set
    from hello_ray.data.sources import load_split
    from hello_ray.models.ensemble import load_observer
    from hello_ray.stages import recover
    from hello_ray.store import open_store

    cfg = load_config("smoke", overrides=[f"store={file_store_uri}", "images.source=lpld", "select.ipc=2",
                                          "recover.iterations=10", "recover.num_actors=1", "recover.seed=3"])
    store = open_store(cfg.store)
    split = load_split(cfg.data, cfg.data.train_split, store)
    names = list(split.class_names)
    teachers_key = _teachers_artifact(store, names, cfg.data.image_size)
    inputs = {"teachers": teachers_key}
    key = store.artifact_key(recover.STAGE, recover.stage_config(cfg), inputs)
    root = Path(store.uri_for(key).removeprefix("file://"))

    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(recover.run(cfg, store, key, inputs)))
    worker.start()
    first = root / recover.marker_name(0)
    while not first.exists() and worker.is_alive():
        time.sleep(0.005)
    killed = json.loads(first.read_text())["pid"]
    done_at_kill = len(list((root / "done").glob("*.json")))
    first_written = first.stat().st_mtime_ns
    os.kill(killed, signal.SIGKILL)                             # the actor process, mid-way through the plan
    worker.join(timeout=300)
    assert not worker.is_alive() and result, "recover did not finish after its actor was killed"
    assert done_at_kill < len(names), "the kill came after the last class: nothing was left to resume"
    markers = [json.loads((root / recover.marker_name(i)).read_text()) for i in range(len(names))]
    assert markers[0]["pid"] == killed and first.stat().st_mtime_ns == first_written   # not redone
    assert any(m["pid"] != killed for m in markers)             # the restarted actor did the rest
    assert result["units_recovered"] == len(names) and result["class_stats"] == "computed"
    assert result["objective_last"] < result["objective_first"], result

    # The Ray statistics pass equals a direct in-memory computation on the same decoded images.
    stats = recover._load_stats(store, key)
    observer = load_observer(store, teachers_key)
    rows = decoded_split(split, cfg.data, columns=["image", "label"]).take_all()
    images = torch.from_numpy(np.stack([r["image"] for r in rows]))
    labels = torch.tensor([int(r["label"]) for r in rows])
    for c in (0, 1, 9):
        for (mean, var), (dm, dv) in zip(stats.moments(c), _direct_moments(observer, images[labels == c])):
            assert torch.allclose(mean.double(), dm, rtol=1e-4, atol=1e-5)
            assert torch.allclose(var.double(), dv, rtol=1e-4, atol=1e-5)
    running = core.running_moments(observer)
    assert (stats.moments(0)[0][0] - stats.moments(1)[0][0]).abs().max() > 1e-3
    assert (stats.moments(0)[0][0] - running[0][0]).abs().max() > 1e-3

    # Ray vs in memory: the same images for the same seed (one thread here, as in the actor).
    settings = core.RecoverSettings(**{k: getattr(cfg.recover, k) for k in
                                       ("iterations", "lr", "r_bn", "first_bn_multiplier", "jitter")})
    expected, _ = core.recover_images(observer, "lpld", len(names), 2, cfg.recover.batch_size, settings,
                                      cfg.recover.seed, cfg.data.image_size, stats, names)
    got = load_image_set(store, key)
    assert got.meta["image_source"] == "lpld" and got.labels.tolist() == np.repeat(np.arange(10), 2).tolist()
    assert torch.equal(got.images, expected)

    # A re-run (the driver crashed after the last class) finds every class finished: it starts no
    # actor, reuses the statistics and rewrites no image.
    written = {p: p.stat().st_mtime_ns for p in (root / "images").iterdir()}
    again = recover.run(cfg, store, key, inputs)
    assert again["units_resumed"] == len(names) and again["units_recovered"] == 0
    assert again["class_stats"] == "reused" and again["objective_last"] == result["objective_last"]
    assert {p: p.stat().st_mtime_ns for p in (root / "images").iterdir()} == written
