"""CLIP factory over open_clip, with a tiny random-init ResNet CLIP for tests and the demo.

``create_clip(model_name, pretrained)`` is the one way hello_ray builds a CLIP:

- an open_clip tag (``'openai'``, ``'yfcc15m'``, ...) goes to open_clip unchanged: the
  cluster path, which downloads the weights once into open_clip's cache;
- a local file path goes to open_clip as ``pretrained=<file>``;
- ``'random-init'`` builds a seeded random model, saves it once to
  ``$HELLO_RAY_CACHE/clip/<model>-random-init.pt`` (default root ``~/.cache/hello_ray``)
  and loads it back through ``open_clip.create_model(..., pretrained=<that file>)``, so
  tests and the demo go through exactly the loading code that real weights take, and no
  test ever downloads anything;
- ``'meta'`` builds the architecture on PyTorch's meta device: real layer shapes, no weights
  allocated, nothing read or downloaded (storage accounting counts LoRA parameters on it).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

# Several Ray workers may create the same cache file at once: each writes its own temp file and
# renames it (the content is deterministic, so the last rename wins harmlessly).
from hello_ray.store import atomic_write, cache_root

TINY_CLIP = "hello-tiny-rn"
RANDOM_INIT = "random-init"
META = "meta"
RANDOM_INIT_SEED = 0
# v2: unit weights for the last BN of every residual block; v3: BN statistics estimated on
# seeded smooth-noise images (see _ensure_random_init).
RANDOM_INIT_VERSION = 3
CALIBRATION_IMAGES = 256

# A ResNet CLIP small enough for a 2-core CPU: one Bottleneck per stage, width 16 (stage
# widths 16..128, output 512 channels into the attention pool), 32 px input, 64-d embedding;
# a one-layer text transformer over the real CLIP BPE vocabulary (the tokenizer ships with
# open_clip, so prompts are tokenised exactly as for RN50).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def register_tiny_clip() -> None:
    """Register ``hello-tiny-rn`` with ``open_clip.add_model_config`` (idempotent).

    open_clip reads model configs from JSON files, so the config above is written to the
    cache folder and that file is added to open_clip's registry.
    """
    if TINY_CLIP in open_clip.list_models():
        return
    path = cache_root() / "clip" / "model_configs" / f"{TINY_CLIP}.json"
    text = json.dumps(TINY_CLIP_CONFIG, indent=2)
    if not path.exists() or path.read_text() != text:
        atomic_write(path, lambda f: f.write(text.encode()))
    open_clip.add_model_config(path)


def random_init_path(model_name: str) -> Path:
    """Where the seeded random-init weights of ``model_name`` are cached."""
    return cache_root() / "clip" / f"{model_name}-{RANDOM_INIT}-v{RANDOM_INIT_VERSION}.pt"


def _ensure_random_init(model_name: str) -> Path:
    """Create the seeded random weights file of ``model_name`` once; return its path."""
    path = random_init_path(model_name)
    if path.exists():
        return path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = open_clip.create_model(model_name, pretrained=None)
    # open_clip's ResNet init zeroes each Bottleneck's last BN (a trick for training from
    # scratch). In a frozen random encoder that kills every residual branch: features barely
    # depend on image detail, the LoRA of those blocks gets zero gradients and the refine
    # objective is ~0. Real (pretrained) weights have live branches, so the stand-in should too.
    with torch.no_grad():
        for name, module in model.visual.named_modules():
            if name.endswith("bn3") and isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(1.0)
    _calibrate_batchnorm(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def _calibrate_batchnorm(model: nn.Module, seed: int = RANDOM_INIT_SEED) -> None:
    """Set the image encoder's BN running statistics to those of seeded smooth-noise images.

    A random init's BN statistics (mean 0, var 1) do not match its activations: deep in the
    frozen encoder every image lands on one direction (pairwise feature cosine 1.0000 on the
    demo digits, nearest-class-mean accuracy 30 %). Statistics measured on data-free noise
    (4x4 uniform noise, bilinearly upsampled) keep the features apart (cosine ~0.91, NCM 82 %),
    as pretrained weights would: the stand-in then behaves like an encoder, not a constant.
    """
    visual = model.visual
    side = clip_input_size(model)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in clip_normalisation(model))
    bns = [m for m in visual.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                     # cumulative average over all calibration batches
    g = torch.Generator().manual_seed(seed)
    visual.train()
    with torch.no_grad():
        for _ in range(CALIBRATION_IMAGES // 64):
            noise = torch.rand(64, 3, 4, 4, generator=g)
            images = F.interpolate(noise, size=side, mode="bilinear", align_corners=False)  # [64,3,h,w]
            visual((images - mean) / std)
    visual.eval()
    for m, mom in zip(bns, momenta):
        m.momentum = mom


def pretrained_identity(pretrained: str) -> str:
    """What ``pretrained`` stands for in artifact keys: the stand-in's version is part of it, so a
    new stand-in recipe does not reuse adapters trained on the old one; a local weights file is
    its content (sha256, hashed once per size and mtime), so replacing the file retrains and moving
    it does not."""
    if pretrained == RANDOM_INIT:
        return f"{RANDOM_INIT}-v{RANDOM_INIT_VERSION}"
    if os.path.isfile(pretrained):
        from hello_ray.filehash import cached_sha256

        return f"file-sha256:{cached_sha256(pretrained)}"
    return pretrained


@contextlib.contextmanager
def _quiet_open_clip():
    """Silence open_clip's root-logger "No pretrained weights loaded" warning where a model is
    built without weights on purpose."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def create_clip(model_name: str, pretrained: str) -> tuple[nn.Module, Any]:
    """An open_clip model (eval mode, CPU, fp32; on the meta device for ``'meta'``) and its tokenizer.

    ``pretrained``: an open_clip tag (cluster), a local weights file, ``'random-init'`` or ``'meta'``.
    """
    register_tiny_clip()
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP model {model_name!r}; open_clip knows e.g. RN50, RN101, ViT-B-32, "
                         f"and hello_ray registers {TINY_CLIP!r} (see open_clip.list_models())")
    if not pretrained:
        raise ValueError(f"CLIP {model_name!r}: give pretrained = an open_clip tag (e.g. 'openai'), "
                         f"a local weights file, '{RANDOM_INIT}' or '{META}'")
    if pretrained == META:
        with torch.device("meta"), _quiet_open_clip():
            model = open_clip.create_model(model_name, pretrained=None, device="meta")
        return model.eval(), open_clip.get_tokenizer(model_name)
    if pretrained == RANDOM_INIT:
        weights = str(_ensure_random_init(model_name))
    elif pretrained.lower() in (t.lower() for t in open_clip.list_pretrained_tags_by_model(model_name)):
        weights = pretrained
    elif os.path.isfile(pretrained):
        weights = pretrained
    else:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise ValueError(f"CLIP {model_name!r}: pretrained={pretrained!r} is neither a known tag "
                         f"({tags}), nor an existing file, nor '{RANDOM_INIT}' or '{META}'")
    model = open_clip.create_model(model_name, pretrained=weights)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, tokenizer


def clip_embed_dim(model_name: str) -> int:
    """The joint image/text embedding width of ``model_name`` (the projector head's input)."""
    register_tiny_clip()
    return int(open_clip.get_model_config(model_name)["embed_dim"])


def clip_input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) the CLIP image encoder expects."""
    size = getattr(model.visual, "image_size", None)
    if size is None:
        raise ValueError(f"{type(model.visual).__name__} does not say its input size (no .image_size)")
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def clip_normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the encoder's preprocessing: the model's own preprocess config where
    open_clip records one (it does for every model), else the OpenAI constants."""
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = cfg.get("mean") or open_clip.constants.OPENAI_DATASET_MEAN
    std = cfg.get("std") or open_clip.constants.OPENAI_DATASET_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
