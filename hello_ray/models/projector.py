"""The HeLlO projector: CLIP image encoder E + a text-initialised, bias-free linear head W.

``logits = logit_scale.exp() * normalise(E(x)) @ W.T``, with row c of W the L2-normalised
mean of the L2-normalised text embeddings of class c's name under the templates. With that
W the projector *is* CLIP zero-shot classification (tests/test_projector.py proves it
against open_clip's own zero-shot classifier), so W costs no storage: the adapter artifact
keeps only the LoRA tensors and recomputes W from the class names.

Input convention (ARCHITECTURE.md): float images in [0, 1], NCHW, any size; the projector
resizes to the encoder's input size (bilinear) and applies CLIP's normalisation itself.

The base model is frozen, and its BatchNorm layers stay in eval mode even under
``projector.train()``: knowledge transfer fits the LoRA tensors to the *pretrained*
encoder, whose running statistics must not drift with the distillation batches.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hello_ray.models import lora as lora_mod
# One way only: the adapter format knows nothing of the Projector class; the projector saves and
# rebuilds itself through it.
from hello_ray.models.adapter import read_adapter, save_adapter
from hello_ray.models.clip import META, clip_embed_dim, clip_input_size, clip_normalisation, create_clip

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def default_head_rank(num_classes: int) -> int:
    """METHOD.md: head rank 64 for <= 100 classes, 128 beyond (ImageNet-1K)."""
    return 64 if num_classes <= 100 else 128


@torch.no_grad()
def text_head_weight(model: nn.Module, tokenizer: Any, class_names: Sequence[str],
                     templates: Sequence[str], classes_per_batch: int = 50) -> torch.Tensor:
    """[C, D]: row c = normalise(mean_t normalise(encode_text(template_t(class c))))."""
    rows = []
    for start in range(0, len(class_names), classes_per_batch):
        names = class_names[start:start + classes_per_batch]
        texts = [t.format(name) for name in names for t in templates]
        tokens = tokenizer(texts).to(model.logit_scale.device)
        emb = model.encode_text(tokens, normalize=True)  # [n*T, D]
        emb = emb.reshape(len(names), len(templates), -1).mean(dim=1)  # [n, D]
        rows.append(F.normalize(emb, dim=-1))
    return torch.cat(rows)


class Projector(nn.Module):
    """CLIP image encoder + text-initialised head; ``forward(images [N,3,H,W] in [0,1]) -> [N, C]``."""

    def __init__(self, encoder: nn.Module, head_weight: torch.Tensor, logit_scale: torch.Tensor,
                 input_size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 model_name: str, pretrained: str, class_names: Sequence[str],
                 templates: Sequence[str] = DEFAULT_TEMPLATES):
        super().__init__()
        if head_weight.shape[0] != len(class_names):
            raise ValueError(f"head has {head_weight.shape[0]} rows but {len(class_names)} class names")
        self.encoder = encoder
        num_classes, embed_dim = head_weight.shape
        self.head = nn.Linear(embed_dim, num_classes, bias=False, device=head_weight.device,
                              dtype=head_weight.dtype)
        with torch.no_grad():
            self.head.weight.copy_(head_weight)
        # Buffers: frozen, move with .to(); the log scale as CLIP stores it.
        self.register_buffer("logit_scale", logit_scale.detach().clone().reshape(()))
        self.register_buffer("mean", torch.tensor(mean, device=head_weight.device).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, device=head_weight.device).view(1, 3, 1, 1),
                             persistent=False)
        self.input_size = tuple(input_size)
        self.model_name = model_name
        self.pretrained = pretrained
        self.class_names = list(class_names)
        self.templates = list(templates)
        self.lora_config: dict[str, Any] | None = None  # set by add_lora
        for p in self.parameters():
            p.requires_grad_(False)
        self.train(False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_clip(cls, model_name: str, pretrained: str, class_names: Sequence[str],
                  templates: Sequence[str] = DEFAULT_TEMPLATES,
                  device: torch.device | str | None = None) -> "Projector":
        """The one projector factory: open_clip's ``model_name`` with ``pretrained`` weights (see
        ``create_clip``: a tag, a file, ``'random-init'`` for tests, benchmarks and the demo, or
        ``'meta'`` for layer shapes only), the text tower used once for the head and then dropped.
        ``device``: where to build and encode the prompts (1000 classes x 7 templates through
        RN50's text tower is worth a GPU); ignored for ``'meta'``, whose head is an empty
        [classes, embed_dim] tensor (shapes need no prompts)."""
        if not class_names:
            raise ValueError("Projector.from_clip: no class names")
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"Projector.from_clip: every template needs a '{{}}' for the class name: "
                             f"{list(templates)}")
        model, tokenizer = create_clip(model_name, pretrained)
        if pretrained == META:
            head = torch.empty(len(class_names), clip_embed_dim(model_name), device="meta")
        else:
            if device is not None:
                model = model.to(device)
            head = text_head_weight(model, tokenizer, list(class_names), list(templates))
        mean, std = clip_normalisation(model)
        return cls(model.visual, head, model.logit_scale, clip_input_size(model), mean, std,
                   model_name, pretrained, class_names, templates)

    @classmethod
    def from_adapter(cls, adapter_dir: str | Path, merge: bool = False, num_classes: int | None = None,
                     device: torch.device | str | None = None) -> "Projector":
        """Rebuild the projector of an adapter folder (hello_ray/models/adapter.py): ``from_clip``
        + ``add_lora`` + the stored tensors.

        ``num_classes``: the class count the caller's dataset has; a different count in the
        adapter is a ValueError naming both. ``merge=True`` folds the LoRA into the base weights
        (and drops the LoRA layers) for fast labelling. ``device``: where the projector is built.
        """
        meta, tensors, where = read_adapter(adapter_dir, num_classes)
        projector = cls.from_clip(meta["model"], meta["pretrained"], meta["class_names"], meta["templates"],
                                  device=device)
        projector.add_lora(meta["conv_rank"], meta["head_rank"], style=meta["style"],
                           alpha_ratio=meta["alpha_ratio"])
        projector.load_lora_state_dict(tensors, where=where)
        if merge:
            projector.merge_lora(unload=True)
        return projector.eval()

    # ------------------------------------------------------------------ compute
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[N,3,H,W] in [0,1] -> [N,3,h,w] at the encoder size, CLIP-normalised."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"projector expects images [N,3,H,W], got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=False)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def encode(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image features E(x): [N, D] (refine matches these between x and up(down(x)))."""
        feats = self.encoder(self._prepare(images))
        return F.normalize(feats, dim=-1) if normalize else feats

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [N,3,H,W] -> [N, C]
        return self.logit_scale.exp() * self.head(self.encode(images, normalize=True))

    def train(self, mode: bool = True) -> "Projector":
        super().train(mode)
        for m in self.encoder.modules():  # frozen base: BN keeps its (pretrained) running stats
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    # ------------------------------------------------------------------ LoRA
    def add_lora(self, conv_rank: int, head_rank: int, style: str = "separable",
                 alpha_ratio: float = 1.0) -> "Projector":
        """Rank ``conv_rank`` LoRA on every Conv2d of the encoder, ``head_rank`` on the head; only
        the LoRA tensors stay trainable (see hello_ray/models/lora.py)."""
        if self.lora_config is not None:
            raise ValueError(f"projector already has LoRA {self.lora_config}")
        # A shapes-only projector (pretrained='meta') gets shapes-only LoRA tensors: peft would build
        # them on the CPU (memory, and draws from the global RNG) before moving them to the base's device.
        with torch.device("meta") if self.head.weight.is_meta else contextlib.nullcontext():
            lora_mod.add_lora(self, lora_mod.conv_targets(self.encoder, "encoder"), conv_rank, "head",
                              head_rank, style=style, alpha_ratio=alpha_ratio)
        self.lora_config = {"conv_rank": conv_rank, "head_rank": head_rank, "style": style,
                            "alpha_ratio": float(alpha_ratio), "merged": False}
        return self

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA tensors (what the adapter artifact ships), keyed by module path."""
        return lora_mod.lora_state_dict(self)

    def load_lora_state_dict(self, tensors: dict[str, torch.Tensor], where: str = "adapter") -> None:
        lora_mod.load_lora_state_dict(self, tensors, where)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def merge_lora(self, unload: bool = True) -> "Projector":
        """Fold the LoRA into the base weights for labelling (``unload`` drops the LoRA layers)."""
        if self.lora_config is None:
            raise ValueError("projector has no LoRA to merge")
        lora_mod.merge_lora(self, unload=unload)
        self.lora_config = {**self.lora_config, "merged": True}
        if unload:
            for p in self.parameters():
                p.requires_grad_(False)
        return self

    def save_adapter(self, out_dir: str | Path, dtype: str = "fp16") -> dict[str, Any]:
        """Write the adapter artifact (hello_ray/models/adapter.py) into ``out_dir``."""
        return save_adapter(self, out_dir, dtype=dtype)


def load_adapter(adapter_dir: str | Path, merge: bool = False, num_classes: int | None = None,
                 device: torch.device | str | None = None) -> Projector:
    """The projector of an adapter folder: ``Projector.from_adapter`` (see there)."""
    return Projector.from_adapter(adapter_dir, merge=merge, num_classes=num_classes, device=device)
