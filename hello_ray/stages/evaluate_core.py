"""Plain-PyTorch student training and validation (METHOD.md stage 5), used by the evaluate stage.

One call of ``train_student`` trains one student from scratch on a distilled image set with one
label strategy: RandomResizedCrop + flip + CutMix views, labelled by the strategy on every batch,
loss MSE(student, label logits) + ce_weight x CutMix-mixed CE (or KL with temperature), AdamW with a
cosine schedule over all steps. It runs alone (world 1) or as one DDP rank: every rank draws the
same global batch from the same seeded generator and trains on its own slice, so a run gives the
same views whatever the number of workers, and stored labels replay identically under DDP.

The step keeps the device busy: the distilled set is copied to the device once per row and every
view is built there (``views.View.materialise``: one batched crop-and-resize of this rank's rows
only); the random draws stay on a CPU generator. Nothing in the step waits for the device: step
times come from CUDA events (read once at the end), and the losses collect in a device buffer read
every ``loss_check_every`` steps and at each epoch's end (a non-finite one still names its step).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hello_ray.failures import LossLog
from hello_ray.labels import LabelContext, LabelStrategy
from hello_ray.views import View, draw_epoch, plain_epoch


@dataclass
class TrainSettings:
    """The student schedule (from ``cfg.evaluate``; ``lr`` already looked up for the student)."""
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    cutmix_alpha: float
    loss: str                     # mse_ce | kl | kl_plain
    ce_weight: float
    temperature: float
    image_size: int
    schedule: str = "cosine_step"  # cosine_step | cosine_epoch | half_cosine_epoch
    decay: str = "all"             # all | weights (no decay on biases and norms)
    report: str = "final"          # final | rded_best | fkd_best: the epochs scored on the val set
    precision: str = "fp32"        # fp32 | bf16 (autocast of the student's forward and loss)
    loss_check_every: int = 50     # steps between reads of the losses (one host sync each)
    temperature_schedule: str = "constant"   # constant | lpqld (the labels' temperature per epoch)
    student_temperature: float = 0.0         # 0: the labels' temperature of the epoch
    phases: tuple[tuple[str, int], ...] = ()  # HALD's (kind, epochs), scaled to ``epochs``; () = none
    label_smoothing: float = 0.8             # the hard phases' (HALD)
    augment: bool = True                     # False: whole images, no flip, no CutMix (+noaug)

    def label_temperature(self, epoch: int) -> float:
        """The labels' temperature in (0-based) ``epoch``."""
        if self.temperature_schedule == "lpqld":
            from hello_ray.config.evaluate import lpqld_temperature
            return lpqld_temperature(epoch, t0=self.temperature)
        return self.temperature

    def student_temp(self, epoch: int) -> float:
        return self.student_temperature or self.label_temperature(epoch)


def phase_bounds(phases: Iterable[tuple[str, int]], epochs: int) -> list[tuple[str, int, int]]:
    """HALD's phases scaled to ``epochs``: [(kind, first epoch, end epoch)), 0-based, ends exclusive.

    HALD (Jiacheng8/HALD @ ffbca04, validate/train_fkd.py l. 142-211, 458-477) runs its segments back
    to back with one epoch counter (75/150/75: epochs 0-74 soft, 75-224 hard, 225-299 soft) and takes
    the lengths as absolute epochs. Here a run of another length keeps their proportions: boundary i
    is floor(E x (cumulative length i) / total + 0.5), so the lengths are exact when E is their sum;
    a phase left with no epoch is dropped.
    """
    phases = list(phases)
    total = sum(n for _, n in phases)
    out, start, cum = [], 0, 0
    for kind, n in phases:
        cum += n
        end = math.floor(epochs * cum / total + 0.5)
        if end > start:
            out.append((kind, start, end))
        start = max(start, end)
    return out


def smoothed_mixed_target(y_a: torch.Tensor, y_b: torch.Tensor, lam: float, num_classes: int, eps: float
                          ) -> torch.Tensor:
    """HALD's hard-phase target (Jiacheng8/HALD @ ffbca04, ``validate/train_fkd.py`` l. 449-454: timm's
    ``Mixup`` with cutmix_alpha 1 and label_smoothing eps, i.e. timm's ``mixup_target``): each
    label smoothed to eps/C on every class plus 1 - eps on its own, then mixed lam : 1 - lam by
    CutMix. y_a, y_b [N] -> [N, C] probabilities."""
    off = eps / num_classes
    a = F.one_hot(y_a, num_classes).float() * (1.0 - eps) + off
    b = F.one_hot(y_b, num_classes).float() * (1.0 - eps) + off
    return lam * a + (1.0 - lam) * b


def student_loss(out: torch.Tensor, target: torch.Tensor, ctx: LabelContext, soft: bool,
                 s: TrainSettings, distribution: bool = False, epoch: int = 0) -> torch.Tensor:
    """out [N, C] student logits; target [N, C] label logits (soft), probabilities at the labels'
    temperature (``distribution``: top-k replay) or a mixed (smoothed) one-hot (hard).

    Hard labels: CE against the mixed one-hot = lam*CE(y_a) + (1-lam)*CE(y_b) (classic CutMix).
    mse_ce: MSE(out, logits) + ce_weight x that mixed CE (METHOD.md). kl: T^2 KL(p_T(label) || p_Ts(out)),
    batch mean (Hinton's scaling). kl_plain: the same without T^2, as RDED's validation/main.py and
    SRe2L/LPLD's train_FKD.py compute it (KLDivLoss(batchmean) of log_softmax(out/Ts) vs softmax(label/T)).
    T is the labels' temperature of ``epoch`` (``temperature_schedule``), Ts the student's
    (``student_temperature``, else T); a distribution target is taken as it is (LPQLD).
    """
    if not soft:
        return -(target * F.log_softmax(out, 1)).sum(1).mean()
    if s.loss in ("kl", "kl_plain"):
        t, ts = s.label_temperature(epoch), s.student_temp(epoch)
        if distribution:                                     # zeros outside the top-k: 0 log 0 = 0
            kl = F.kl_div(F.log_softmax(out / ts, 1), target, reduction="batchmean")
        else:
            kl = F.kl_div(F.log_softmax(out / ts, 1), F.log_softmax(target / t, 1), reduction="batchmean",
                          log_target=True)
        return kl * t * t if s.loss == "kl" else kl
    if distribution:
        raise ValueError("the mse_ce loss regresses logits; probability labels (top-k) need a kl loss")
    mixed_ce = ctx.lam * F.cross_entropy(out, ctx.y_a) + (1 - ctx.lam) * F.cross_entropy(out, ctx.y_b)
    return F.mse_loss(out, target) + s.ce_weight * mixed_ce


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr x 0.5 (1 + cos(pi t / T)) over all steps of the run."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / max(1, total_steps))))


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The per-epoch factor of the epoch schedules (epoch 0-based, the rate *during* that epoch):
    cosine_epoch 0.5 (1 + cos(pi e / E)) (FKD); half_cosine_epoch 0.5 (1 + cos(pi e / E / 2)) (RDED,
    whose last epoch runs near half the rate)."""
    if schedule == "cosine_epoch":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "half_cosine_epoch":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs / 2))
    raise ValueError(f"lr_factor: {schedule!r} is not an epoch schedule")


def param_groups(model: nn.Module, weight_decay: float, decay: str) -> list[dict]:
    """AdamW parameter groups: ``all`` decays everything; ``weights`` only tensors of 2+ dims (no
    decay on biases and norm parameters, RDED's and FKD's rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay == "all":
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def scored_epochs(report: str, epochs: int) -> list[int]:
    """0-based epochs whose student is scored on the validation set.

    final: the last. rded_best (RDED validation/main.py): e % 10 == 9 or the last, only e > 0.8 E.
    fkd_best (SRe2L/LPLD train_FKD.py): e % 10 == 0 or the last.
    """
    last = epochs - 1
    if report == "final":
        return [last]
    if report == "rded_best":
        return [e for e in range(epochs) if (e % 10 == 9 or e == last) and e > 0.8 * epochs] or [last]
    if report == "fkd_best":
        return [e for e in range(epochs) if e % 10 == 0 or e == last]
    raise ValueError(f"evaluate.report: unknown {report!r}")


class StepTimer:
    """Per-step wall times without waiting for the device in the step: CUDA events recorded around
    each step and read once at the end; on the CPU (synchronous) the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events: list[tuple[Any, Any]] = []
        self._host: list[float] = []
        self._t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            self._events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self._events[-1][0].record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._events[-1][1].record()
        else:
            self._host.append(time.perf_counter() - self._t0)

    def seconds(self) -> list[float]:
        if self.cuda:
            if self._events:
                self._events[-1][1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self._events]
        return list(self._host)


def train_student(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, strategy: LabelStrategy,
                  s: TrainSettings, seed: int, device: torch.device, classes: torch.Tensor | None = None,
                  rank: int = 0, world_size: int = 1,
                  log: Callable[[str], None] | None = None,
                  score: Callable[[], float] | None = None, row: str = "",
                  on_view: Callable[[int, View], None] | None = None) -> dict[str, Any]:
    """Train ``model`` (already on ``device``, possibly DDP-wrapped) on the distilled set.

    images uint8 [M, 3, H, W] (copied to ``device`` once); labels int64 [M]. ``classes`` (continual
    learning) restricts the loss to the seen classes (GDumb masking). ``score`` (val top-1 of the
    model now) is called after each epoch of :func:`scored_epochs`. ``on_view(epoch, view)`` sees every
    global batch's view (audits, tests). Returns {steps, step_s (mean), final_loss, scores: {epoch
    (1-based): top-1}}. A non-finite loss raises :class:`hello_ray.failures.NonFiniteLoss` naming the
    epoch, the step (1-based, counted over the run) and ``row``.
    """
    where = f"row {row}, " if row else ""
    num_classes = output_classes(model, images, s)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True                # one fixed shape per row: autotune once
    images, labels = images.to(device), labels.to(device)      # uint8 [M, 3, H, W], int64 [M]
    n_images, height, width = len(images), images.shape[-2], images.shape[-1]
    g = torch.Generator().manual_seed(seed)                   # identical on every rank; CPU draws only
    steps_per_epoch = math.ceil(n_images / s.batch_size)
    total = s.epochs * steps_per_epoch
    opt = torch.optim.AdamW(param_groups(model, s.weight_decay, s.decay), lr=s.lr)
    per_step = s.schedule == "cosine_step"
    sched = (cosine_schedule(opt, total) if per_step else
             torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(s.schedule, e, s.epochs)))
    to_score = set(scored_epochs(s.report, s.epochs)) if score is not None else set()
    scores: dict[int, float] = {}
    cols = classes.to(device) if classes is not None else None
    remap = None
    if classes is not None:                                   # class id -> column among the seen ones
        remap = torch.full((num_classes,), -1, dtype=torch.long, device=device)
        remap[cols] = torch.arange(len(cols), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")
    timer = StepTimer(device)
    losses = LossLog(device, s.loss_check_every, "evaluate", f"{where}lr={s.lr:g}")
    model.train()
    bounds = phase_bounds(s.phases, s.epochs) if s.phases else []
    soft_epochs = 0                                           # soft epochs so far: what a replay walks
    for epoch in range(s.epochs):
        hard_phase = any(k == "hard" and a <= epoch < b for k, a, b in bounds)
        if hard_phase:                                        # HALD: fresh views, smoothed hard labels
            views = draw_epoch(n_images, height, width, s.batch_size, s.image_size, s.cutmix_alpha, g)
        elif strategy.replays:
            views = strategy.epoch_views(soft_epochs, seed)
        elif not s.augment:
            views = plain_epoch(n_images, height, width, s.batch_size, g)
        else:
            views = draw_epoch(n_images, height, width, s.batch_size, s.image_size, s.cutmix_alpha, g)
        t_label = s.label_temperature(epoch)
        for view in views:
            if on_view is not None:
                on_view(epoch, view)
            timer.start()
            # This rank's slice of the global batch (same slicing on every rank); only its pixels are built.
            part = torch.tensor_split(torch.arange(len(view.index)), world_size)[rank]   # [n]
            xb = view.materialise(images, s.image_size, None if world_size == 1 else part)
            xb = xb.contiguous(memory_format=torch.channels_last)                        # [n, 3, S, S]
            index = _to(view.index, device)
            y_a = labels[index[_to(part, device)]]
            y_b = labels[index[_to(view.perm[part], device)]]
            ctx = LabelContext(y_a=y_a, y_b=y_b, lam=view.lam, num_classes=num_classes,
                               stored_logits=None if view.logits is None else _to(view.logits[part], device),
                               stored_classes=None if view.classes is None else _to(view.classes[part], device),
                               temperature=t_label)
            if hard_phase:
                target = smoothed_mixed_target(y_a, y_b, view.lam, num_classes, s.label_smoothing)   # [n, C]
            else:
                target = strategy.label(xb, ctx)              # [n, C]
            with amp:
                out = model(xb)                               # [n, C]
                if cols is not None:
                    out, target = out[:, cols], target[:, cols]
                    ctx.y_a, ctx.y_b = remap[ctx.y_a], remap[ctx.y_b]
                loss = student_loss(out.float(), target, ctx, strategy.soft and not hard_phase, s,
                                    distribution=strategy.distribution, epoch=epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if per_step:
                sched.step()
            timer.stop()
            losses.add(loss, epoch + 1)
        losses.read(epoch + 1)
        soft_epochs += not hard_phase
        lr_now = sched.get_last_lr()[0]
        if not per_step:
            sched.step()                                      # per epoch, after it, as RDED and FKD do
        if epoch in to_score:
            assert score is not None
            scores[epoch + 1] = score()
            model.train()
        if log is not None and rank == 0:
            top = f" val top1 {scores[epoch + 1]:.4f}" if epoch + 1 in scores else ""
            log(f"epoch {epoch + 1}/{s.epochs} loss {losses.last:.4f} lr {lr_now:.2e}{top}")
    # The first steps pay one-off costs (allocations, DDP buckets, cuDNN autotuning); time the steady state.
    step_times = timer.seconds()
    steady = step_times[1:] if len(step_times) > 2 else step_times
    return {"steps": len(step_times), "step_s": float(np.mean(steady)), "final_loss": losses.last,
            "scores": scores}


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (ids, stored fp16 logits) to the device without waiting: pinned first on
    a GPU (a copy from pageable memory would synchronise), as is on the CPU."""
    if device.type != "cuda":
        return x
    return x.pin_memory().to(device, non_blocking=True)


def output_classes(model: nn.Module, images: torch.Tensor, s: TrainSettings) -> int:
    """The student's output width (its class count)."""
    inner = getattr(model, "module", model)
    head = [m for m in inner.modules() if isinstance(m, nn.Linear)]
    if head:
        return int(head[-1].out_features)
    was = inner.training
    inner.eval()
    with torch.no_grad():
        n = int(inner(torch.zeros(1, 3, s.image_size, s.image_size,
                                  device=next(inner.parameters()).device)).shape[-1])
    inner.train(was)
    return n


@torch.no_grad()
def top1_counts(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                classes: torch.Tensor | None = None) -> tuple[int, int]:
    """(correct, total) of argmax predictions on real validation batches.

    Each batch: images uint8 [N, H, W, 3] (decoded rows) or [N, 3, H, W], labels [N]. With
    ``classes`` only images of those classes count and the argmax runs over those classes only.
    """
    model.eval()
    correct = total = 0
    cols = classes.to(device) if classes is not None else None
    for x, y in batches:
        # Ray hands out read-only numpy batches: copy those rather than alias them
        x = torch.as_tensor(np.require(x, requirements='W') if isinstance(x, np.ndarray) else x)
        y = torch.as_tensor(np.require(y, requirements='W') if isinstance(y, np.ndarray) else y).long()
        if x.dim() == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)                         # NHWC -> NCHW
        x = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).to(device)
        y = y.to(device)
        if cols is not None:
            keep = torch.isin(y, cols)
            x, y = x[keep], y[keep]
            if len(y) == 0:
                continue
            pred = cols[model(x)[:, cols].argmax(1)]
        else:
            pred = model(x).argmax(1)
        correct += int((pred == y).sum())
        total += len(y)
    model.train()
    return correct, total


def nhwc_to_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> uint8 [N, 3, H, W] (contiguous)."""
    return torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).contiguous()
