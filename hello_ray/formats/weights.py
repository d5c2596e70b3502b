"""Tensors read back from the store: teacher checkpoints and Ray Train checkpoints.

Everything the store hands to ``torch.load`` goes through :func:`load_weights`, which loads with
``weights_only=True``: tensors, dicts, lists, numbers and strings only. Write access to a bucket
must not be code execution on every worker, and a checkpoint under ``_ray/<key>`` has a
predictable name, so a pickle naming anything else (a class whose ``__reduce__`` runs a
command) is refused, naming the file and the global it asked for, and nothing of it runs.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from hello_ray.store import StoreError

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")  # torch names the global it refused


def load_weights(source: bytes | Path, where: str, map_location: Any = "cpu") -> Any:
    """``torch.load(source, weights_only=True)``; StoreError naming ``where`` when the pickle
    holds anything but plain data (it is refused before anything of it runs)."""
    try:
        return torch.load(io.BytesIO(source) if isinstance(source, bytes) else source,
                          map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own text suggests weights_only=False: not something to pass on to users here.
        found = _GLOBAL_RE.search(str(e))
        what = f"it asks for the Python global {found.group(1)}" if found else "it holds other objects"
        raise StoreError(f"{where}: refusing to load it: a checkpoint may hold only tensors, dicts, "
                         f"lists and numbers, and {what}. Nothing of it was run; do not load it with "
                         "weights_only=False. Find out who wrote it, and remove it") from None
