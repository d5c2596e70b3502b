"""Readable class names for the CLIP prompts.

ImageNet folders are WordNet synset ids (``n01440764``). ``imagenet_wnids.py`` beside this
file holds the standard ordered list of the 1000 ImageNet-1K synsets (the sorted order
ImageFolder uses; copied from timm's ``imagenet_synsets.txt``), and torchvision ships the
1000 readable category names in the same order in its weights metadata, without a download.
Zipping the two maps any ImageNet-1K subset (ImageNet-100, ...) by synset id, not by position.
Other folder names are made readable by turning ``_`` into spaces (``golden_retriever``).
"""
from __future__ import annotations

import functools
import re

from hello_ray.data.imagenet_wnids import IMAGENET_WNIDS

_WNID = re.compile(r"^n\d{8}$")


def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1K synset ids in the standard (sorted) class order."""
    return IMAGENET_WNIDS


@functools.lru_cache(maxsize=1)
def imagenet_categories() -> tuple[str, ...]:
    """torchvision's 1000 readable ImageNet-1K names, in class order (no download)."""
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


@functools.lru_cache(maxsize=1)
def wnid_to_name() -> dict[str, str]:
    return dict(zip(imagenet_wnids(), imagenet_categories()))


def is_wnid(name: str) -> bool:
    return bool(_WNID.match(name))


def readable_class_names(keys: list[str]) -> list[str]:
    """Folder / shard class keys -> names for prompts.

    ImageNet-1K synset ids map to torchvision's category names; a synset outside
    ImageNet-1K keeps its id; other names get ``_`` replaced by a space.
    """
    table = wnid_to_name() if any(is_wnid(k) for k in keys) else {}
    return [table.get(k, k) if is_wnid(k) else k.replace("_", " ").strip() or k for k in keys]
