"""Stage 3 of METHOD.md: LoRA knowledge transfer from the multi-weak teachers to the CLIP projector.

Reads the teacher trajectory (input role ``teachers``) and the real training set; writes the
adapter the distilled set ships with:

    adapter.safetensors + adapter.json   the LoRA tensors (cfg.transfer.adapter_dtype) + rebuild recipe
    history.json                         per-epoch loss parts (total, mse, ce)
    fidelity.json                        label fidelity on real validation views, before and after

Compute (plain PyTorch, tested without Ray): ``transfer_loss``, ``transfer_step``,
``fidelity_counts``/``finish_fidelity``. Orchestration: ``run`` drives a Ray Train DDP job whose
per-worker loop is ``train_loop``; it checkpoints every epoch (LoRA state + optimizer + epoch) under
the run name = artifact key, so a crashed run resumes from its last finished epoch.

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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hello_ray.config import Config, ConfigError, data_identity, section_dict
from hello_ray.data.augment import train_crop_scale
from hello_ray.runtime import auto_bf16

log = logging.getLogger("hello_ray")

STAGE = "transfer"
CHECKPOINT_FILE = "transfer_state.pt"


# ---------------------------------------------------------------------------- compute

def transfer_loss(proj_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  ce_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """mean over teachers of MSE(projector, teacher) + ce_weight * CE(projector, true class).

    proj_logits [N, C], teacher_logits [T, N, C], labels [N] -> (scalar loss, float parts).
    """
    if teacher_logits.dim() != 3 or teacher_logits.shape[1:] != proj_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match projector logits "
                         f"{tuple(proj_logits.shape)} as [T, N, C] vs [N, C]: are the teachers trained "
                         "on the same classes as the projector's class names?")
    # Mean over [T, N, C] = mean over teachers of each teacher's element-mean MSE.
    mse = (proj_logits.unsqueeze(0) - teacher_logits).pow(2).mean()
    ce = F.cross_entropy(proj_logits, labels)
    loss = mse + ce_weight * ce
    return loss, {"loss": float(loss.detach()), "mse": float(mse.detach()), "ce": float(ce.detach())}


def teacher_targets(teachers: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Teacher logits [T, N, C] (fp32, a normal tensor usable in autograd) for images [N, 3, H, W]."""
    teachers.eval()
    with torch.inference_mode(), torch.autocast(images.device.type, dtype=torch.bfloat16,
                                                enabled=auto_bf16(images.device)):
        t = teachers(images)  # [T, N, C]
    # Inference tensors cannot be saved for backward; a clone outside inference mode can.
    return t.float().clone()


def lora_parameters(projector: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters of a projector (after add_lora): the only ones transfer may train."""
    params = [p for p in projector.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the projector has no trainable parameters: call add_lora(...) before transfer")
    return params


def transfer_step(projector: nn.Module, teachers: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  optimizer: torch.optim.Optimizer, ce_weight: float) -> dict[str, float]:
    """One optimisation step of the LoRA on a batch: images [N, 3, H, W] in [0, 1], labels [N].

    The teachers run in eval mode under inference_mode (they only make targets); the projector
    runs in eval mode too (frozen BN statistics, see the module docstring) with gradients on.
    Returns the loss parts of the batch as floats.
    """
    targets = teacher_targets(teachers, images)  # [T, N, C]
    projector.eval()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=auto_bf16(images.device)):
        logits = projector(images)  # [N, C]
    loss, parts = transfer_loss(logits.float(), targets, labels, ce_weight)
    loss.backward()
    optimizer.step()
    return parts


FIDELITY_KEYS = ("n", "agree", "kl_sum", "projector_correct", "teacher_correct")


@torch.inference_mode()
def fidelity_counts(projector: nn.Module, teachers: nn.Module, images: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """Sums over one batch, as a float64 vector in FIDELITY_KEYS order (summable across batches/ranks).

    agree: projector top-1 == ensemble top-1; kl_sum: sum_i KL(softmax(ensemble) || softmax(projector));
    *_correct: top-1 == true label.
    """
    projector.eval()
    teachers.eval()
    ensemble = teachers(images).float().mean(0)  # [N, C]: mean logits of the window
    logits = projector(images).float()  # [N, C]
    log_p_t = F.log_softmax(ensemble, dim=1)
    log_p_p = F.log_softmax(logits, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_p)).sum(1)  # [N]
    t_pred, p_pred = ensemble.argmax(1), logits.argmax(1)
    return torch.tensor([
        float(len(labels)), float((t_pred == p_pred).sum()), float(kl.sum()),
        float((p_pred == labels).sum()), float((t_pred == labels).sum()),
    ], dtype=torch.float64)


def finish_fidelity(counts: torch.Tensor) -> dict[str, float]:
    """Summed counts -> {"views", "agreement", "kl", "projector_top1", "teacher_top1"}."""
    n, agree, kl_sum, p_ok, t_ok = (float(v) for v in counts)
    if n == 0:
        raise ValueError("label fidelity over zero validation views: the validation split is empty")
    return {"views": int(n), "agreement": agree / n, "kl": kl_sum / n,
            "projector_top1": p_ok / n, "teacher_top1": t_ok / n}


def label_fidelity(projector: nn.Module, teachers: nn.Module,
                   batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Fidelity over (images [N,3,H,W], labels [N]) batches; ``reduce`` sums counts across ranks."""
    counts = torch.zeros(len(FIDELITY_KEYS), dtype=torch.float64)
    for images, labels in batches:
        counts += fidelity_counts(projector, teachers, images, labels)
    if reduce is not None:
        counts = reduce(counts)
    return finish_fidelity(counts)


# ---------------------------------------------------------------------------- Ray wrapper

def stage_config(cfg: Config) -> dict[str, Any]:
    """The transfer settings and the training data they saw (compute layout does not change results)."""
    from hello_ray.models.clip import pretrained_identity

    tc = {**section_dict(cfg.transfer), "pretrained": pretrained_identity(cfg.transfer.pretrained)}
    return {"transfer": tc, "data": data_identity(cfg.data)}


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # float64 CPU tensor: gloo; fine for a few numbers
    return t


crop_scale = train_crop_scale  # the shared rule lives with the augmentations


def _batches(shard, batch_size: int, device: torch.device, image_size: int, augment: bool,
             generator: torch.Generator | None = None, seed: int | None = None
             ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Decoded uint8 rows of a Ray Data shard -> (images [N,3,S,S] float in [0,1], labels [N])."""
    from hello_ray.data.augment import random_resized_crop_flip, to_float

    kwargs: dict[str, Any] = {}
    if augment:  # equal shards (streaming_split) + drop_last: every DDP rank runs the same steps
        kwargs = {"drop_last": True, "local_shuffle_buffer_size": max(4 * batch_size, 256),
                  "local_shuffle_seed": seed}
    for batch in shard.iter_torch_batches(batch_size=batch_size, **kwargs):
        x = to_float(batch["image"].to(device, non_blocking=True))  # [N,3,S,S]
        y = batch["label"].to(device, non_blocking=True).long()  # [N]
        if augment:
            x, _, _ = random_resized_crop_flip(x, image_size, scale=crop_scale(image_size),
                                               generator=generator)
        yield x, y


def _worker_log() -> logging.Logger:
    from hello_ray.runtime import worker_logger

    return worker_logger("hello_ray.transfer")


def train_loop(config: dict[str, Any]) -> None:
    """Per-worker Ray Train loop. ``config`` holds the Config, the store, the artifact key, the
    teachers key and the class names; it never reads argv or the environment."""
    import ray.train
    from torch.nn.parallel import DistributedDataParallel

    from hello_ray.models.ensemble import TeacherEnsemble
    from hello_ray.models.projector import Projector
    from hello_ray.runtime import seed_everything, torch_device

    cfg: Config = config["cfg"]
    store = config["store"]
    key: str = config["key"]
    tc = cfg.transfer
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch_device(cfg.compute.use_gpu)
    wlog = _worker_log()
    seed_everything(tc.seed)
    if tc.batch_size < world:
        raise ConfigError(f"config key 'transfer.batch_size': {tc.batch_size} cannot be split over "
                          f"{world} workers; use at least one image per worker")
    per_worker = tc.batch_size // world  # the global batch, split across ranks (DDP averages grads)
    image_size = cfg.data.image_size

    teachers = TeacherEnsemble.from_trajectory(store, config["teachers_key"], tc.teacher_window,
                                               tc.n_teachers, device)
    teachers.eval()
    projector = Projector.from_clip(tc.clip_model, tc.pretrained, config["class_names"]).to(device)
    val_shard = ray.train.get_dataset_shard("val")

    def val_batches():
        return _batches(val_shard, per_worker, device, image_size, augment=False)

    start_epoch, history, before = 0, [], None
    ckpt = ray.train.get_checkpoint()
    state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        start_epoch, history, before = state["epoch"], state["history"], state["fidelity_before"]
        if rank == 0:
            wlog.info("[transfer] %s: resuming after epoch %d", key, start_epoch)
    if before is None:
        before = label_fidelity(projector, teachers, val_batches(), _all_reduce_sum)

    projector.add_lora(tc.conv_rank, tc.head_rank, style=tc.lora_style, alpha_ratio=tc.lora_alpha_ratio)
    projector.to(device)
    params = lora_parameters(projector)
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    if state is not None:
        projector.load_lora_state_dict(state["lora"], where=f"Ray checkpoint of {key}")
        optimizer.load_state_dict(state["optimizer"])
    model: nn.Module = projector
    if world > 1:
        model = DistributedDataParallel(projector, device_ids=[device.index] if device.type == "cuda" else None)

    train_shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch + 1, tc.epochs + 1):
        t0 = time.perf_counter()
        sums = torch.zeros(4, dtype=torch.float64)  # loss*n, mse*n, ce*n, n
        seed = tc.seed * 100_003 + epoch * 1_009 + rank  # different views per rank and epoch, reproducible
        gen = torch.Generator(device=device).manual_seed(seed)
        for x, y in _batches(train_shard, per_worker, device, image_size, augment=True, generator=gen,
                             seed=seed):
            parts = transfer_step(model, teachers, x, y, optimizer, tc.ce_weight)
            n = len(y)
            sums += torch.tensor([parts["loss"] * n, parts["mse"] * n, parts["ce"] * n, n],
                                 dtype=torch.float64)
        sums = _all_reduce_sum(sums)
        n = max(float(sums[3]), 1.0)
        row = {"epoch": epoch, "loss": float(sums[0]) / n, "mse": float(sums[1]) / n,
               "ce": float(sums[2]) / n, "views": int(sums[3]), "seconds": round(time.perf_counter() - t0, 2)}
        history.append(row)
        if rank == 0:
            wlog.info("[transfer] epoch %d/%d loss %.4f (mse %.4f, ce %.4f) %d views %.1f s",
                      epoch, tc.epochs, row["loss"], row["mse"], row["ce"], row["views"], row["seconds"])
        _report_epoch(projector, optimizer, epoch, history, before, rank, row)

    after, adapter_dir = _shipped_fidelity(projector, teachers, val_batches, tc.adapter_dtype, device)
    if rank == 0:
        store.put_dir(key, adapter_dir)
        store.put_bytes(key, "history.json", json.dumps(history, indent=1).encode())
        fidelity = {"before": before, "after": after, "teacher_window": tc.teacher_window,
                    "n_teachers": tc.n_teachers, "ensemble": "mean of teacher logits",
                    "views": "real validation images, no augmentation",
                    "adapter_dtype": tc.adapter_dtype}
        store.put_bytes(key, "fidelity.json", json.dumps(fidelity, indent=1).encode())
        wlog.info("[transfer] fidelity: agreement %.3f -> %.3f, KL %.3f -> %.3f, projector top-1 %.3f -> "
                  "%.3f (teachers %.3f)", before["agreement"], after["agreement"], before["kl"],
                  after["kl"], before["projector_top1"], after["projector_top1"], after["teacher_top1"])
    shutil.rmtree(adapter_dir, ignore_errors=True)


def _report_epoch(projector: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                  history: list[dict], before: dict, rank: int, row: dict) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (LoRA + optimizer + epoch)."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            lora = {n: t.cpu().clone() for n, t in projector.lora_state_dict().items()}
            torch.save({"lora": lora, "optimizer": optimizer.state_dict(), "epoch": epoch,
                        "history": history, "fidelity_before": before}, Path(d) / CHECKPOINT_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(dict(row), checkpoint=checkpoint)


def _shipped_fidelity(projector: nn.Module, teachers: nn.Module,
                      val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], dtype: str,
                      device: torch.device) -> tuple[dict[str, float], Path]:
    """Save the adapter as shipped (``dtype``), load it back merged, and measure its fidelity
    (every rank: the val shards are split). Returns (fidelity, the local adapter folder)."""
    from hello_ray.models.adapter import load_adapter, save_adapter

    out = Path(tempfile.mkdtemp(prefix="hello_ray_adapter_"))
    save_adapter(projector, out, dtype=dtype)
    shipped = load_adapter(out, merge=True).to(device)
    return label_fidelity(shipped, teachers, val_batches(), _all_reduce_sum), out


def run(cfg: Config, store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
    """Fit the projector's LoRA to the teacher window on Ray Train; write the transfer artifact."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from hello_ray.data.decode import decoded_split
    from hello_ray.data.sources import load_train_val
    from hello_ray.runtime import ensure_ray

    if "teachers" not in inputs:
        raise KeyError(f"transfer {key}: needs the input role 'teachers' (got {sorted(inputs)})")
    ensure_ray(cfg.compute)
    train, val = load_train_val(cfg.data, store)
    columns = ["image", "label"]  # the string ids cannot become tensors
    storage_path, storage_fs = store.ray_storage()
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "store": store, "key": key, "teachers_key": inputs["teachers"],
                           "class_names": list(train.class_names)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.compute.num_workers, use_gpu=cfg.compute.use_gpu,
            resources_per_worker={"CPU": cfg.compute.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.compute.use_gpu else "gloo"),
        datasets={"train": decoded_split(train, cfg.data, columns=columns).randomize_block_order(),
                  "val": decoded_split(val, cfg.data, columns=columns)},
        run_config=ray.train.RunConfig(
            name=key, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.compute.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"transfer {key} failed") from result.error
    fidelity = json.loads(store.get_bytes(key, "fidelity.json"))
    history = json.loads(store.get_bytes(key, "history.json"))
    log.info("[transfer] %s: %d epochs; agreement with the teachers %.3f -> %.3f, KL %.3f -> %.3f",
             key, len(history), fidelity["before"]["agreement"], fidelity["after"]["agreement"],
             fidelity["before"]["kl"], fidelity["after"]["kl"])
    return {"epochs": len(history), "final_loss": history[-1]["loss"] if history else None,
            "fidelity_before": fidelity["before"], "fidelity_after": fidelity["after"],
            "train_s": round(time.perf_counter() - t0, 2)}
