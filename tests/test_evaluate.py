"""The evaluate stage on the smoke preset: every label strategy, the floor, continual rows, resume,
real label bytes, and class-count checks before training. Artifacts are built with the documented
formats (image set, teacher trajectory, adapter) so the test does not run the upstream stages."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from builders import write_adapter, write_teachers
import torch

from hello_ray import report
from hello_ray.config import load_config
from hello_ray.formats.results import REQUIRED, RESULTS_JSON, RESULTS_PARQUET, read_results, summarise
from hello_ray.formats.trajectory import epoch_file
from hello_ray.labels import ClassCountMismatch
from hello_ray.models.zoo import build_model
from hello_ray.stages import evaluate
from hello_ray.stages.evaluate_core import TrainSettings, top1_counts, train_student
from hello_ray.store import open_store


def _image_set(store, key: str, cfg, class_names: list[str], ipc: int) -> None:
    """ipc real training digits per class, written as an image-set artifact (as select would)."""
    from hello_ray.data.decode import decoded_split
    from hello_ray.data.imageset import write_image_set
    from hello_ray.data.sources import load_train_val

    train, _ = load_train_val(cfg.data, store)
    x, y = evaluate.sample_floor(cfg.data, store, len(train.class_names), ipc, seed=5)
    keep = y < len(class_names)
    write_image_set(store, key, x[keep], y[keep], class_names, None,
                    {"ipc": ipc, "factor": 1})
    store.finalize(key, "select", {}, {})


def _teachers(store, key: str, num_classes: int, size: int) -> None:
    write_teachers(store, "resnet18", [str(i) for i in range(num_classes)], size, (1, 2, 3), key=key,
                   epoch_fields={"top1": 0.1})


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """A store holding the demo data, a 2-ipc image set, a trajectory and an adapter (10 classes)."""
    root = tmp_path_factory.mktemp("eval")
    cfg = load_config("smoke", overrides=[f"store={root / 'store'}", "evaluate.floor=true",
                                          "evaluate.floor_strategies=[hard, stored/10, projector]",
                                          "evaluate.continual_steps=[2]", "evaluate.continual_strategies=[hard]"])
    store = open_store(cfg.store)
    from hello_ray.data.sources import load_train_val

    names = load_train_val(cfg.data, store)[0].class_names
    _image_set(store, "select-test", cfg, names, ipc=2)
    _teachers(store, "teachers-test", len(names), cfg.data.image_size)
    write_adapter(store, "transfer-test", names)
    return cfg, store, names


INPUTS = {"images": "select-test", "teachers": "teachers-test", "transfer": "transfer-test"}


def test_every_strategy_trains_a_student_and_reports_real_bytes(world):
    from hello_ray.pipeline import run_stage

    cfg, store, names = world
    key = run_stage(evaluate, cfg, store, INPUTS)
    df = pd.read_parquet(io.BytesIO(store.get_bytes(key, RESULTS_PARQUET)))
    main = df[(df.images == "distilled") & (df.continual_steps == 0)]
    assert sorted(main.strategy) == sorted(cfg.evaluate.strategies)
    floor = df[df.images == "floor"]
    assert sorted(floor.strategy) == ["hard", "projector", "stored/10"] and len(df[df.continual_steps == 2]) == 2
    assert df.top1.between(0, 1).all()
    # 2 epochs x ceil(20 images / batch 10); a pruned epoch draws as many batches from its pool.
    assert (df[df.continual_steps == 0].steps == 4).all()
    n_val = int(main.val_images.iloc[0])
    assert n_val > 100 and (main.val_images == n_val).all()
    # Continual step 1 scores only the first half of the classes' validation images.
    cl = df[df.continual_steps == 2].sort_values("continual_step")
    assert cl.val_images.iloc[0] < cl.val_images.iloc[1] == n_val
    assert cl.train_images.tolist() == [10, 20] and cl.steps.tolist() == [2, 4]
    # Every strategy's bytes are the bytes in the store (or of the weights it ships).
    by = dict(zip(main.strategy, main.label_bytes))
    files = store.list_files(key)

    def size(prefix: str) -> int:
        return sum(len(store.get_bytes(key, f)) for f in files if f.startswith(prefix))

    assert by["hard"] == size("labels/hard/") > 0
    assert by["stored"] == size("labels/stored/") and by["stored/10"] == size("labels/stored-10/")
    assert by["stored/10"] < by["stored"] / 2                # 1 of 4 label batches kept
    # LPLD's pool: T = 2 epochs x 2 batches; the first max(1, floor(T / 10)) = 1 batch, from the manifest
    meta = json.loads(store.get_bytes(key, "labels/stored-10/meta.json"))
    assert meta["kept"] == [[0, 0]] and meta["plan"]["pool"] == "lpld"
    listed = [f["name"] for f in store.manifest(key)["files"] if f["name"].startswith("labels/stored-10/")]
    assert sorted(listed) == ["labels/stored-10/epoch_0000.npz", "labels/stored-10/meta.json"]
    # The controls: the floor's random real images with their own stored labels, the same projector
    fb = dict(zip(floor.strategy, floor.label_bytes))
    assert fb["hard"] == size("labels/floor/") and fb["stored/10"] == size("labels/floor-stored-10/") > 0
    assert fb["projector"] == by["projector"]
    adapter = sum(len(store.get_bytes("transfer-test", f)) for f in store.list_files("transfer-test"))
    assert by["projector"] == adapter
    assert by["teacher"] == len(store.get_bytes("teachers-test", epoch_file(3)))
    assert (main.peak_mem_kind == "cpu_rss_peak").all() and (main.peak_mem_mb > 0).all()
    # The smoke preset trains whole rows per worker from the queue: no row is split, each saw the whole val set.
    assert (df.parallel == "queue").all() and (df.workers == 1).all()
    summary = json.loads(store.get_bytes(key, RESULTS_JSON))
    assert len(summary["rows"]) == len(df) and len(summary["table"]) == len(df)
    from hello_ray.formats.results import format_table

    assert "projector" in format_table(summary["table"])
    # The report reads these very rows through the one results format, and summarises them alike.
    rows = read_results(store, key)
    assert rows == summary["rows"] and all(set(REQUIRED) <= set(r) for r in rows)
    assert summarise(rows) == summary["table"] == store.manifest(key)["summary"]["table"]
    md, _ = report.build_report(rows)
    assert all(f"| distilled | {cfg.evaluate.students[0]} | {s} | - |" in md for s in cfg.evaluate.strategies)
    assert "projector" in format_table(rows)

    # A restart with the same key resumes from the row checkpoint: nothing is retrained.
    again = evaluate.run(cfg, store, key, INPUTS)
    df2 = pd.read_parquet(io.BytesIO(store.get_bytes(key, RESULTS_PARQUET)))
    assert again["rows"] == len(df) and df2.wall_s.tolist() == df.wall_s.tolist()


def test_ddp_rows_split_batches_over_both_workers(world):
    """evaluate.parallel=ddp: one row at a time, its batches and val set split over 2 ranks."""
    import dataclasses

    from hello_ray.pipeline import run_stage

    cfg, store, _ = world
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(
        cfg.evaluate, parallel="ddp", strategies=["hard", "stored"], floor=False, continual_steps=[]))
    key = run_stage(evaluate, cfg, store, INPUTS)
    df = pd.read_parquet(io.BytesIO(store.get_bytes(key, RESULTS_PARQUET)))
    assert sorted(df.strategy) == ["hard", "stored"]
    assert (df.parallel == "ddp").all() and (df.workers == 2).all()
    assert (df.steps == 4).all() and (df.val_images > 100).all()  # counts summed over the two shards


@pytest.mark.parametrize("which", ["images", "transfer"])
def test_wrong_class_count_fails_before_training(world, which):
    cfg, store, names = world
    inputs = dict(INPUTS)
    if which == "images":
        _image_set(store, "select-7", cfg, names[:7], ipc=1)
        inputs["images"] = "select-7"
        match = "image set select-7 has 7 classes but the dataset has 10"
    else:
        write_adapter(store, "transfer-3", names[:3])
        inputs["transfer"] = "transfer-3"
        match = "adapter of transfer artifact transfer-3 has 3 classes but the dataset has 10"
    with pytest.raises(ClassCountMismatch, match=match):
        evaluate.run(cfg, store, "evaluate-wrong", inputs)
    assert not any(f.startswith("labels/") for f in store.list_files("evaluate-wrong"))


def test_student_core_learns_and_gdumb_masks_unseen_classes():
    """Without Ray: hard labels on 4 separable colour classes; top-1 counts only the seen classes."""
    from hello_ray.labels import HardLabels

    torch.manual_seed(0)
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=torch.uint8)
    y = torch.arange(40) % 4
    x = colours[y].view(40, 3, 1, 1).expand(40, 3, 16, 16).contiguous()
    model = build_model("resnet18", 4, 16)
    s = TrainSettings(epochs=30, batch_size=20, lr=3e-3, weight_decay=0.0, cutmix_alpha=0.0, loss="mse_ce",
                      ce_weight=0.025, temperature=4.0, image_size=16)
    seen = torch.tensor([0, 1])
    keep = torch.isin(y, seen)
    stats = train_student(model, x[keep], y[keep], HardLabels(np.zeros(1), 4, 1), s, seed=0,
                          device=torch.device("cpu"), classes=seen)
    assert stats["steps"] == 30 and np.isfinite(stats["final_loss"])
    val = [(x.permute(0, 2, 3, 1).numpy(), y.numpy())]            # NHWC uint8, as decoded rows come
    correct, total = top1_counts(model, val, torch.device("cpu"), classes=seen)
    assert total == 20 and correct == 20                          # only classes 0, 1; argmax over them


def test_floor_sample_does_not_depend_on_where_the_dataset_lives(ray_local):
    """Two copies of one dataset (say a local folder and its S3 upload) give the same floor images."""
    import ray

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)

    def rows(root: str) -> "ray.data.Dataset":
        return ray.data.from_items([{"image": images[i], "label": i % 4,
                                     "id": f"{root}/digits-1a2b/train-00000-of-00001.parquet:{i}"}
                                    for i in range(40)])

    x1, y1 = evaluate.pick_floor(rows("/tmp/here"), 4, 3, seed=0)
    x2, y2 = evaluate.pick_floor(rows("s3://bucket/prefix"), 4, 3, seed=0)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert len(y1) == 12 and np.bincount(y1).tolist() == [3, 3, 3, 3]
    x3, _ = evaluate.pick_floor(rows("/tmp/here"), 4, 3, seed=1)
    assert not np.array_equal(x1, x3)                 # the seed still picks the sample


def test_floor_decodes_only_the_images_it_keeps(world):
    """sample_floor reads and decodes (ipc + FLOOR_SPARE) images per class, picked from the listing,
    and keeps what picking from the whole decoded split keeps (the rule it replaces)."""
    from hello_ray.data.decode import decoded_split
    from hello_ray.data.sources import load_split, load_train_val

    cfg, store, names = world
    train, _ = load_train_val(cfg.data, store)
    ipc, C = 2, len(names)
    x, y = evaluate.sample_floor(cfg.data, store, C, ipc, seed=3)
    x_all, y_all = evaluate.pick_floor(decoded_split(train, cfg.data), C, ipc, seed=3)
    np.testing.assert_array_equal(x, x_all)
    np.testing.assert_array_equal(y, y_all)
    read = load_split(cfg.data, cfg.data.train_split, store, sample=(ipc + evaluate.FLOOR_SPARE, 3))
    assert read.num_rows == C * (ipc + evaluate.FLOOR_SPARE) < train.num_rows


# A driver process with its own Ray advertising 4 fake GPUs (compute falls back to the CPU): one grid
# of unequal rows from the queue, then a second grid whose rank-1 worker waits to be killed mid-row.
FAKE_GPU_DRIVER = r"""
import json, pickle, sys
import ray
cfg, inputs, drill = pickle.load(open(sys.argv[1], "rb"))
ray.init(num_cpus=4, num_gpus=4, include_dashboard=False, object_store_memory=300_000_000,
         runtime_env={"env_vars": {"PYTHONPATH": sys.argv[3]}})
ray.data.DataContext.get_current().enable_progress_bars = False
from hello_ray.stages import evaluate
from hello_ray.store import open_store
store = open_store(cfg.store)
out = {}
for key, d in (("evaluate-queue", None), ("evaluate-queue-drill", drill)):
    res = evaluate.run(cfg, store, key, inputs, drill=d)
    out[key] = res["rows"]
json.dump(out, open(sys.argv[2], "w"))
"""


def test_queue_keeps_fake_gpus_busy_and_a_killed_row_resumes(world, tmp_path):
    """On a Ray with 4 fake GPUs, 16 rows of unequal cost (conv3 and ResNet-18 students, four label
    strategies) taken longest first keep the 4 workers busy (>= 0.85 of worker x wall, from the rows'
    own start and end times); a worker SIGKILLed in the middle of a row's second epoch is restarted
    by Ray Train, the rows in flight go back to the queue, finished ones are not trained again.
    (KillOnMarker SIGKILLs the worker: the drill fires in rank 1's second row, at its second epoch.)"""
    import dataclasses
    import os
    import pickle
    import subprocess
    import sys

    import time

    from faults import KillOnMarker
    from hello_ray import launcher
    from hello_ray.formats.results import read_row_records
    from hello_ray.stages.evaluate_queue import busy_fraction

    cfg, store, _ = world
    cfg = dataclasses.replace(
        cfg, compute=dataclasses.replace(cfg.compute, num_workers=4, use_gpu=True, cpus_per_worker=0.5,
                                         max_failures=1),
        evaluate=dataclasses.replace(cfg.evaluate, students=["conv3", "resnet18"], parallel="queue", epochs=2,
                                     strategies=["hard", "teacher", "stored", "projector"], seeds=[0, 1],
                                     floor=False, continual_steps=[]))
    drill = launcher.KillDrill(epoch=1, rank=1)
    args = tmp_path / "args.pkl"
    args.write_bytes(pickle.dumps((cfg, INPUTS, drill)))
    killer = KillOnMarker(store, "evaluate-queue-drill", drill)
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen([sys.executable, "-c", FAKE_GPU_DRIVER, str(args), str(tmp_path / "out.json"),
                             os.environ["PYTHONPATH"]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    ids = [f"distilled|{st}|{sp}|{sd}|0|0" for st in ("conv3", "resnet18") for sp in ("hard", "teacher", "stored",
                                                                                     "projector") for sd in (0, 1)]
    at_kill: dict = {}
    while proc.poll() is None and killer.pid is None:
        time.sleep(0.05)
    if killer.pid is not None:                          # the rows finished when the worker died
        at_kill = read_row_records(store, "evaluate-queue-drill", ids)
    out, _ = proc.communicate(timeout=900)
    killer.stop()
    assert proc.returncode == 0, out[-6000:]
    assert json.loads((tmp_path / "out.json").read_text()) == {"evaluate-queue": 16, "evaluate-queue-drill": 16}

    rows = read_results(store, "evaluate-queue")
    assert {r["parallel"] for r in rows} == {"queue"} and {r["worker"] for r in rows} == {0, 1, 2, 3}
    assert busy_fraction(rows, workers=4) >= 0.85, busy_fraction(rows, workers=4)
    # Longest first: each worker's first row is one of the ResNet-18 rows (the costliest).
    firsts = {}
    for r in sorted(rows, key=lambda r: r["start_unix"]):
        firsts.setdefault(r["worker"], r)
    assert {r["student"] for r in firsts.values()} == {"resnet18"}

    assert killer.pid is not None and killer.gone and "ray::" in killer.cmdline
    drilled = read_results(store, "evaluate-queue-drill")
    assert len({r["row"] for r in drilled}) == 16
    # The rows finished when the worker died (at least rank 1's first) kept their records: the
    # restart did not train them again; the rows in flight were trained again after it.
    kill = killer.killed_at
    final = read_row_records(store, "evaluate-queue-drill", ids)
    assert at_kill and any(r["worker"] == 1 for r in at_kill.values())
    assert all(final[rid] == rec for rid, rec in at_kill.items())
    assert any(r["start_unix"] > kill for r in final.values()) and len(final) == 16
