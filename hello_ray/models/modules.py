"""Module surgery shared by the model helpers: replace a submodule by its dotted name."""
from __future__ import annotations

from torch import nn


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model``'s submodule ``name`` (dotted, as ``named_modules`` gives it) is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
