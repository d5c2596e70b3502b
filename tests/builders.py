"""Fake inputs the tests build on disk, written once here rather than in each test file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DEMO_KEYS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def pixels(c: int, i: int, size: int) -> np.ndarray:
    """Image ``i`` of class ``c``: seeded noise, (size, size, 3) uint8."""
    return np.random.default_rng([c, i]).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_external_set(root: Path, layout: str, ipc: int = 2, size: int = 24,
                       names: list[str] | None = None) -> Path:
    """A 10-class distilled set on disk as each reference writes it (PNG for 'folders', JPEG otherwise):
    RDED's ``<c:05d>/class<c:05d>_id<i:05d>.jpg``, SRe2L's ``new<c:03d>/class<c:03d>_id<i:03d>.jpg``."""
    for c in range(10):
        folder = {"rded": f"{c:05d}", "sre2l": f"new{c:03d}", "folders": (names or DEMO_KEYS)[c]}[layout]
        (root / folder).mkdir(parents=True)
        for i in range(ipc):
            name = {"rded": f"class{c:05d}_id{i:05d}.jpg", "sre2l": f"class{c:03d}_id{i:03d}.jpg",
                    "folders": f"img{i}.png"}[layout]
            Image.fromarray(pixels(c, i, size)).save(root / folder / name)
    return root
