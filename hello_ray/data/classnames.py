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

from hello_ray.data.errors import DataError
from hello_ray.data.imagenet_wnids import IMAGENET_WNIDS

# A dataset's class-name file beside its shards (a list, or a mapping with key class_names / classes /
# names): the name the sources read first, which the dataset writers (demo, synth-data) and a package
# (formats/package.py, so its folders read as a dataset) write; then the other name read.
CLASS_FILES = ("classes.json", "class_names.json")

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


def resolve_class_names(keys: list[str], configured: list[str] | dict[str, str], where: str,
                        source: str = "config data.class_names") -> list[str]:
    """The readable names of ``keys`` (the split's classes in label order) from ``configured``.

    A mapping resolves by key (the class folder name, or the class key of a parquet /
    webdataset set): a key it lacks, or a key the split does not have, is a DataError naming
    them (a typo would otherwise leave a class unnamed or misnamed). A list is taken by
    position; its length must match. Empty: derived from the keys (``readable_class_names``).
    """
    if isinstance(configured, dict):
        missing = [k for k in keys if k not in configured]
        unknown = sorted(k for k in configured if k not in set(keys))
        if missing or unknown:
            parts = ([f"no name for classes {_few(missing)}"] if missing else []) + \
                    ([f"names classes the split does not have: {_few(unknown)}"] if unknown else [])
            raise DataError(f"{source} (a mapping class -> name) vs the {len(keys)} classes of {where}: "
                            f"{'; '.join(parts)}; the split's classes are {_few(keys)}")
        return [str(configured[k]) for k in keys]
    if configured:
        if len(configured) != len(keys):
            raise DataError(f"{source} has {len(configured)} names but {where} has {len(keys)} classes")
        return [str(n) for n in configured]
    return readable_class_names(keys)


def _few(items: list[str], n: int = 8) -> str:
    shown = ", ".join(repr(x) for x in items[:n])
    return f"[{shown}{f', ... (+{len(items) - n})' if len(items) > n else ''}]"


def pairing_line(keys: list[str], names: list[str], n: int = 5) -> str:
    """``label: key -> name`` for the first ``n`` classes and the count, on one line, so a list
    of names in the wrong order shows in the log (``0: cat`` where the key is the name)."""
    pairs = [f"{i}: {k}" if k == name else f"{i}: {k} -> {name}"
             for i, (k, name) in enumerate(zip(keys[:n], names[:n]))]
    more = f", ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return f"{', '.join(pairs)}{more} [{len(keys)} classes]"
