"""Teacher trajectory compute (METHOD.md stage 1), plain PyTorch: no Ray in this file.

Everything here works on any iterable of ``{"image": uint8 [N,S,S,3], "label": int64 [N]}``
batches on any device, so it is tested without Ray and benchmarked on a GPU machine that has
no Ray. The Ray wrapper (:mod:`hello_ray.stages.teachers`) feeds it Ray Data shards inside a
Ray Train worker and writes the checkpoints.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hello_ray.config import TeacherConfig
from hello_ray.data.augment import random_flip, random_resized_crop_flip, to_float, train_crop_scale
from hello_ray.failures import LossLog

# Losses read back to the host every this many steps (one sync each), not at every step.
LOSS_CHECK_EVERY = 50

Batch = dict[str, torch.Tensor]

def train_augment(images: torch.Tensor, image_size: int, generator: torch.Generator | None = None,
                  crop: bool = True) -> torch.Tensor:
    """uint8 [N,S,S,3] -> augmented float [N,3,S,S] in [0,1]: random-resized crop + flip, or only the
    flip when the crop was cut from the whole image as it was decoded (``crop=False``,
    ``data.train_crop=whole``)."""
    x = to_float(images)                                                   # [N,3,S,S]
    if not crop:
        return random_flip(x, generator)
    x, _, _ = random_resized_crop_flip(x, image_size, scale=train_crop_scale(image_size), generator=generator)
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
                device: torch.device, augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                epoch: int | None = None, precision: str = "fp32", check_every: int = LOSS_CHECK_EVERY,
                ) -> EpochStats:
    """One pass of cross-entropy SGD over ``batches``; returns this worker's loss/accuracy sums.

    ``augment`` maps a uint8 [N,S,S,3] batch to float [N,3,S,S] in [0,1]; without it the
    images are only converted. The sums stay on the device and are read once, at the end; the
    losses are read every ``check_every`` steps (``failures.LossLog``), and a non-finite one raises
    :class:`hello_ray.failures.NonFiniteLoss` naming ``epoch`` and its step (1-based). ``precision``:
    fp32, or bf16 autocast of the forward and the loss (``teachers.precision``). Inputs go
    channels-last; on a GPU cuDNN autotunes the one fixed shape.
    """
    model.train()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    losses = LossLog(device, check_every, "teachers", f"teachers.lr={optimizer.defaults['lr']:g}")
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)              # uint8 [N,S,S,3]
        labels = batch["label"].to(device, non_blocking=True).long()       # [N]
        x = augment(images) if augment is not None else to_float(images)   # [N,3,S,S]
        x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            logits = model(x)                                              # [N,C]
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = labels.numel()
        losses.add(loss, epoch)
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(1) == labels).sum()
        total += n
    losses.read(epoch)
    return EpochStats(loss_sum=float(loss_sum), correct=int(correct), total=total)


@torch.inference_mode()
def evaluate_top1(model: nn.Module, batches: Iterable[Batch], device: torch.device) -> EpochStats:
    """Top-1 (and mean CE) of ``model`` on ``batches`` without augmentation; sums, like train_epoch."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    for batch in batches:
        labels = batch["label"].to(device).long()                          # [N]
        logits = model(to_float(batch["image"].to(device)).contiguous(memory_format=torch.channels_last))
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()   # on the device
        correct += (logits.argmax(1) == labels).sum()
        total += labels.numel()
    return EpochStats(loss_sum=float(loss_sum), correct=int(correct), total=total)


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
