"""Stage 1 of METHOD.md: the teacher trajectory, one checkpoint per epoch, on Ray Train.

A zoo model (ResNet-18 by default) is trained from scratch on the real training set with
SGD + momentum, StepLR and weight decay (``cfg.teachers``; METHOD.md defaults, the presets
scale them down). After every epoch rank 0 writes the model into the artifact and the
top-1 on the real validation set is recorded. The artifact (format: hello_ray/models/ensemble.py):

    epochs/epoch_{e:03d}.pt    state_dict after epoch e (CPU, fp32), epochs 1-based
    epochs/epoch_{e:03d}.json  that epoch's numbers: top1, loss, train_acc, seconds, and which
                               attempt trained it (attempt id, the epoch it started from)
    trajectory.json            model, classes, the accuracy curve, the observer's file
    observer_torchvision.pt    only with ``teachers.observer=torchvision``

Compute apart from orchestration: ``train_epoch`` / ``evaluate_top1`` are plain PyTorch over
any iterable of ``{"image": uint8 [N,S,S,3], "label": int64 [N]}`` batches; ``run`` wraps
them in a ``TorchTrainer`` (DDP: gloo on CPU, nccl on GPU) fed by Ray Data shards, with a Ray
checkpoint (model, optimizer, scheduler, epoch) per epoch under the store's ``_ray/<key>``
so a failed attempt resumes at the next epoch (``FailureConfig.max_failures``) and so does a
re-launched driver (the run name is the artifact key).

The artifact key covers ``data`` and ``teachers`` but not ``compute``: the number of
workers, GPUs and CPUs change how fast the same recipe runs (the global batch, learning
rate, schedule and seed are in ``teachers``), and leaving them out lets a crashed run resume
on a different number of workers.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hello_ray.config import ComputeConfig, Config, ConfigError, TeacherConfig, data_identity, section_dict
from hello_ray.data.augment import random_resized_crop_flip, to_float, train_crop_scale
from hello_ray.models.ensemble import TRAJECTORY_FILE, epoch_file
from hello_ray.models.zoo import build_model
from hello_ray.runtime import seed_everything, torch_device

if TYPE_CHECKING:
    from hello_ray.store import Store

STAGE = "teachers"
TORCHVISION_OBSERVER_FILE = "observer_torchvision.pt"
DRILL_PREFIX = "_drill-"  # fault-drill markers live under their own (never finalized) key

log = logging.getLogger("hello_ray")

Batch = dict[str, torch.Tensor]


def epoch_metrics_file(epoch: int) -> str:
    """Name of epoch ``epoch``'s metrics json inside the artifact (beside its checkpoint)."""
    return f"epochs/epoch_{epoch:03d}.json"


def stage_config(cfg: Config) -> dict[str, Any]:
    """The part of the config that determines the trajectory: data and teachers (not compute)."""
    return {"data": data_identity(cfg.data), "teachers": section_dict(cfg.teachers)}


# ---------------------------------------------------------------------------- compute (plain PyTorch)

crop_scale = train_crop_scale  # the shared rule lives with the augmentations


def train_augment(images: torch.Tensor, image_size: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [N,S,S,3] -> augmented float [N,3,S,S] in [0,1] (random-resized crop + flip)."""
    x = to_float(images)                                                   # [N,3,S,S]
    x, _, _ = random_resized_crop_flip(x, image_size, scale=crop_scale(image_size), generator=generator)
    return x


@dataclass
class EpochStats:
    """Sums over one worker's batches, so ranks can be added before dividing."""
    loss_sum: float = 0.0
    correct: int = 0
    total: int = 0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.total, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)


def train_epoch(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
                device: torch.device, augment: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> EpochStats:
    """One pass of cross-entropy SGD over ``batches``; returns this worker's loss/accuracy sums.

    ``augment`` maps a uint8 [N,S,S,3] batch to float [N,3,S,S] in [0,1]; without it the
    images are only converted.
    """
    model.train()
    stats = EpochStats()
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)              # uint8 [N,S,S,3]
        labels = batch["label"].to(device, non_blocking=True).long()       # [N]
        x = augment(images) if augment is not None else to_float(images)   # [N,3,S,S]
        logits = model(x)                                                  # [N,C]
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = labels.numel()
        stats.loss_sum += float(loss.detach()) * n
        stats.correct += int((logits.detach().argmax(1) == labels).sum())
        stats.total += n
    return stats


@torch.inference_mode()
def evaluate_top1(model: nn.Module, batches: Iterable[Batch], device: torch.device) -> EpochStats:
    """Top-1 (and mean CE) of ``model`` on ``batches`` without augmentation; sums, like train_epoch."""
    model.eval()
    stats = EpochStats()
    for batch in batches:
        labels = batch["label"].to(device).long()                          # [N]
        logits = model(to_float(batch["image"].to(device)))                # [N,C]
        stats.loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        stats.correct += int((logits.argmax(1) == labels).sum())
        stats.total += labels.numel()
    return stats


def make_optimizer(model: nn.Module, tc: TeacherConfig
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD with momentum and weight decay, StepLR stepped once per epoch (METHOD.md)."""
    opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=tc.lr_step, gamma=tc.lr_gamma)


def state_bytes(model: nn.Module) -> bytes:
    """The model's state_dict as torch.save bytes, on CPU in fp32 (what an epoch file holds)."""
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
             for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def observer_file(observer: str, epochs: int) -> str:
    """The artifact file holding the observer named by ``teachers.observer``."""
    if observer == "last":
        return epoch_file(epochs)
    if observer == "torchvision":
        return TORCHVISION_OBSERVER_FILE
    n = observer.split(":", 1)[1]
    if not n.isdigit() or not 1 <= int(n) <= epochs:
        raise ConfigError(f"config key 'teachers.observer': {observer!r} names no trained epoch; "
                          f"use epoch:N with 1 <= N <= teachers.epochs ({epochs})")
    return epoch_file(int(n))


def check_observer(tc: TeacherConfig, num_classes: int) -> None:
    """Reject an observer choice the trajectory cannot provide, before any training."""
    observer_file(tc.observer, tc.epochs)
    if tc.observer == "torchvision" and (tc.model != "resnet18" or num_classes != 1000):
        raise ConfigError(
            "config key 'teachers.observer': 'torchvision' loads torchvision's ImageNet-1K ResNet-18, "
            f"which only fits teachers.model=resnet18 with 1000 classes (got {tc.model!r} with "
            f"{num_classes} classes); use 'last' or 'epoch:N'")


# ---------------------------------------------------------------------------- fault drill

def _drill_marker(key: str, epoch: int) -> tuple[str, str]:
    """(store key, name) of the marker saying the drill at ``epoch`` already failed once."""
    return f"{DRILL_PREFIX}{key}", f"fail_once_at_epoch_{epoch:03d}"


def _drill_fired(store: "Store", key: str, epoch: int) -> bool:
    mkey, name = _drill_marker(key, epoch)
    return name in store.list_files(mkey)  # [] while the marker folder does not exist


def _fail_after_first_batch(batches: Iterable[Batch], store: "Store", key: str, epoch: int,
                            rank: int) -> Iterator[Batch]:
    """Yield one batch, then fail every rank at once (the first attempt only).

    All ranks decide from the marker *before* rank 0 writes it (a barrier in between), so
    no rank is left waiting in an all-reduce for a peer that died.
    """
    import torch.distributed as dist

    it = iter(batches)
    yield next(it)
    fire = not _drill_fired(store, key, epoch)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if fire:
        if rank == 0:
            store.put_bytes(*_drill_marker(key, epoch), f"{time.time()}".encode())
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        raise RuntimeError(f"fault drill: failing epoch {epoch} of {key} once (rank {rank})")
    yield from it


# ---------------------------------------------------------------------------- Ray Train worker

def _worker_log() -> logging.Logger:
    from hello_ray.runtime import worker_logger

    return worker_logger("hello_ray.teachers")


def _all_reduce(device: torch.device, *values: float) -> list[float]:
    """Sum ``values`` over the DDP ranks (identity on one worker)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP rank: resume from the Ray checkpoint, train the remaining epochs, write each one.

    Reads only ``config`` (never argv or the environment): ``teachers`` (TeacherConfig
    fields), ``num_classes``, ``image_size``, ``use_gpu``, ``store``, ``key`` and
    ``fail_once_at_epoch`` (a fault drill for the tests; None in normal runs).
    """
    import ray.train
    import ray.train.torch

    tc = TeacherConfig(**config["teachers"])
    store: Store = config["store"]
    key: str = config["key"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch_device(config["use_gpu"])
    wlog = _worker_log()
    if tc.batch_size < world:
        raise ConfigError(f"config key 'teachers.batch_size': {tc.batch_size} cannot be split over "
                          f"{world} workers; use at least one image per worker")
    per_worker = tc.batch_size // world  # the global batch, split across ranks (DDP averages grads)

    seed_everything(tc.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    # On the device before the optimizer exists, so restored momentum buffers land there too.
    model = build_model(tc.model, config["num_classes"], config["image_size"]).to(device)
    opt, sched = make_optimizer(model, tc)
    start, resumed_from = 1, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        resumed_from = int(state["epoch"])
        start = resumed_from + 1
    ddp_model = ray.train.torch.prepare_model(model)  # DDP wrapper (identity on one worker)
    attempt = uuid.uuid4().hex[:8]
    if rank == 0:
        wlog.info("[teachers] %s: %d workers x batch %d, epochs %d-%d%s", key, world, per_worker,
                  start, tc.epochs, f" (resumed after epoch {resumed_from})" if resumed_from else "")

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    image_size = config["image_size"]
    for epoch in range(start, tc.epochs + 1):
        t0 = time.perf_counter()
        # Different crops per rank and epoch, reproducible from the seed.
        gen = torch.Generator(device=device).manual_seed(tc.seed * 100_003 + epoch * 1_009 + rank)
        batches: Iterable[Batch] = train_shard.iter_torch_batches(
            batch_size=per_worker, drop_last=True, local_shuffle_buffer_size=max(4 * per_worker, 256),
            local_shuffle_seed=tc.seed * 100_003 + epoch * 1_009 + rank)
        if config.get("fail_once_at_epoch") == epoch:
            batches = _fail_after_first_batch(batches, store, key, epoch, rank)
        tr = train_epoch(ddp_model, batches, opt, device,
                         augment=lambda im: train_augment(im, image_size, gen))
        sched.step()
        va = evaluate_top1(ddp_model.module if hasattr(ddp_model, "module") else ddp_model,
                           val_shard.iter_torch_batches(batch_size=max(per_worker, 256)), device)
        loss_sum, correct, total, vcorrect, vtotal = _all_reduce(
            device, tr.loss_sum, tr.correct, tr.total, va.correct, va.total)
        metrics = {"epoch": epoch, "top1": vcorrect / max(vtotal, 1), "loss": loss_sum / max(total, 1),
                   "train_acc": correct / max(total, 1), "lr": opt.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - t0, 2), "val_images": int(vtotal),
                   "attempt": attempt, "attempt_start_epoch": start, "resumed_from": resumed_from}
        if rank == 0:
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
                            "scheduler": sched.state_dict(), "epoch": epoch}, os.path.join(d, "state.pt"))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


# ---------------------------------------------------------------------------- Ray wrapper

def read_epoch_metrics(store: "Store", key: str, epochs: int) -> list[dict[str, Any]]:
    """The per-epoch json files 1..epochs (all attempts' epochs, not only the last Ray result's)."""
    names = set(store.list_files(key))
    out = []
    for e in range(1, epochs + 1):
        pt, js = epoch_file(e), epoch_metrics_file(e)
        if pt not in names or js not in names:
            raise RuntimeError(f"teachers artifact {key}: epoch {e} is missing ({pt} / {js}) after "
                               f"training finished; the Ray run under _ray/{key} did not reach it")
        out.append(json.loads(store.get_bytes(key, js)))
    return out


def _write_torchvision_observer(store: "Store", key: str, cfg: Config) -> None:
    """torchvision's ImageNet-1K ResNet-18 weights as the observer (downloads them: cluster only)."""
    try:
        model = build_model(cfg.teachers.model, 1000, cfg.data.image_size, pretrained=True)
    except Exception as e:
        raise RuntimeError(f"teachers.observer=torchvision: could not load torchvision's ImageNet "
                           f"weights for {cfg.teachers.model} ({e}); this needs internet access "
                           "on the driver, or use teachers.observer=last") from e
    store.put_bytes(key, TORCHVISION_OBSERVER_FILE, state_bytes(model))


def check_local_resources(compute: ComputeConfig) -> None:
    """On a local Ray (no cluster address), refuse a request that could never be scheduled.

    Ray Train reserves ``num_workers x cpus_per_worker`` CPUs for the whole run; Ray Data's
    read/decode tasks need one more CPU, or the first epoch waits for data forever. A real
    cluster may autoscale into the request, so only a local Ray is checked.
    """
    import ray

    if compute.address or os.environ.get("RAY_ADDRESS"):
        return
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    reserved = compute.num_workers * compute.cpus_per_worker
    if cpus - reserved < 1:
        raise ConfigError(
            f"config keys 'compute.num_workers' x 'compute.cpus_per_worker' = {compute.num_workers} x "
            f"{compute.cpus_per_worker} reserve {reserved:g} of this local Ray's {cpus:g} CPUs, leaving "
            "less than 1 for Ray Data's read/decode tasks (training would wait for data forever); "
            f"set compute.cpus_per_worker={max((cpus - 1) / compute.num_workers, 0.1):.2g} or fewer workers")
    if compute.use_gpu and gpus < compute.num_workers:
        raise ConfigError(f"config key 'compute.use_gpu': {compute.num_workers} workers need "
                          f"{compute.num_workers} GPUs, this local Ray has {gpus:g}; set "
                          "compute.use_gpu=false or fewer workers")


def run(cfg: Config, store: "Store", key: str, inputs: dict[str, str],
        *, fail_once_at_epoch: int | None = None) -> dict[str, Any]:
    """Train the trajectory on Ray Train and write ``trajectory.json``; returns the summary.

    ``fail_once_at_epoch=k`` is a fault drill (tests): every rank raises after the first
    batch of epoch k on the first attempt only, so the run must resume from epoch k-1's
    checkpoint. Needs ``compute.max_failures >= 1``.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from hello_ray.data.decode import decoded_split
    from hello_ray.data.sources import load_train_val
    from hello_ray.runtime import ensure_ray

    tc = cfg.teachers
    observer_file(tc.observer, tc.epochs)  # a bad epoch:N fails before Ray starts
    ensure_ray(cfg.compute)
    check_local_resources(cfg.compute)
    train, val = load_train_val(cfg.data, store)
    num_classes = len(train.class_names)
    check_observer(tc, num_classes)
    columns = ["image", "label"]  # the string ids cannot become tensors
    # A global shuffle of the (small, still encoded) training rows, redrawn every epoch:
    # sources list ImageFolder images class by class, and a local shuffle buffer alone would
    # then feed near single-class batches. Data order is therefore not seeded; init and crops are.
    train = dataclasses.replace(train, ds=train.ds.random_shuffle())
    datasets = {"train": decoded_split(train, cfg.data, columns=columns),
                "val": decoded_split(val, cfg.data, columns=columns)}
    storage_path, filesystem = store.ray_storage()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"teachers": section_dict(tc), "num_classes": num_classes,
                           "image_size": cfg.data.image_size, "use_gpu": cfg.compute.use_gpu,
                           "store": store, "key": key, "fail_once_at_epoch": fail_once_at_epoch},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.compute.num_workers, use_gpu=cfg.compute.use_gpu,
            resources_per_worker={"CPU": cfg.compute.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.compute.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=key, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.compute.max_failures)),
        datasets=datasets,
    )
    t0 = time.perf_counter()
    trainer.fit()  # raises TrainingFailedError once max_failures restarts are spent
    train_s = time.perf_counter() - t0

    epochs = read_epoch_metrics(store, key, tc.epochs)
    if tc.observer == "torchvision":
        _write_torchvision_observer(store, key, cfg)
    observer = observer_file(tc.observer, tc.epochs)
    trajectory = {
        "model": tc.model, "num_classes": num_classes, "image_size": cfg.data.image_size,
        "class_names": list(train.class_names),
        "epochs": [{"epoch": m["epoch"], "top1": m["top1"], "loss": m["loss"],
                    "train_acc": m["train_acc"], "file": epoch_file(m["epoch"])} for m in epochs],
        "observer": observer,
    }
    store.put_bytes(key, TRAJECTORY_FILE, json.dumps(trajectory, indent=1).encode())
    attempts = sorted({m["attempt_start_epoch"] for m in epochs})
    return {"epochs": tc.epochs, "final_top1": epochs[-1]["top1"],
            "best_top1": max(m["top1"] for m in epochs), "observer": observer,
            "num_classes": num_classes, "val_images": epochs[-1]["val_images"],
            "attempt_start_epochs": attempts,
            "train_s": round(train_s, 2)}
