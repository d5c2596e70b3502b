"""The transfer artifact's label-fidelity file.

    fidelity.json   {"before": {...}, "after": {...}, "teacher_window", "n_teachers", ...}

``before``/``after`` each hold ``views, agreement, kl, projector_top1, teacher_top1`` measured on the
real validation images (before: the text-initialised zero-shot projector; after: the shipped
adapter loaded back and merged). Written by the transfer stage, read by the report.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hello_ray.formats.jsonfile import read_json, write_json

if TYPE_CHECKING:
    from hello_ray.store import Store

FIDELITY_FILE = "fidelity.json"


def write_fidelity(store: "Store", key: str, fidelity: dict[str, Any]) -> None:
    """``fidelity.json`` of transfer artifact ``key``."""
    if not isinstance(fidelity, dict):
        raise TypeError(f"write_fidelity: expected a dict, got {type(fidelity).__name__}")
    write_json(store, key, FIDELITY_FILE, fidelity)


def read_fidelity(store: "Store", key: str) -> dict[str, Any]:
    """``fidelity.json`` of transfer artifact ``key`` (ValueError naming the file when it is not a JSON
    object). No manifest check: the transfer stage reads it back for its summary before finalizing."""
    fidelity = read_json(store, key, FIDELITY_FILE)
    if not isinstance(fidelity, dict):
        raise ValueError(f"{store.uri_for(key, FIDELITY_FILE)}: expected a JSON object, "
                         f"got {type(fidelity).__name__}")
    return fidelity
