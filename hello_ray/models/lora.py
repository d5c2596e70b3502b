"""LoRA for the projector, through peft: every Conv2d of the CLIP image encoder + the head.

Two conv parametrisations (``transfer.lora_style``):

- ``standard``: peft's own Conv2d LoRA, A = conv in->r with the base kernel (k x k, the base
  stride/padding), B = 1x1 conv r->out: ``r * (in*k*k + out)`` parameters.
- ``separable`` (default): A = conv in->r with kernel (k, 1), B = conv r->out with kernel
  (1, k): ``r * k * (in + out)`` parameters, the count the published parameter table
  implies. The base stride and padding are split between them (A takes the vertical ones,
  B the horizontal), so ``B(A(x))`` has the base conv's output shape and equals one k x k
  conv with weight ``dW[o, i, u, v] = sum_r B[o, r, 0, v] * A[r, i, u, 0]`` -- which is
  what merging adds to the base weight, exactly.

The separable layer is a peft custom LoRA layer (``LoraConfig._register_custom_module``): it
subclasses peft's Conv2d LoRA and only changes the shapes of A/B and the delta weight, so
peft's forward, merge/unmerge, scaling, adapter switching and trainable-flag handling all
apply unchanged. B starts at zero, so a freshly LoRA'd projector equals its base.

What is *not* adapted: the ResNet attention pool's q/k/v/c projections. open_clip's
``AttentionPool2d`` calls ``F.multi_head_attention_forward`` with the raw ``.weight``
tensors of those Linears, bypassing their ``forward``, so a LoRA there would never take
part in the computation nor train. Only ``nn.Conv2d`` modules are targeted in the encoder.
"""
from __future__ import annotations

from typing import Iterable

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import layer as lora_layer
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from hello_ray.models.modules import replace_submodule

LORA_STYLES = ("separable", "standard")
ADAPTER = "default"  # peft's adapter name; artifacts store keys without it


class SeparableLoraConv2d(lora_layer.Conv2d):
    """peft Conv2d LoRA with a (k,1) x (1,k) factorisation of the update (see module docstring)."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig,
                     **kwargs) -> None:
        base = self.get_base_layer()
        if base.groups != 1 or tuple(base.dilation) != (1, 1) or base.padding_mode != "zeros":
            raise ValueError(
                f"separable LoRA supports plain Conv2d (groups=1, dilation=1, zero padding); got {base}. "
                "Use transfer.lora_style=standard for this model.")
        if config.use_dora:
            raise ValueError("separable LoRA does not implement DoRA")
        # peft's bookkeeping (r, scaling, dropout, active adapter...) with its standard A/B ...
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        # ... then the separable A/B in their place, initialised the peft way (B = 0).
        (kh, kw), (sh, sw) = base.kernel_size, base.stride
        if isinstance(base.padding, str):
            raise ValueError(f"separable LoRA needs numeric padding, got padding={base.padding!r} in {base}")
        ph, pw = base.padding
        self.lora_A[adapter_name] = nn.Conv2d(self.in_features, r, (kh, 1), (sh, 1), (ph, 0), bias=False)
        self.lora_B[adapter_name] = nn.Conv2d(r, self.out_features, (1, kw), (1, sw), (0, pw),
                                              bias=self.lora_bias[adapter_name])
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        a = self.lora_A[adapter].weight  # [r, in, kh, 1]
        b = self.lora_B[adapter].weight  # [out, r, 1, kw]
        dtype = a.dtype
        if a.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()  # CPUs are slow (or lack kernels) in half precision
        delta = torch.einsum("orv,riu->oiuv", b[:, :, 0, :], a[:, :, :, 0])  # [out, in, kh, kw]
        return (delta * self.scaling[adapter]).to(dtype)


def conv_lora_params(in_ch: int, out_ch: int, kernel: tuple[int, int], rank: int, style: str) -> int:
    """LoRA parameters one Conv2d gets (the formulas of the module docstring)."""
    kh, kw = kernel
    if style == "separable":
        return rank * (in_ch * kh + out_ch * kw)
    if style == "standard":
        return rank * (in_ch * kh * kw + out_ch)
    raise ValueError(f"unknown LoRA style {style!r}; choose one of {', '.join(LORA_STYLES)}")


def conv_targets(encoder: nn.Module, prefix: str) -> list[str]:
    """Full names (under ``prefix``) of every Conv2d in the encoder: the LoRA targets."""
    return [f"{prefix}.{name}" for name, m in encoder.named_modules() if isinstance(m, nn.Conv2d)]


def add_lora(model: nn.Module, conv_names: list[str], conv_rank: int, head_name: str, head_rank: int,
             style: str = "separable", alpha_ratio: float = 1.0) -> nn.Module:
    """Inject LoRA in place: rank ``conv_rank`` on ``conv_names``, rank ``head_rank`` on the Linear
    ``head_name``; freeze everything else. ``alpha = alpha_ratio * rank`` (update scale = alpha_ratio).
    Returns ``model``."""
    if style not in LORA_STYLES:
        raise ValueError(f"unknown LoRA style {style!r}; choose one of {', '.join(LORA_STYLES)}")
    if conv_rank < 1 or head_rank < 1:
        raise ValueError(f"LoRA ranks must be >= 1, got conv_rank={conv_rank}, head_rank={head_rank}")
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ValueError("the model already has LoRA layers; build a fresh one to add another LoRA")
    config = LoraConfig(
        r=conv_rank,
        lora_alpha=alpha_ratio * conv_rank,
        target_modules=list(conv_names) + [head_name],
        # Anchored on the exact name so no conv named "...head" could pick up the head's rank.
        rank_pattern={f"^{head_name}": head_rank},
        alpha_pattern={f"^{head_name}": alpha_ratio * head_rank},
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,  # A kaiming-uniform, B zero: the LoRA'd model starts as its base
    )
    if style == "separable":
        config._register_custom_module({nn.Conv2d: SeparableLoraConv2d})
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():  # only the LoRA tensors train
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return model


def lora_layers(model: nn.Module) -> Iterable[tuple[str, LoraLayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))


def _artifact_key(param_name: str) -> str:
    """``x.lora_A.default.weight`` -> ``x.lora_A.weight`` (artifacts do not depend on the adapter name)."""
    return param_name.replace(f".lora_A.{ADAPTER}.", ".lora_A.").replace(f".lora_B.{ADAPTER}.", ".lora_B.")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors only, keyed without the adapter name (e.g. ``encoder.conv1.lora_A.weight``)."""
    return {_artifact_key(n): p.detach() for n, p in model.named_parameters()
            if ".lora_A." in n or ".lora_B." in n}


def load_lora_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Copy LoRA tensors into a model that has the same LoRA layers; any key or shape mismatch is an
    error naming the key (a truncated or foreign adapter must not load silently)."""
    params = {_artifact_key(n): p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{where}: LoRA tensors do not match the model: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    with torch.no_grad():
        for key, p in params.items():
            t = tensors[key]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{where}: LoRA tensor {key!r} has shape {tuple(t.shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))


def merge_lora(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold every LoRA update into its base weight (inference: no extra convs per layer).

    ``unload=True`` also swaps each LoRA layer for its (merged) base layer, leaving a plain
    model; ``unload=False`` keeps the layers so :func:`unmerge_lora` can undo the merge.
    """
    for name, layer in list(lora_layers(model)):
        layer.merge()
        if unload:
            replace_submodule(model, name, layer.get_base_layer())
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (``unload=False``): base weights back, LoRA applied on the fly again."""
    for _, layer in lora_layers(model):
        if layer.merged:
            layer.unmerge()
    return model
