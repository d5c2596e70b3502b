"""What recover matches: the observer's BatchNorm inputs (forward hooks) and their moments, per class
(LPLD's class-wise statistics, accumulated over the training split) or the running ones (SRe2L).
The objective and the optimisation that use them are ``recover_core.py``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn


class RecoverError(ValueError):
    """Recover cannot run on this observer or these statistics, or its objective diverged."""


# ---------------------------------------------------------------------------- BatchNorm inputs

def bn_layers(model: nn.Module, where: str = "observer") -> list[tuple[str, nn.BatchNorm2d]]:
    """The model's BatchNorm2d layers in ``modules()`` order (the first gets first_bn_multiplier)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not layers:
        raise RecoverError(f"{where} ({type(model).__name__}{' ' + model.name if hasattr(model, 'name') else ''}) "
                           "has no BatchNorm2d layer: recover matches BatchNorm statistics, so it needs an "
                           "observer with BatchNorm (e.g. teachers.model=resnet18), or use images.source=rded")
    return layers


class BNInputs:
    """Forward hooks that keep the input of every BatchNorm2d of ``model`` during a ``with`` block.

    ``inputs[l]`` is layer l's input [N, F_l, H_l, W_l] of the last forward (with its graph unless
    ``detach``), in ``bn_layers`` order.
    """

    def __init__(self, model: nn.Module, detach: bool = False, where: str = "observer"):
        self.layers = bn_layers(model, where)
        self.detach = detach
        self.inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "BNInputs":
        for i, (_, m) in enumerate(self.layers):
            self._handles.append(m.register_forward_hook(self._keep(i)))
        return self

    def _keep(self, i: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            self.inputs[i] = x.detach() if self.detach else x
        return hook

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def captured(self) -> list[torch.Tensor]:
        missing = [self.layers[i][0] for i, x in enumerate(self.inputs) if x is None]
        if missing:
            raise RecoverError(f"BatchNorm layers {missing[:3]} were not run by the forward pass: "
                               "recover needs every BatchNorm2d of the observer on the forward path")
        return [x for x in self.inputs if x is not None]


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over (N, H, W) of x [N, F, H, W]: two [F] tensors (what BatchNorm
    computes in training mode, and what both references' hooks compare)."""
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)


# ---------------------------------------------------------------------------- per-class statistics

@dataclass
class ClassStats:
    """Per class and BN layer: count (values per channel), sum and sum of squares, float64.

    ``count[l]`` [C], ``sums[l]`` / ``sumsq[l]`` [C, F_l]. Adding batches or merging partial
    statistics in any order gives the same sums (up to float64 rounding): mean = sum / n,
    var = sumsq / n - mean^2 (biased, over every image and pixel of the class).
    """
    layer_names: list[str]
    count: list[torch.Tensor]   # [C] float64 per layer
    sums: list[torch.Tensor]    # [C, F_l] float64 per layer
    sumsq: list[torch.Tensor]   # [C, F_l] float64 per layer

    @classmethod
    def empty(cls, num_classes: int, layers: Sequence[tuple[str, nn.BatchNorm2d]]) -> "ClassStats":
        names = [n for n, _ in layers]
        ch = [m.num_features for _, m in layers]
        z = torch.float64
        return cls(names, [torch.zeros(num_classes, dtype=z) for _ in ch],
                   [torch.zeros(num_classes, f, dtype=z) for f in ch],
                   [torch.zeros(num_classes, f, dtype=z) for f in ch])

    @property
    def num_classes(self) -> int:
        return int(self.count[0].shape[0])

    @property
    def channels(self) -> list[int]:
        return [int(s.shape[1]) for s in self.sums]

    def add(self, inputs: Sequence[torch.Tensor], labels: torch.Tensor) -> None:
        """Add one batch: ``inputs[l]`` [N, F_l, H, W] (layer l's BN input), ``labels`` int64 [N]."""
        labels = labels.to("cpu", torch.long)
        for l, x in enumerate(inputs):
            # Reduced over (H, W) where x lives (a GPU): only [N, F] per layer travels to the CPU.
            x = x.detach().double()
            hw = x.shape[2] * x.shape[3]
            self.sums[l].index_add_(0, labels, x.sum((2, 3)).cpu())               # [N, F] per image
            self.sumsq[l].index_add_(0, labels, x.square().sum((2, 3)).cpu())
            self.count[l].index_add_(0, labels, torch.full((len(labels),), float(hw), dtype=torch.float64))

    def merge(self, other: "ClassStats") -> "ClassStats":
        """Add ``other``'s counts and sums into these (same classes and layers)."""
        if other.layer_names != self.layer_names or other.num_classes != self.num_classes:
            raise ValueError("ClassStats.merge: statistics of different observers or class counts")
        for l in range(len(self.sums)):
            self.count[l] += other.count[l]
            self.sums[l] += other.sums[l]
            self.sumsq[l] += other.sumsq[l]
        return self

    def rows(self) -> dict[str, np.ndarray]:
        """The classes present as rows (a Ray Data batch): label [K], count [K, L], sum / sumsq
        [K, sum F_l] (layers concatenated)."""
        present = torch.nonzero(self.count[0] > 0).flatten()
        return {"label": present.numpy().astype(np.int64),
                "count": torch.stack([c[present] for c in self.count], 1).numpy(),
                "sum": torch.cat([s[present] for s in self.sums], 1).numpy(),
                "sumsq": torch.cat([s[present] for s in self.sumsq], 1).numpy()}

    def add_rows(self, rows: dict[str, np.ndarray]) -> None:
        """Add partial statistics given as :meth:`rows` (from any process, in any order)."""
        labels = torch.from_numpy(np.array(rows["label"], dtype=np.int64))   # a copy: Ray rows are read-only
        count = torch.as_tensor(np.asarray(rows["count"], dtype=np.float64))        # [K, L]
        sums = torch.as_tensor(np.asarray(rows["sum"], dtype=np.float64))           # [K, F]
        sumsq = torch.as_tensor(np.asarray(rows["sumsq"], dtype=np.float64))
        offsets = np.cumsum([0, *self.channels])
        for l in range(len(self.sums)):
            a, b = int(offsets[l]), int(offsets[l + 1])
            self.count[l].index_add_(0, labels, count[:, l])
            self.sums[l].index_add_(0, labels, sums[:, a:b])
            self.sumsq[l].index_add_(0, labels, sumsq[:, a:b])

    def images_per_class(self) -> torch.Tensor:
        """Values per channel of the first layer per class [C] (images x H x W; 0 = class unseen)."""
        return self.count[0]

    def moments(self, label: int, class_name: str = "") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mean [F_l], biased var [F_l]) float32 per layer for class ``label``."""
        if not 0 <= label < self.num_classes:
            raise RecoverError(f"class index {label} outside the statistics' {self.num_classes} classes")
        if float(self.count[0][label]) <= 0:
            name = f" {class_name!r}" if class_name else ""
            raise RecoverError(f"class{name} (index {label}) has no training images: its BatchNorm "
                               "statistics, which class-wise recover (lpld) matches, are undefined")
        out = []
        for l in range(len(self.sums)):
            n = self.count[l][label]
            mean = self.sums[l][label] / n
            var = (self.sumsq[l][label] / n - mean.square()).clamp_(min=0.0)
            out.append((mean.float(), var.float()))
        return out

    def state(self) -> dict[str, torch.Tensor | list[str]]:
        """A ``torch.save``-able dict (float64 tensors and layer names)."""
        return {"layer_names": list(self.layer_names), "count": torch.stack(self.count),
                "sums": list(self.sums), "sumsq": list(self.sumsq)}

    @classmethod
    def from_state(cls, state: dict) -> "ClassStats":
        return cls(list(state["layer_names"]), list(state["count"].unbind(0)), list(state["sums"]),
                   list(state["sumsq"]))


def observe_batch(observer: nn.Module, x: torch.Tensor, labels: torch.Tensor, stats: ClassStats) -> None:
    """One forward pass of ``x`` [N, 3, H, W] in [0, 1] (the observer's input) in eval mode; the
    BN inputs go into ``stats`` by ``labels``."""
    with torch.inference_mode(), BNInputs(observer, detach=True) as hooks:
        observer(x)
        stats.add(hooks.captured(), labels)


def class_stats(observer: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                batch_size: int = 256, device: torch.device | str = "cpu") -> ClassStats:
    """Per-class BN statistics of ``images`` uint8 [N, H, W, 3] with ``labels`` [N], in memory."""
    from hello_ray.data.augment import to_float

    stats = ClassStats.empty(num_classes, bn_layers(observer))
    for s in range(0, len(images), batch_size):
        x = to_float(torch.as_tensor(images[s:s + batch_size])).to(device)
        observe_batch(observer, x, torch.as_tensor(labels[s:s + batch_size]), stats)
    return stats


def running_moments(observer: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(running_mean, running_var) of every BN layer: SRe2L's targets (the global statistics)."""
    return [(m.running_mean.detach().float(), m.running_var.detach().float()) for _, m in bn_layers(observer)]
