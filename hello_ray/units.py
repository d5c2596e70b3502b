"""Readable units for tables and reports (a leaf module: anything may import it)."""
from __future__ import annotations

import math


def human_bytes(n: float | None, digits: int = 2) -> str:
    """``1536 -> '1.50 KiB'``: binary units, as METHOD.md quotes MiB/GiB; None or NaN -> ``'-'``.

    Bytes are whole (``'1,000 B'``); larger units keep ``digits`` decimals.
    """
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.{digits}f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
