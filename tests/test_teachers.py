"""The teacher trajectory: plain-PyTorch compute, windows, the ensemble, and real Ray Train runs.

The Ray tests train the smoke preset (3 epochs, 300 digits) with 2 Train workers on CPU, once,
on the moto S3 store through the calls of ``pipeline.run_stage`` (files, curve, windows, cache
hit), with a fault drill: rank 0's OS process is killed (SIGKILL) mid-epoch 2.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import time
import uuid

import pytest
import torch
from torch import nn

from hello_ray.config import ConfigError, load_config
from hello_ray.data.augment import train_crop_scale
from hello_ray.formats.trajectory import epoch_file, load_trajectory
from hello_ray.models.ensemble import TeacherEnsemble, load_observer, load_state, resolve_window
from hello_ray.models.zoo import build_model
from faults import KillOnMarker
from hello_ray import launcher
from hello_ray.stages import teachers, teachers_core

# ---------------------------------------------------------------------------- windows


@pytest.mark.parametrize("window,n,trained,expected", [
    ("11-51", 9, range(1, 91), [11, 16, 21, 26, 31, 36, 41, 46, 51]),   # METHOD.md's example
    ("2-10", 9, range(1, 11), [2, 3, 4, 5, 6, 7, 8, 9, 10]),             # the demo preset
    ("1-3", 3, range(1, 4), [1, 2, 3]),                                  # the smoke preset
    ("1-10", 4, range(1, 11), [1, 4, 7, 10]),
    ("1-4", 3, range(1, 5), [1, 3, 4]),                                  # 2.5 rounds half up
    ("5-9", 1, range(1, 11), [9]),                                       # one teacher: the window's end
])
def test_resolve_window(window, n, trained, expected):
    assert resolve_window(window, n, trained) == expected


@pytest.mark.parametrize("window,n,trained,fragments", [
    ("1-3", 9, range(1, 91), ["'1-3'", "repeats", "spans only 3 epochs"]),
    ("5-12", 3, range(1, 11), ["'5-12'", "[12]", "trained epochs: 1-10"]),
    ("11-51", 9, [1, 2, 3, 5], ["'11-51'", "trained epochs: 1-3, 5"]),
])
def test_resolve_window_errors_name_window_and_trained_epochs(window, n, trained, fragments):
    with pytest.raises(ValueError) as err:
        resolve_window(window, n, trained)
    for f in fragments:
        assert f in str(err.value)


def test_bad_window_syntax_is_a_config_error():
    with pytest.raises(ConfigError, match="'11_51'"):
        resolve_window("11_51", 9, range(1, 91))


# ---------------------------------------------------------------------------- plain-PyTorch compute

class _Tiny(nn.Module):
    """A linear classifier on mean brightness per channel: [N,3,H,W] in [0,1] -> [N,2]."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)) * 4 - 2)


def _bright_dark_batches(n_batches: int, n: int = 16, size: int = 8, seed: int = 0):
    """Class 1 = bright images, class 0 = dark ones, as uint8 NHWC batches like Ray's."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        labels = torch.randint(0, 2, (n,), generator=g)
        base = torch.where(labels == 1, 180, 60).view(n, 1, 1, 1)
        noise = torch.randint(-40, 40, (n, size, size, 3), generator=g)
        out.append({"image": (base + noise).clamp(0, 255).to(torch.uint8), "label": labels})
    return out


def test_train_epoch_learns_and_evaluate_counts_exactly():
    torch.manual_seed(0)
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    data = _bright_dark_batches(8)
    first = teachers_core.train_epoch(model, data, opt, torch.device("cpu"))
    for _ in range(5):
        last = teachers_core.train_epoch(model, data, opt, torch.device("cpu"))
    assert first.total == last.total == 8 * 16
    assert last.loss < first.loss
    val = _bright_dark_batches(3, seed=1)
    stats = teachers_core.evaluate_top1(model, val, torch.device("cpu"))
    with torch.no_grad():
        expected = sum(int((model(b["image"].permute(0, 3, 1, 2).float() / 255).argmax(1)
                            == b["label"]).sum()) for b in val)
    assert (stats.correct, stats.total) == (expected, 48)
    assert stats.accuracy > 0.95


def test_train_epoch_in_bf16_learns_and_a_nan_names_its_epoch_and_step():
    from hello_ray.failures import NonFiniteLoss

    torch.manual_seed(0)
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    data = _bright_dark_batches(8)
    first = teachers_core.train_epoch(model, data, opt, torch.device("cpu"), precision="bf16")
    for _ in range(4):
        last = teachers_core.train_epoch(model, data, opt, torch.device("cpu"), precision="bf16")
    assert last.total == 8 * 16 and last.loss < first.loss
    bad = [dict(b) for b in data]
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")  # every step from the first on is NaN
    with pytest.raises(NonFiniteLoss, match="teachers: the loss is nan at epoch 7, step 1"):
        teachers_core.train_epoch(model, bad, opt, torch.device("cpu"), epoch=7, check_every=3)


def test_train_augment_crops_and_keeps_range():
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    x = teachers_core.train_augment(images, 32, g)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert not torch.allclose(x, images.permute(0, 3, 1, 2).float() / 255)
    assert train_crop_scale(32) == (0.35, 1.0) and train_crop_scale(224) == (0.08, 1.0)
    # Cropped as decoded (data.train_crop=whole): only the flip is left, the same draw for the same seed.
    flipped = teachers_core.train_augment(images, 32, torch.Generator().manual_seed(1), crop=False)
    plain = images.permute(0, 3, 1, 2).float() / 255
    same = [torch.equal(flipped[i], plain[i]) for i in range(6)]
    mirrored = [torch.equal(flipped[i], plain[i].flip(-1)) for i in range(6)]
    assert all(a or b for a, b in zip(same, mirrored)) and any(mirrored) and any(same)
    assert torch.equal(flipped, teachers_core.train_augment(images, 32, torch.Generator().manual_seed(1), crop=False))
    

def test_state_bytes_is_cpu_fp32_state_dict():
    model = build_model("resnet18", 4, 32).to(torch.float64)
    state = torch.load(io.BytesIO(teachers_core.state_bytes(model)), weights_only=True)
    assert state.keys() == model.state_dict().keys()
    assert all(v.device.type == "cpu" for v in state.values())
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}


def test_observer_choices():
    assert teachers.observer_file("last", 10) == "epochs/epoch_010.pt"
    assert teachers.observer_file("epoch:3", 10) == "epochs/epoch_003.pt"
    with pytest.raises(ConfigError, match="epoch:11"):
        teachers.observer_file("epoch:11", 10)
    cfg = load_config("smoke", overrides=["teachers.observer=torchvision"])
    with pytest.raises(ConfigError, match="1000 classes"):
        teachers.check_observer(cfg.teachers, 10)
    imagenet = load_config("imagenet1k", overrides=["teachers.observer=torchvision",
                                                    "data.source=/data/imagenet"])
    teachers.check_observer(imagenet.teachers, 1000)  # the one valid case: resnet18, 1000 classes
    with pytest.raises(ConfigError, match="resnet18"):
        teachers.check_observer(dataclasses.replace(imagenet.teachers, model="vgg11"), 1000)


def test_stage_config_ignores_compute_only():
    a = load_config("smoke")
    b = load_config("smoke", overrides=["compute.num_workers=4", "compute.cpus_per_worker=0.5"])
    c = load_config("smoke", overrides=["teachers.lr=0.01"])
    assert teachers.stage_config(a) == teachers.stage_config(b)
    assert teachers.stage_config(a) != teachers.stage_config(c)


@pytest.mark.parametrize("stage,changes", [("teachers", True), ("transfer", True), ("select", False),
                                           ("recover", False), ("evaluate", False)])
def test_the_training_crop_keys_only_the_stages_that_train_on_the_images(stage, changes):
    import importlib

    mod = importlib.import_module(f"hello_ray.stages.{stage}")
    base = ["images.source=sre2l"] if stage == "recover" else []
    whole = load_config("smoke", overrides=base)
    square = load_config("smoke", overrides=base + ["data.train_crop=centre_square"])
    assert whole.data.train_crop == "whole"  # torchvision's recipe is the default
    assert (mod.stage_config(whole) != mod.stage_config(square)) is changes


def test_ensemble_stacks_frozen_teachers_in_eval_mode():
    torch.manual_seed(0)
    models = [build_model("resnet18", 5, 32) for _ in range(3)]
    ens = TeacherEnsemble(models, epochs=[1, 2, 3])
    ens.train()  # a parent's .train() must not switch the teachers' BatchNorm
    assert not any(m.training for m in ens.modules())
    assert not any(p.requires_grad for p in ens.parameters())
    x = torch.rand(4, 3, 32, 32)
    with torch.inference_mode():
        out = ens(x)
        assert out.shape == (3, 4, 5)
        for t, m in enumerate(models):
            torch.testing.assert_close(out[t], m(x))


# ---------------------------------------------------------------------------- Ray Train runs

def _smoke(store_uri: str, *extra: str):
    # 0.5 CPU per worker: two workers leave one of the 2 CPUs to Ray Data's read/decode tasks.
    return load_config("smoke", overrides=[f"store={store_uri}", "compute.num_workers=2",
                                           "compute.cpus_per_worker=0.5", *extra])


@pytest.fixture(scope="module")
def trained_s3(ray_local, s3_server):
    """The smoke trajectory trained once on the moto S3 store, through the same calls as
    pipeline.run_stage, its training images decoded by the Train workers (``data.decode=worker``,
    what GPU workers do by default), with the fault drill: after the first batch of epoch 2 on the first
    attempt, rank 0's worker process is killed with SIGKILL (a real death, no exception), so Ray
    Train must restart the worker group from epoch 1's checkpoint *in S3*."""
    import boto3

    from hello_ray.pipeline import Run
    from hello_ray.store import open_store

    bucket = f"hr-teachers-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    cfg = _smoke(f"s3://{bucket}/artifacts", "data.decode=worker")  # the GPU path's decode, on CPU workers
    assert cfg.compute.max_failures >= 1
    store = open_store(cfg.store)
    run = Run(cfg, store)
    t0 = time.perf_counter()
    assert run.needs(teachers, {})
    key = run.keys["teachers"]
    drill = launcher.KillDrill(epoch=2, rank=0)
    killer = KillOnMarker(store, key, drill)
    try:
        run.done(teachers, {}, teachers.run(cfg, store, key, {}, drill=drill))
    finally:
        killer.stop()
    return cfg, store, key, time.perf_counter() - t0, killer


def test_trajectory_has_one_checkpoint_and_accuracy_per_epoch(trained_s3):
    cfg, store, key, _, _ = trained_s3
    files = set(store.list_files(key))
    epochs = cfg.teachers.epochs
    for e in range(1, epochs + 1):
        assert f"epochs/epoch_{e:03d}.pt" in files and f"epochs/epoch_{e:03d}.json" in files
    assert not any(f.startswith("epochs/") and f[-3:] == ".pt" and int(f[13:16]) > epochs for f in files)
    traj = load_trajectory(store, key)
    assert traj["model"] == cfg.teachers.model and traj["num_classes"] == 10 and traj["image_size"] == cfg.data.image_size
    assert len(traj["class_names"]) == 10
    assert [e["epoch"] for e in traj["epochs"]] == list(range(1, epochs + 1))
    assert all(0.0 <= e["top1"] <= 1.0 for e in traj["epochs"])
    # 3 smoke epochs (~15 SGD steps) fit the training images; val top-1 is still near chance.
    assert traj["epochs"][-1]["train_acc"] > traj["epochs"][0]["train_acc"]
    assert "observer" not in traj  # the observer is chosen by the stages that use one
    metrics = [json.loads(store.get_bytes(key, f"epochs/epoch_{e:03d}.json")) for e in range(1, epochs + 1)]
    assert [m["top1"] for m in metrics] == [e["top1"] for e in traj["epochs"]]
    assert metrics[0]["val_images"] > 0 and len({m["val_images"] for m in metrics}) == 1
    # Decoded by the workers (data.decode=worker): every epoch saw the whole split but the drop_last rest.
    assert {m["decode"] for m in metrics} == {"worker"}
    per_worker = cfg.teachers.batch_size // cfg.compute.num_workers
    assert all(300 - 2 * per_worker < m["train_images"] <= 300 for m in metrics)
    summary = store.manifest(key)["summary"]
    assert summary["epochs"] == epochs and summary["final_top1"] == traj["epochs"][-1]["top1"]


def test_sigkilled_worker_resumes_from_the_last_checkpoint_in_s3(trained_s3):
    """The drill killed rank 0's process in epoch 2: epoch 1 was trained once, by the first
    attempt; epochs 2.. by the second, which restored epoch 1's Ray checkpoint from the S3 store.
    No epoch was trained twice: each finished epoch belongs to exactly one attempt, and the
    second attempt started right after the last epoch the first one finished."""
    cfg, store, key, _, killed = trained_s3
    assert killed.pid and killed.gone and killed.cmdline.startswith("ray::"), vars(killed)
    epochs = cfg.teachers.epochs
    m = {e: json.loads(store.get_bytes(key, f"epochs/epoch_{e:03d}.json")) for e in range(1, epochs + 1)}
    assert m[1]["attempt_start_epoch"] == 1 and m[1]["resumed_from"] is None
    assert all(m[e]["attempt_start_epoch"] == 2 and m[e]["resumed_from"] == 1 for e in range(2, epochs + 1))
    assert m[1]["attempt"] != m[2]["attempt"] == m[epochs]["attempt"]
    assert store.manifest(key)["summary"]["attempt_start_epochs"] == [1, 2]
    assert store.list_files(f"{launcher.DRILL_PREFIX}{key}") == ["kill_at_epoch_002.pid"]
    # Ray Train's run state lives in the store under _ray/<key>: its checkpoints are S3 objects.
    import boto3

    bucket, prefix = cfg.store[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    names = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{prefix}/_ray/{key}/") for o in page.get("Contents", [])]
    assert any(n.endswith("/state.pt") for n in names), names[:10]


def test_train_runs_skip_the_placement_group_cleaner_without_a_dashboard(trained_s3, monkeypatch):
    """The tests' Ray has no dashboard, so no State API: Ray Train's placement-group cleaner could
    not see the controller (and may ask another Ray's dashboard on 127.0.0.1:8265), so the
    launcher starts none. The fixture's run (two attempts) still had its controller and workers."""
    import ray._private.state

    started = {a["ActorClassName"] for a in ray._private.state.actors().values()}
    assert {"TrainController", "RayTrainWorker"} <= started and "PlacementGroupCleaner" not in started
    assert launcher.keep_placement_group_cleaner() is False  # this driver's Ray: no dashboard
    for forced, expected in (("1", True), ("0", False)):
        monkeypatch.setenv(launcher.PG_CLEANER_ENV, forced)
        assert launcher.keep_placement_group_cleaner() is expected


def test_a_ray_this_driver_started_is_its_own_and_gets_no_cleaner(ray_local, monkeypatch):
    """The session's Ray was started by this process (conftest's ray.init), so it ends with it and no
    placement group can outlive the driver; a Ray worker process has joined a Ray it does not own."""
    import ray

    from hello_ray.runtime import owns_ray

    monkeypatch.delenv(launcher.PG_CLEANER_ENV, raising=False)
    assert owns_ray() is True and launcher.keep_placement_group_cleaner() is False
    assert ray.get(ray.remote(num_cpus=0)(owns_ray).remote()) is False


def test_window_resolves_to_the_stored_checkpoints(trained_s3):
    cfg, store, key, _, _ = trained_s3
    ens = TeacherEnsemble.from_trajectory(store, key, "1-3", 3, "cpu")
    assert ens.epochs == [1, 2, 3]
    late = TeacherEnsemble.from_trajectory(store, key, "2-3", 2, "cpu")
    assert late.epochs == [2, 3]
    for teacher, e in zip(late.teachers, late.epochs):
        stored = load_state(store, key, epoch_file(e))
        for name, value in teacher.state_dict().items():
            torch.testing.assert_close(value, stored[name])
    x = torch.rand(2, 3, cfg.data.image_size, cfg.data.image_size)
    with torch.inference_mode():
        torch.testing.assert_close(ens(x)[1:], late(x))  # same checkpoints, same logits
        torch.testing.assert_close(load_observer(store, key)(x), ens(x)[-1])
        torch.testing.assert_close(load_observer(store, key, observer="epoch:2")(x), ens(x)[1])
    with pytest.raises(ConfigError, match="'epoch:4' names no epoch of teachers artifact .*trained epochs: 1-3"):
        load_observer(store, key, observer="epoch:4")
    with pytest.raises(ValueError, match="trained epochs: 1-3"):
        TeacherEnsemble.from_trajectory(store, key, "2-6", 3, "cpu")


def test_rerun_with_same_config_is_a_no_op(trained_s3):
    from hello_ray.pipeline import run_stage

    cfg, store, key, first_s, _ = trained_s3
    before = store.manifest(key)
    weights = store.get_bytes(key, epoch_file(1))
    t0 = time.perf_counter()
    assert run_stage(teachers, cfg, store) == key
    assert time.perf_counter() - t0 < 5.0 < first_s
    assert store.manifest(key) == before
    assert store.get_bytes(key, epoch_file(1)) == weights


def test_rm_then_rerun_retrains_from_epoch_1(trained_s3):
    """``hello-ray rm`` removes the artifact *and* its Ray run state: the re-run trains epoch 1 again
    instead of "resuming" the old run (whose epoch files are gone) and failing on "epoch 1 is
    missing". Needs a real Ray Train run: the resume decision is Ray Train's, from ``_ray/<key>``.
    Works on a copy of the module's S3 store (other tests read it) and re-trains on one worker
    (compute is not in the key: the same key, a cheaper re-run)."""
    import boto3

    from hello_ray import cli
    from hello_ray.pipeline import run_stage
    from hello_ray.store import open_store

    cfg, store, key = trained_s3[:3]
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    bucket, prefix = cfg.store[len("s3://"):].split("/", 1)
    copy_prefix = f"copy-{uuid.uuid4().hex[:8]}"
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for obj in page.get("Contents", []):
            s3.copy_object(Bucket=bucket, Key=copy_prefix + obj["Key"][len(prefix):],
                           CopySource={"Bucket": bucket, "Key": obj["Key"]})
    uri = f"s3://{bucket}/{copy_prefix}"
    copy = open_store(uri)
    old = json.loads(copy.get_bytes(key, "epochs/epoch_001.json"))
    assert copy.exists(key) and copy.folders("_ray") == [key]

    assert cli.main(["rm", key, "--store", uri]) == 0
    assert not copy.exists(key) and copy.folder_files(key) == {} and copy.folders("_ray") == []

    rerun = dataclasses.replace(cfg, store=uri, compute=dataclasses.replace(cfg.compute, num_workers=1))
    assert run_stage(teachers, rerun, copy) == key
    m = [json.loads(copy.get_bytes(key, f"epochs/epoch_{e:03d}.json")) for e in range(1, cfg.teachers.epochs + 1)]
    assert [x["epoch"] for x in m] == list(range(1, cfg.teachers.epochs + 1))
    assert all(x["attempt_start_epoch"] == 1 and x["resumed_from"] is None for x in m), m
    assert len({x["attempt"] for x in m}) == 1 and m[0]["attempt"] != old["attempt"]
    assert copy.manifest(key)["summary"]["attempt_start_epochs"] == [1]


def test_local_ray_too_small_for_workers_plus_data_is_refused(ray_local):
    # 2 workers x 1 CPU on the 2-CPU local Ray would leave Ray Data no CPU: a hang, not a run.
    cfg = load_config("smoke", overrides=["compute.num_workers=2", "compute.cpus_per_worker=1.0"])
    with pytest.raises(ConfigError, match=r"stage 'teachers' asks for 2.5 CPU.*compute.cpus_per_worker"):
        launcher.check_resources({"teachers": teachers.resources(cfg)}, cfg.compute)
    gpu = load_config("smoke", overrides=["compute.use_gpu=true", "compute.cpus_per_worker=0.5"])
    if ray_local.cluster_resources().get("GPU", 0) < 2:
        with pytest.raises(ConfigError, match="stage 'teachers' asks for 2 GPU.*compute.use_gpu=false"):
            launcher.check_resources({"teachers": teachers.resources(gpu)}, gpu.compute)
    ok = _smoke("unused")
    launcher.check_resources({"teachers": teachers.resources(ok)}, ok.compute)
