"""Stage 1 of METHOD.md: the teacher trajectory, one checkpoint per epoch, on Ray Train.

A zoo model (ResNet-18 by default) is trained from scratch on the real training set with
SGD + momentum, StepLR and weight decay (``cfg.teachers``; METHOD.md defaults, the presets
scale them down). After every epoch rank 0 writes the model into the artifact and the
top-1 on the real validation set is recorded. The artifact (format: hello_ray/models/ensemble.py):

    epochs/epoch_{e:03d}.pt    state_dict after epoch e (CPU, fp32), epochs 1-based
    epochs/epoch_{e:03d}.json  that epoch's numbers: top1, loss, train_acc, seconds, and which
                               attempt trained it (attempt id, the epoch it started from)
    trajectory.json            model, classes, the accuracy curve

This module is the Ray wrapper only; the compute is :mod:`hello_ray.stages.teachers_core`
(plain PyTorch over any iterable of ``{"image": uint8 [N,S,S,3], "label": int64 [N]}`` batches).
``run`` launches ``train_loop_per_worker`` through :func:`hello_ray.launcher.fit` (DDP, fed by
Ray Data shards) with a Ray checkpoint (model, optimizer, scheduler, epoch) per epoch under the
store's ``_ray/<key>``, so a failed attempt resumes at the next epoch and so does a re-launched
driver (the run name is the artifact key).

The artifact key covers ``data``, the fingerprints of the train and val splits and ``teachers``,
but not what does not change the weights: ``compute`` (the number of workers, GPUs and CPUs
change how fast the same recipe runs; the global batch, learning rate, schedule and seed are in
``teachers``, and leaving compute out lets a crashed run resume on a different number of
workers), ``teachers.observer`` (which epoch observes is read by select and evaluate, and is in
their keys) and the readable class names (``data.class_names``, a classes.json: the weights
learn label indices; transfer, select and evaluate key on the names).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any, Iterable

import torch

from hello_ray import launcher
from hello_ray.config import Config, ConfigError, TeacherConfig, data_identity, section_dict
from hello_ray.data.augment import whole_crop
from hello_ray.formats.trajectory import epoch_file, epoch_metrics_file, write_trajectory
from hello_ray.models.zoo import build_model
from hello_ray.stages.teachers_core import Batch, evaluate_top1, make_optimizer, state_bytes, train_augment, train_epoch

from hello_ray.store import rm_hint

if TYPE_CHECKING:
    from hello_ray.store import Store

STAGE = "teachers"
KIND = "train"  # one Ray Train run (launcher.fit; hello_ray/stages/__init__.py)
INPUTS: tuple[str, ...] = ()          # the trajectory is trained from the real data alone
CHECKPOINT_FILE = "state.pt"  # the Ray checkpoint: model, optimizer, scheduler, epoch
DATA_SPLITS = ("train", "val")        # their fingerprints join the key (pipeline.Run.stage_config)
CLASS_NAMES_IN_KEY = False            # names do not change the weights
# Settings that do not change the trajectory, left out of its key (see the module docstring).
_NOT_IN_KEY = {"data": ("class_names",), "teachers": ("observer",)}

log = logging.getLogger("hello_ray.teachers")


def stage_config(cfg: Config) -> dict[str, Any]:
    """The part of the config that determines the trajectory: data and teachers (not compute, the
    observer or the readable class names)."""
    out = {"data": data_identity(cfg.data, training=True), "teachers": section_dict(cfg.teachers)}
    for section, keys in _NOT_IN_KEY.items():
        for k in keys:
            out[section].pop(k)
    return out


def check(cfg: Config) -> None:
    """Rules decidable from the config alone (no I/O): the observer names a trained epoch (the
    stages that use it read it from this trajectory), and the global batch gives every Train
    worker at least one image."""
    check_observer(cfg.teachers, len(cfg.data.class_names) or None)
    launcher.check_batch_split("teachers.batch_size", cfg.teachers.batch_size, cfg.compute)


def resources(cfg: Config) -> dict[str, float]:
    """What the stage holds at once: its Train workers, plus the data tasks feeding them."""
    return launcher.train_resources(cfg.compute, cfg.data.cpus_per_task)


# ---------------------------------------------------------------------------- config rules

def observer_file(observer: str, epochs: int) -> str | None:
    """The trajectory file holding the observer named by ``teachers.observer`` (None for
    'torchvision', whose weights come from torchvision: hello_ray.models.ensemble.load_observer)."""
    if observer == "last":
        return epoch_file(epochs)
    if observer == "torchvision":
        return None
    n = observer.split(":", 1)[1]
    if not n.isdigit() or not 1 <= int(n) <= epochs:
        raise ConfigError(f"config key 'teachers.observer': {observer!r} names no trained epoch; "
                          f"use epoch:N with 1 <= N <= teachers.epochs ({epochs})")
    return epoch_file(int(n))


def check_observer(tc: TeacherConfig, num_classes: int | None) -> None:
    """Reject an observer choice the trajectory cannot provide, before any training (the class
    count is checked when known: from data.class_names, or once the data is listed)."""
    observer_file(tc.observer, tc.epochs)
    if tc.observer == "torchvision" and (tc.model != "resnet18" or num_classes not in (None, 1000)):
        raise ConfigError(
            "config key 'teachers.observer': 'torchvision' loads torchvision's ImageNet-1K ResNet-18, "
            f"which only fits teachers.model=resnet18 with 1000 classes (got {tc.model!r} with "
            f"{num_classes} classes); use 'last' or 'epoch:N'")


# ---------------------------------------------------------------------------- Ray Train worker

def _all_reduce(device: torch.device, *values: float) -> list[float]:
    """Sum ``values`` over the DDP ranks (identity on one worker)."""
    return launcher.all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP rank: resume from the Ray checkpoint, train the remaining epochs, write each one.

    Reads only ``config`` (never argv or the environment): ``teachers`` (TeacherConfig
    fields), ``num_classes``, ``image_size``, ``use_gpu``, ``store``, ``key`` and ``drill``
    (a :class:`~hello_ray.launcher.KillDrill` for the tests; None in normal runs), and
    ``decode`` (``on_worker``: decode the encoded rows here; ``train_crop``: the whole-image crop's area
    range, None for the centred square cropped here; ``on_corrupt``).
    """
    import ray.train
    import ray.train.torch

    from hello_ray.data.decode import worker_batches

    tc = TeacherConfig(**config["teachers"])
    store: Store = config["store"]
    key: str = config["key"]
    w = launcher.worker_context(config["use_gpu"], tc.batch_size, tc.seed)
    wlog = launcher.worker_logger(STAGE)
    # On the device before the optimizer exists, so restored momentum buffers land there too.
    model = build_model(tc.model, config["num_classes"], config["image_size"]).to(w.device)
    opt, sched = make_optimizer(model, tc)
    start, resumed_from = 1, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = launcher.load_checkpoint(checkpoint, CHECKPOINT_FILE, key, w.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        resumed_from = int(state["epoch"])
        start = resumed_from + 1
    ddp_model = ray.train.torch.prepare_model(model)  # DDP wrapper (identity on one worker)
    attempt = uuid.uuid4().hex[:8]
    if w.rank == 0:
        wlog.info("[teachers] %s: %d workers x batch %d, epochs %d-%d%s", key, w.world, w.per_worker_batch,
                  start, tc.epochs, f" (resumed after epoch {resumed_from})" if resumed_from else "")

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    image_size, decode = config["image_size"], config["decode"]
    crop = decode["train_crop"] is None  # else cut from the whole image as decoded: only the flip is left
    for epoch in range(start, tc.epochs + 1):
        t0 = time.perf_counter()
        seed = launcher.epoch_seed(tc.seed, epoch, w.rank)  # other crops per rank and epoch, reproducible
        gen = torch.Generator(device=w.device).manual_seed(seed)
        if decode["on_worker"]:  # encoded rows: decoded and cut on this worker's device, boxes seeded
            batches: Iterable[Batch] = worker_batches(
                train_shard, w.per_worker_batch, w.device, image_size, decode["train_crop"],
                torch.Generator().manual_seed(seed), decode["on_corrupt"], seed)
        else:
            batches = train_shard.iter_torch_batches(
                batch_size=w.per_worker_batch, drop_last=True,
                local_shuffle_buffer_size=max(4 * w.per_worker_batch, 256), local_shuffle_seed=seed)
        batches = launcher.drilled(batches, config.get("drill"), store, key, epoch, w.rank)
        tr = train_epoch(ddp_model, batches, opt, w.device,
                         augment=lambda im: train_augment(im, image_size, gen, crop), epoch=epoch,
                         precision=tc.precision)
        sched.step()
        va = evaluate_top1(model, val_shard.iter_torch_batches(batch_size=max(w.per_worker_batch, 256)),
                           w.device)
        loss_sum, correct, total, vcorrect, vtotal = _all_reduce(
            w.device, tr.loss_sum, tr.correct, tr.total, va.correct, va.total)
        metrics = {"epoch": epoch, "top1": vcorrect / max(vtotal, 1), "loss": loss_sum / max(total, 1),
                   "train_acc": correct / max(total, 1), "lr": opt.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - t0, 2), "val_images": int(vtotal),
                   "attempt": attempt, "attempt_start_epoch": start, "resumed_from": resumed_from,
                   "train_images": int(total), "decode": "worker" if decode["on_worker"] else "tasks"}
        if w.rank == 0:
            # The epoch file first, the Ray checkpoint second: a crash in between retrains this
            # epoch and overwrites the file with the same epoch's weights.
            store.put_bytes(key, epoch_file(epoch), state_bytes(model))
            store.put_bytes(key, epoch_metrics_file(epoch),
                            json.dumps(metrics, indent=1).encode())
            wlog.info("[teachers] epoch %3d/%d  loss %.4f  train %.2f%%  val top1 %.2f%%  %.1f s",
                      epoch, tc.epochs, metrics["loss"], 100 * metrics["train_acc"],
                      100 * metrics["top1"], metrics["seconds"])
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "epoch": epoch}, os.path.join(d, CHECKPOINT_FILE))
                launcher.report(metrics, store, d)
        else:
            launcher.report(metrics, store)


# ---------------------------------------------------------------------------- Ray wrapper

def read_epoch_metrics(store: "Store", key: str, epochs: int) -> list[dict[str, Any]]:
    """The per-epoch json files 1..epochs (all attempts' epochs, not only the last Ray result's)."""
    names = set(store.list_files(key))
    out = []
    for e in range(1, epochs + 1):
        pt, js = epoch_file(e), epoch_metrics_file(e)
        if pt not in names or js not in names:
            raise RuntimeError(f"teachers artifact {key}: epoch {e} is missing ({pt} / {js}) after "
                               f"training finished; the Ray run under _ray/{key} did not reach it "
                               "(run state left from an artifact removed by hand?). Remove both with "
                               f"{rm_hint(key, store.uri)} and re-run")
        out.append(json.loads(store.get_bytes(key, js)))
    return out


def run(cfg: Config, store: "Store", key: str, inputs: dict[str, str],
        *, drill: launcher.KillDrill | None = None) -> dict[str, Any]:
    """Train the trajectory on Ray Train and write ``trajectory.json``; returns the summary.

    ``drill`` is a fault drill (tests): one rank waits to be killed (SIGKILL) after the first
    batch of the drill's epoch on the first attempt only, so the run must resume from the
    previous epoch's checkpoint. Needs ``compute.max_failures >= 1``.
    """
    from hello_ray.data.corrupt import corrupt_summary
    from hello_ray.data.decode import decode_on_worker, decoded_split, training_split
    from hello_ray.data.sources import load_train_val, shuffled_files

    tc = cfg.teachers
    train, val = load_train_val(cfg.data, store)
    num_classes = len(train.class_names)
    check_observer(tc, num_classes)
    corrupt = corrupt_summary({"train": train, "val": val}, cfg.data, store)  # before any training
    columns = ["image", "label"]  # the string ids cannot become tensors
    on_worker = decode_on_worker(cfg.data, cfg.compute.use_gpu)
    # The file list is shuffled again every epoch, not the bytes (a global shuffle of ImageNet's
    # 140 GB would move every image between nodes and start no epoch before the whole split was
    # read): ImageFolder's listing goes class by class, so its files are shuffled one by one;
    # parquet / webdataset shards are shuffled whole and the workers' local shuffle buffer mixes
    # their rows. Data order is therefore not seeded; init is, and so are the crops where the worker
    # cuts them (data.train_crop=centre_square, or data.decode=worker); the CPU decode tasks that cut
    # whole-image crops draw from fresh entropy (data.decode.DecodeCropBatch says why).
    train = shuffled_files(train)
    t0 = time.perf_counter()
    launcher.fit(STAGE, cfg.compute, store, key, train_loop_per_worker,
                 {"teachers": section_dict(tc), "num_classes": num_classes,
                  "image_size": cfg.data.image_size, "use_gpu": cfg.compute.use_gpu,
                  "decode": {"on_worker": on_worker, "train_crop": whole_crop(cfg), "on_corrupt": cfg.data.on_corrupt},
                  "store": store, "key": key, "drill": drill},
                 {"train": training_split(train, cfg.data, on_worker, whole_crop(cfg)),
                  "val": decoded_split(val, cfg.data, columns=columns)})
    train_s = time.perf_counter() - t0

    epochs = read_epoch_metrics(store, key, tc.epochs)
    trajectory = {
        "model": tc.model, "num_classes": num_classes, "image_size": cfg.data.image_size,
        "class_names": list(train.class_names),
        "epochs": [{"epoch": m["epoch"], "top1": m["top1"], "loss": m["loss"],
                    "train_acc": m["train_acc"], "file": epoch_file(m["epoch"])} for m in epochs],
    }
    write_trajectory(store, key, trajectory)
    attempts = sorted({m["attempt_start_epoch"] for m in epochs})
    return {"epochs": tc.epochs, "final_top1": epochs[-1]["top1"],
            "best_top1": max(m["top1"] for m in epochs),
            "num_classes": num_classes, "val_images": epochs[-1]["val_images"],
            "attempt_start_epochs": attempts, "corrupt": corrupt,
            "train_s": round(train_s, 2)}
