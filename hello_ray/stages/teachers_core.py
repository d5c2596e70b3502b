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
from hello_ray.data.augment import random_resized_crop_flip, to_float, train_crop_scale
from hello_ray.failures import check_finite

Batch = dict[str, torch.Tensor]

def train_augment(images: torch.Tensor, image_size: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [N,S,S,3] -> augmented float [N,3,S,S] in [0,1] (random-resized crop + flip)."""
    x = to_float(images)                                                   # [N,3,S,S]
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
                epoch: int | None = None) -> EpochStats:
    """One pass of cross-entropy SGD over ``batches``; returns this worker's loss/accuracy sums.

    ``augment`` maps a uint8 [N,S,S,3] batch to float [N,3,S,S] in [0,1]; without it the
    images are only converted. A non-finite loss raises :class:`hello_ray.failures.NonFiniteLoss`
    naming ``epoch`` and the step (1-based), after the step that produced it.
    """
    model.train()
    stats = EpochStats()
    for step, batch in enumerate(batches, 1):
        images = batch["image"].to(device, non_blocking=True)              # uint8 [N,S,S,3]
        labels = batch["label"].to(device, non_blocking=True).long()       # [N]
        x = augment(images) if augment is not None else to_float(images)   # [N,3,S,S]
        logits = model(x)                                                  # [N,C]
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = labels.numel()
        value = float(loss.detach())  # the one host sync of the step
        check_finite(value, "teachers", epoch, step, f"teachers.lr={optimizer.defaults['lr']:g}")
        stats.loss_sum += value * n
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
