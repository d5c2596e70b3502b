"""The label strategies' interface and the online labellers: hard labels, the teacher, the projector;
``prepare_labeller``, precision."""
from __future__ import annotations

import io
import logging
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hello_ray.data.errors import DataError
from hello_ray.runtime import auto_bf16, native_bf16

LABELS_DIR = "labels"
log = logging.getLogger("hello_ray.labels")


class ClassCountMismatch(DataError):
    """An input (image set, teachers, adapter) was built for another number of classes."""


class LabelError(RuntimeError):
    """Stored labels are missing, unfinished or unreadable (names the artifact and file)."""


# ------------------------------------------------------------------------------ context

@dataclass
class LabelContext:
    """What a strategy may know about the batch besides its pixels."""
    y_a: torch.Tensor              # [N] true class of each view's own image
    y_b: torch.Tensor              # [N] true class of its CutMix partner
    lam: float                     # CutMix weight of y_a
    num_classes: int
    stored_logits: torch.Tensor | None = None   # [N, C] fp16, replayed views only ([N, k]: top-k)
    stored_classes: torch.Tensor | None = None  # [N, k] class ids of the top-k stored logits
    temperature: float = 1.0       # the labels' temperature this epoch (top-k replay's softmax)


class LabelStrategy(ABC):
    """Labels augmented student batches online and reports the bytes it ships."""

    name: str = ""
    #: False: ``label`` returns target *probabilities* (hard labels) and the student loss is CE;
    #: True: it returns logits for the MSE/KL distillation loss.
    soft: bool = True
    #: True when the student loop must take its views from ``epoch_views`` (stored labels).
    replays: bool = False
    #: True: ``label`` returns target probabilities already at the labels' temperature (LPQLD's
    #: top-k replay), which the KL losses take as they are instead of a softmax of logits.
    distribution: bool = False

    @abstractmethod
    def label(self, images: torch.Tensor, context: LabelContext) -> torch.Tensor:
        """images [N, 3, H, W] in [0, 1] -> [N, C] float32 logits (or probabilities, see ``soft``)."""

    @abstractmethod
    def shipped_bytes(self) -> int:
        """The exact bytes that must be shipped with the images for this strategy."""

    def to(self, device: torch.device) -> "LabelStrategy":
        return self


def _serialized_size(module: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


LABEL_PRECISIONS = ("auto", "fp32", "bf16")


def prepare_labeller(model: nn.Module, device: torch.device, image_size: int = 32) -> nn.Module:
    """Frozen, eval mode, on ``device``, and made cheaper to run without changing its logits:

    - CLIP-ResNet's attention pool computes only the token it returns (``models/attnpool.py``);
    - every BatchNorm that follows a convolution is folded into it (``models/fold.py``; checked
      on a probe batch of ``image_size`` images, left unfolded if the check fails);
    - channels-last weights and inputs, the layout oneDNN (CPU) and cuDNN (GPU) convolve fastest.

    Teachers and projectors get the same treatment, so their step-time ratio compares networks,
    not preparations. Returns the prepared model (a new module when BN was folded).
    """
    from hello_ray.models.attnpool import use_query_token_pool
    from hello_ray.models.fold import fold_batchnorm

    model = model.eval().requires_grad_(False).to(device)
    use_query_token_pool(model)
    g = torch.Generator().manual_seed(0)
    probe = torch.rand(2, 3, image_size, image_size, generator=g).to(device)
    model, _ = fold_batchnorm(model, probe)
    return model.to(memory_format=torch.channels_last)


_warned_emulated: set[str] = set()


def _warn_emulated_bf16(device: torch.device) -> None:
    """Once per device type and process: bf16 labelling was asked for where it is emulated."""
    if device.type not in _warned_emulated:
        _warned_emulated.add(device.type)
        log.warning("label precision bf16 on %s: this %s has no native bf16 (see runtime.native_bf16), so "
                    "labelling runs emulated and slower than fp32; evaluate.label_precision=auto picks fp32 "
                    "here", device, "GPU" if device.type == "cuda" else "CPU")


class _OnlineModel(LabelStrategy):
    """A frozen network labelling each batch with one forward."""

    def __init__(self, model: nn.Module, num_classes: int, where: str):
        self.model = model.eval().requires_grad_(False)   # probing must not touch BN statistics
        self.device = torch.device("cpu")
        self.precision = "auto"
        self._auto_bf16 = False                            # decided per device in ``to``
        out = self._probe_classes()
        if out != num_classes:
            raise ClassCountMismatch(
                f"{where}: the labeller predicts {out} classes but the dataset has {num_classes}; "
                "evaluate with the teachers/adapter trained on the same dataset")

    def _probe_classes(self) -> int:
        size = getattr(self, "image_size", 32)
        with torch.inference_mode():
            return int(self._forward(torch.zeros(2, 3, size, size)).shape[-1])

    def to(self, device: torch.device) -> "LabelStrategy":
        self.model = prepare_labeller(self.model, device, getattr(self, "image_size", 32))
        self.device = device
        self._auto_bf16 = auto_bf16(device)
        return self

    def with_precision(self, precision: str) -> "LabelStrategy":
        """``auto``: bf16 autocast on GPUs that compute bf16 natively (Ampere on), fp32 on CPU and
        older GPUs; ``bf16``: bf16 autocast everywhere; ``fp32``: never. Logits come back as float32.

        bf16 only pays where the hardware has it: on a CPU with bf16 units the RN50 projector's
        step fell from 1.60x to 1.15x a teacher-labelled step, on an AVX2-only CPU it rose to 2.7x
        (emulated). Asking for bf16 on such a device logs a warning once.
        """
        if precision not in LABEL_PRECISIONS:
            raise ValueError(f"label precision {precision!r}: must be one of {LABEL_PRECISIONS}")
        self.precision = precision
        if precision == "bf16" and not native_bf16(self.device):
            _warn_emulated_bf16(self.device)
        return self

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def label(self, images: torch.Tensor, context: LabelContext) -> torch.Tensor:
        return self.logits(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] in [0, 1] -> float32 logits [N, C], no autograd state kept."""
        bf16 = self.precision == "bf16" or (self.precision == "auto" and self._auto_bf16)
        amp = torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        with torch.inference_mode(), amp:
            images = images.contiguous(memory_format=torch.channels_last)
            out = self._forward(images).float()
        # A clone made outside inference mode is a normal tensor the loss may use as a target.
        return out.clone()


# ------------------------------------------------------------------------------- hard

class HardLabels(LabelStrategy):
    """Class ids only (classic distillation). ``label`` gives the CutMix-mixed one-hot target."""

    name = "hard"
    soft = False

    def __init__(self, labels: np.ndarray, num_classes: int, nbytes: int):
        self.labels = labels
        self.num_classes = num_classes
        self._bytes = nbytes

    @classmethod
    def write(cls, labels: np.ndarray, num_classes: int, store, key: str, name: str = "hard",
              write: bool = True) -> "HardLabels":
        """Write the class ids (smallest unsigned dtype that holds them, .npy) to ``labels/<name>/``.

        ``write=False`` (other DDP ranks) builds the same bytes without writing them again.
        """
        dtype = np.uint8 if num_classes <= 256 else np.uint16 if num_classes <= 65536 else np.uint32
        buf = io.BytesIO()
        np.save(buf, np.asarray(labels).astype(dtype))
        data = buf.getvalue()
        if write:
            store.put_bytes(key, f"{LABELS_DIR}/{name}/labels.npy", data)
        return cls(np.asarray(labels), num_classes, len(data))

    def label(self, images: torch.Tensor, context: LabelContext) -> torch.Tensor:
        c = context.num_classes
        a = F.one_hot(context.y_a, c).float()
        b = F.one_hot(context.y_b, c).float()
        return context.lam * a + (1.0 - context.lam) * b          # [N, C] probabilities

    def shipped_bytes(self) -> int:
        return self._bytes


# ---------------------------------------------------------------------------- teacher

class TeacherLabels(_OnlineModel):
    """The observer, or the mean logits of a teacher window, labelling every batch online.

    ``model`` returns [N, C] (one teacher) or [T, N, C] (a ``TeacherEnsemble``; averaged).
    """

    name = "teacher"

    def __init__(self, model: nn.Module, num_classes: int, image_size: int, where: str = "teachers"):
        self.image_size = image_size
        super().__init__(model, num_classes, where)
        self._bytes = _serialized_size(model)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.mean(0) if out.dim() == 3 else out              # [N, C]

    def shipped_bytes(self) -> int:
        return self._bytes


# -------------------------------------------------------------------------- projector

class ProjectorLabels(_OnlineModel):
    """HeLlO: CLIP + the transfer artifact's LoRA, merged into the base weights for inference.

    Shipped: the adapter files only (the CLIP base is public, the head is recomputed from
    the class names), counted as the bytes of those files.
    """

    name = "projector"

    def __init__(self, projector: nn.Module, num_classes: int, image_size: int, adapter_bytes: int,
                 where: str = "transfer"):
        self.image_size = image_size
        super().__init__(projector, num_classes, where)
        self._bytes = adapter_bytes

    @classmethod
    def from_store(cls, store, key: str, num_classes: int, image_size: int, dtype: str = "",
                   out: tuple[Any, str] | None = None) -> "ProjectorLabels":
        """The projector of transfer artifact ``key``. ``dtype`` (fp32 | fp16 | int8; '' = as stored):
        the adapter re-encoded in that precision (``models.adapter.save_adapter``) and loaded from
        those bytes, so the labels are the ones that precision gives and the bytes are its files';
        ``out`` (store, key) keeps those files under ``labels/projector-<dtype>/`` of that artifact."""
        import tempfile
        from pathlib import Path

        from hello_ray.models.adapter import save_adapter
        from hello_ray.models.projector import load_adapter

        files = [f for f in store.list_files(key) if f.startswith("adapter")]
        if not files:
            raise LabelError(f"transfer artifact {key}: no adapter files (adapter.*) to load")
        if not dtype:
            nbytes = sum(len(store.get_bytes(key, f)) for f in files)
            projector = load_adapter(store.download(key), merge=True)
            return cls(projector, num_classes, image_size, nbytes, where=f"transfer artifact {key}")
        with tempfile.TemporaryDirectory() as d:
            save_adapter(load_adapter(store.download(key), merge=False), d, dtype=dtype)
            written = {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}
            if out is not None:
                for name, data in written.items():
                    out[0].put_bytes(out[1], f"{LABELS_DIR}/projector-{dtype}/{name}", data)
            projector = load_adapter(d, merge=True)
        nbytes = sum(len(v) for v in written.values())
        self = cls(projector, num_classes, image_size, nbytes, where=f"transfer artifact {key} as {dtype}")
        self.name = f"projector@{dtype}"
        return self

    def shipped_bytes(self) -> int:
        return self._bytes
