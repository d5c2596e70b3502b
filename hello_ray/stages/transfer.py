"""Stage 3 of METHOD.md: LoRA knowledge transfer from the multi-weak teachers to the CLIP projector.

Reads the teacher trajectory (input role ``teachers``) and the real training set; writes the
adapter the distilled set ships with:

    adapter.safetensors + adapter.json   the LoRA tensors (cfg.transfer.adapter_dtype) + rebuild recipe
    history.json                         per-epoch loss parts (total, mse, ce) and which attempt
                                         trained the epoch (attempt id, the epoch it started from)
    fidelity.json                        label fidelity on real validation views, before and after

This module is the Ray wrapper only; the compute (``transfer_loss``, ``transfer_step``, label
fidelity) is :mod:`hello_ray.stages.transfer_core`. ``run`` launches ``train_loop_per_worker``
through :func:`hello_ray.launcher.fit`; it checkpoints every epoch (LoRA state + optimizer + epoch)
under the run name = artifact key, so a crashed run resumes from its last finished epoch.

Choices where METHOD.md is open (written down here, as it asks):
- The frozen CLIP encoder stays in eval mode while its LoRA trains: its BatchNorm statistics are
  part of the public base model, not of the adapter, so they must not drift with the batches.
- "Averaged over the teachers": loss = mean_t MSE(p, t_t) + ce_weight * CE(p, y). The CE term does
  not depend on the teacher, so averaging it over teachers changes nothing.
- Fidelity compares the projector with the *ensemble* of the window: its logits are the mean of
  the teachers' logits (the minimiser of the mean MSE above), its distribution their softmax.
  Validation views are the decoded validation images at ``data.image_size`` without augmentation.
  "before" is the text-initialised zero-shot projector (no LoRA); "after" is the adapter as it is
  shipped (saved in ``adapter_dtype``, loaded back and merged), so it measures what students get.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from hello_ray import launcher
from hello_ray.config import Config, data_identity, section_dict
from hello_ray.data.augment import train_crop_scale, whole_crop
from hello_ray.formats.fidelity import read_fidelity, write_fidelity
from hello_ray.stages.transfer_core import label_fidelity, lora_parameters, shipped_fidelity, transfer_step

log = logging.getLogger("hello_ray.transfer")

STAGE = "transfer"
KIND = "train"  # one Ray Train run (launcher.fit; hello_ray/stages/__init__.py)
INPUTS = ("teachers",)  # the teacher window; the real data comes from cfg.data
DATA_SPLITS = ("train", "val")  # their fingerprints join the key (pipeline.Run.stage_config)
CHECKPOINT_FILE = "transfer_state.pt"


def stage_config(cfg: Config) -> dict[str, Any]:
    """The transfer settings and the training data they saw (compute layout does not change results)."""
    from hello_ray.models.clip import pretrained_identity

    tc = {**section_dict(cfg.transfer), "pretrained": pretrained_identity(cfg.transfer.pretrained)}
    return {"transfer": tc, "data": data_identity(cfg.data, training=True)}


def check(cfg: Config) -> None:
    """Rules decidable from the config alone: the global batch covers every Train worker.
    (The window against the trajectory and the ranges are checked by Config.validate.)"""
    launcher.check_batch_split("transfer.batch_size", cfg.transfer.batch_size, cfg.compute)


def resources(cfg: Config) -> dict[str, float]:
    """What the stage holds at once: its Train workers, plus the data tasks feeding them."""
    return launcher.train_resources(cfg.compute, cfg.data.cpus_per_task)


# ---------------------------------------------------------------------------- Ray Train worker

def _batches(shard, batch_size: int, device: torch.device, image_size: int, augment: bool,
             generator: torch.Generator | None = None, seed: int | None = None, crop: bool = True,
             decode: dict[str, Any] | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Decoded uint8 rows of a Ray Data shard -> (images [N,3,S,S] float in [0,1], labels [N]).
    ``augment``: crop (unless the rows arrive cropped, ``crop=False``) and flip. ``decode`` (training
    rows left encoded, data.decode=worker): decoded on ``device`` here, whole-image crops cut
    with boxes drawn from ``seed`` (``data.decode.worker_batches``)."""
    from hello_ray.data.augment import random_flip, random_resized_crop_flip, to_float
    from hello_ray.data.decode import worker_batches

    kwargs: dict[str, Any] = {}
    if augment:  # equal shards (streaming_split) + drop_last: every DDP rank runs the same steps
        kwargs = {"drop_last": True, "local_shuffle_buffer_size": max(4 * batch_size, 256),
                  "local_shuffle_seed": seed}
    rows = (worker_batches(shard, batch_size, device, image_size, decode["train_crop"],
                           torch.Generator().manual_seed(seed or 0), decode["on_corrupt"], seed)
            if decode else shard.iter_torch_batches(batch_size=batch_size, **kwargs))
    for batch in rows:
        x = to_float(batch["image"].to(device, non_blocking=True))  # [N,3,S,S]
        y = batch["label"].to(device, non_blocking=True).long()  # [N]
        if augment and not crop:
            x = random_flip(x, generator)
        elif augment:
            x, _, _ = random_resized_crop_flip(x, image_size, scale=train_crop_scale(image_size),
                                               generator=generator)
        yield x, y


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Per-worker Ray Train loop. ``config`` holds the Config, the store, the artifact key, the
    teachers key, the class names and ``drill`` (a :class:`~hello_ray.launcher.KillDrill` for the
    tests, else None); it never reads argv or the environment."""
    import uuid

    import ray.train
    from torch.nn.parallel import DistributedDataParallel

    from hello_ray.models.ensemble import TeacherEnsemble
    from hello_ray.models.projector import Projector

    cfg: Config = config["cfg"]
    store = config["store"]
    key: str = config["key"]
    tc = cfg.transfer
    w = launcher.worker_context(cfg.compute.use_gpu, tc.batch_size, tc.seed)
    wlog = launcher.worker_logger(STAGE)
    image_size = cfg.data.image_size

    teachers = TeacherEnsemble.from_trajectory(store, config["teachers_key"], tc.teacher_window,
                                               tc.n_teachers, w.device)
    teachers.eval()
    # The prompts through the text tower on the worker's device (1000 classes x 7 templates on a GPU).
    projector = Projector.from_clip(tc.clip_model, tc.pretrained, config["class_names"], device=w.device).to(w.device)
    val_shard = ray.train.get_dataset_shard("val")

    def val_batches():
        return _batches(val_shard, w.per_worker_batch, w.device, image_size, augment=False)

    start_epoch, history, before = 0, [], None
    ckpt = ray.train.get_checkpoint()
    state = None
    if ckpt is not None:
        # Tensors, dicts, lists and numbers only: nothing from the store is unpickled as code.
        state = launcher.load_checkpoint(ckpt, CHECKPOINT_FILE, key)
        start_epoch, history, before = state["epoch"], state["history"], state["fidelity_before"]
        if w.rank == 0:
            wlog.info("[transfer] %s: resuming after epoch %d", key, start_epoch)
    if before is None:
        before = label_fidelity(projector, teachers, val_batches(), launcher.all_reduce_sum)

    projector.add_lora(tc.conv_rank, tc.head_rank, style=tc.lora_style, alpha_ratio=tc.lora_alpha_ratio)
    projector.to(w.device)
    optimizer = torch.optim.AdamW(lora_parameters(projector), lr=tc.lr, weight_decay=tc.weight_decay)
    if state is not None:
        projector.load_lora_state_dict(state["lora"], where=f"Ray checkpoint of {key}")
        optimizer.load_state_dict(state["optimizer"])
    model: nn.Module = projector
    if w.world > 1:
        model = DistributedDataParallel(projector, device_ids=[w.device.index] if w.device.type == "cuda" else None)

    train_shard = ray.train.get_dataset_shard("train")
    attempt = uuid.uuid4().hex[:8]  # on every history row: a resumed run never retrains a finished epoch
    for epoch in range(start_epoch + 1, tc.epochs + 1):
        t0 = time.perf_counter()
        sums = torch.zeros(4, dtype=torch.float64)  # loss*n, mse*n, ce*n, n
        seed = launcher.epoch_seed(tc.seed, epoch, w.rank)  # other views per rank and epoch, reproducible
        gen = torch.Generator(device=w.device).manual_seed(seed)
        batches = _batches(train_shard, w.per_worker_batch, w.device, image_size, augment=True,
                           generator=gen, seed=seed, crop=whole_crop(cfg) is None,
                           decode=config["decode"] if config["decode"]["on_worker"] else None)
        for step, (x, y) in enumerate(launcher.drilled(batches, config.get("drill"), store, key, epoch,
                                                       w.rank), 1):
            parts = transfer_step(model, teachers, x, y, optimizer, tc.ce_weight, epoch=epoch, step=step)
            n = len(y)
            sums += torch.tensor([parts["loss"] * n, parts["mse"] * n, parts["ce"] * n, n],
                                 dtype=torch.float64)
        sums = launcher.all_reduce_sum(sums)
        n = max(float(sums[3]), 1.0)
        row = {"epoch": epoch, "loss": float(sums[0]) / n, "mse": float(sums[1]) / n,
               "ce": float(sums[2]) / n, "views": int(sums[3]), "seconds": round(time.perf_counter() - t0, 2),
               "attempt": attempt, "attempt_start_epoch": start_epoch + 1}
        history.append(row)
        if w.rank == 0:
            wlog.info("[transfer] epoch %d/%d loss %.4f (mse %.4f, ce %.4f) %d views %.1f s",
                      epoch, tc.epochs, row["loss"], row["mse"], row["ce"], row["views"], row["seconds"])
        _report_epoch(projector, optimizer, epoch, history, before, w.rank, row, store)

    after, adapter_dir = shipped_fidelity(projector, teachers, val_batches, tc.adapter_dtype, w.device,
                                          launcher.all_reduce_sum)
    if w.rank == 0:
        store.put_dir(key, adapter_dir)
        store.put_bytes(key, "history.json", json.dumps(history, indent=1).encode())
        fidelity = {"before": before, "after": after, "teacher_window": tc.teacher_window,
                    "n_teachers": tc.n_teachers, "ensemble": "mean of teacher logits",
                    "views": "real validation images, no augmentation",
                    "adapter_dtype": tc.adapter_dtype}
        write_fidelity(store, key, fidelity)
        wlog.info("[transfer] fidelity: agreement %.3f -> %.3f, KL %.3f -> %.3f, projector top-1 %.3f -> "
                  "%.3f (teachers %.3f)", before["agreement"], after["agreement"], before["kl"],
                  after["kl"], before["projector_top1"], after["projector_top1"], after["teacher_top1"])
    shutil.rmtree(adapter_dir, ignore_errors=True)


def _report_epoch(projector: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                  history: list[dict], before: dict, rank: int, row: dict, store) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (LoRA + optimizer + epoch)."""
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            lora = {n: t.cpu().clone() for n, t in projector.lora_state_dict().items()}
            torch.save({"lora": lora, "optimizer": optimizer.state_dict(), "epoch": epoch,
                        "history": history, "fidelity_before": before}, Path(d) / CHECKPOINT_FILE)
        launcher.report(dict(row), store, d if rank == 0 else None)


# ---------------------------------------------------------------------------- driver

def run(cfg: Config, store, key: str, inputs: dict[str, str],
        *, drill: launcher.KillDrill | None = None) -> dict[str, Any]:
    """Fit the projector's LoRA to the teacher window on Ray Train; write the transfer artifact.

    ``drill``: a fault drill for the tests (a rank killed mid-epoch, see launcher.KillDrill)."""
    from hello_ray.data.corrupt import corrupt_summary
    from hello_ray.data.decode import decode_on_worker, decoded_split, training_split
    from hello_ray.data.sources import load_train_val

    train, val = load_train_val(cfg.data, store)
    corrupt = corrupt_summary({"train": train, "val": val}, cfg.data, store)  # before any training
    columns = ["image", "label"]  # the string ids cannot become tensors
    on_worker = decode_on_worker(cfg.data, cfg.compute.use_gpu)
    t0 = time.perf_counter()
    launcher.fit(STAGE, cfg.compute, store, key, train_loop_per_worker,
                 {"cfg": cfg, "store": store, "key": key, "teachers_key": inputs["teachers"],
                  "class_names": list(train.class_names), "drill": drill,
                  "decode": {"on_worker": on_worker, "train_crop": whole_crop(cfg), "on_corrupt": cfg.data.on_corrupt}},
                 {"train": training_split(train, cfg.data, on_worker, whole_crop(cfg)).randomize_block_order(),
                  "val": decoded_split(val, cfg.data, columns=columns)})
    fidelity = read_fidelity(store, key)
    history = json.loads(store.get_bytes(key, "history.json"))
    log.info("[transfer] %s: %d epochs; agreement with the teachers %.3f -> %.3f, KL %.3f -> %.3f",
             key, len(history), fidelity["before"]["agreement"], fidelity["after"]["agreement"],
             fidelity["before"]["kl"], fidelity["after"]["kl"])
    return {"epochs": len(history), "final_loss": history[-1]["loss"] if history else None,
            "fidelity_before": fidelity["before"], "fidelity_after": fidelity["after"],
            "corrupt": corrupt, "train_s": round(time.perf_counter() - t0, 2)}
