"""LoRA knowledge transfer compute (METHOD.md stage 3), plain PyTorch: no Ray in this file.

The loss, one optimisation step, and label fidelity (how well the projector reproduces the
ensemble of the teacher window) work on tensors on any device, so they are tested without Ray
and benchmarked on a GPU machine without Ray. The Ray wrapper is :mod:`hello_ray.stages.transfer`.
See its docstring for the choices made where METHOD.md is open.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hello_ray.failures import check_finite
from hello_ray.runtime import auto_bf16


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
                  optimizer: torch.optim.Optimizer, ce_weight: float, *, epoch: int | None = None,
                  step: int = 0) -> dict[str, float]:
    """One optimisation step of the LoRA on a batch: images [N, 3, H, W] in [0, 1], labels [N].

    The teachers run in eval mode under inference_mode (they only make targets); the projector
    runs in eval mode too (frozen BN statistics, see the module docstring) with gradients on.
    Returns the loss parts of the batch as floats; a non-finite loss raises
    :class:`hello_ray.failures.NonFiniteLoss` naming ``epoch`` and ``step``.
    """
    targets = teacher_targets(teachers, images)  # [T, N, C]
    projector.eval()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=auto_bf16(images.device)):
        logits = projector(images)  # [N, C]
    loss, parts = transfer_loss(logits.float(), targets, labels, ce_weight)
    loss.backward()
    optimizer.step()
    check_finite(parts["loss"], "transfer", epoch, step, f"transfer.lr={optimizer.defaults['lr']:g}")
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


def shipped_fidelity(projector: nn.Module, teachers: nn.Module,
                      val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], dtype: str,
                      device: torch.device,
                      reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[dict[str, float], Path]:
    """Save the adapter as shipped (``dtype``), load it back merged, and measure its fidelity
    (``reduce`` sums the counts over ranks when the val set is split). Returns (fidelity, the local adapter folder)."""
    from hello_ray.models.adapter import save_adapter
    from hello_ray.models.projector import load_adapter

    out = Path(tempfile.mkdtemp(prefix="hello_ray_adapter_"))
    save_adapter(projector, out, dtype=dtype)
    shipped = load_adapter(out, merge=True).to(device)
    return label_fidelity(shipped, teachers, val_batches(), reduce), out
