"""Plain rows and tables: the display helpers shared by the terminal tables, the report and the
storage accounting (a leaf module: anything may import it).

Rows are dicts (or a pandas DataFrame); a missing value is None or NaN and shows as ``-``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def human_bytes(n: float | None, digits: int = 2) -> str:
    """``1536 -> '1.50 KiB'``: binary units, as METHOD.md quotes MiB/GiB; None or NaN -> ``'-'``.

    Bytes are whole (``'1,000 B'``); larger units keep ``digits`` decimals.
    """
    if is_missing(n):
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.{digits}f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_pct(mean: float, std: float | None = None) -> str:
    """Fractions -> percent with 2 decimals: ``(0.4523, 0.0031) -> '45.23 ± 0.31'``."""
    if std is None:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def is_missing(v: Any) -> bool:
    """None or NaN (a DataFrame fills a column a row lacks with NaN)."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def cell(v: Any) -> str:
    """A value as a table cell: floats to 4 significant digits, missing as ``-``."""
    if is_missing(v):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def as_records(rows: Any, what: str) -> list[dict[str, Any]]:
    """A list of dicts from a list of dicts or a pandas DataFrame (None: empty)."""
    if rows is None:
        return []
    if hasattr(rows, "to_dict") and not isinstance(rows, Mapping):
        return [dict(r) for r in rows.to_dict("records")]
    if isinstance(rows, (Mapping, str, bytes)) or not isinstance(rows, Iterable):
        raise TypeError(f"{what} must be a list of dicts or a DataFrame, got {type(rows).__name__}")
    return [dict(r) for r in rows]


def check_rows(rows: list[dict[str, Any]], keys: Sequence[str], what: str, top1_optional: bool = False) -> None:
    """Every row has ``keys`` and a ``top1`` fraction in [0, 1] (``top1_optional``: or none at all);
    the ValueError names the row and the key."""
    for i, r in enumerate(rows):
        missing = [k for k in keys if is_missing(r.get(k))]
        if missing:
            raise ValueError(f"{what} row {i} lacks {missing} (has {sorted(r)})")
        top1 = r.get("top1")
        if is_missing(top1):
            if top1_optional:
                continue
            raise ValueError(f"{what} row {i} has no top1 (has {sorted(r)})")
        if not 0.0 <= float(top1) <= 1.0:
            raise ValueError(f"{what} row {i} has top1={top1!r}; expected a fraction in [0, 1]")


def text_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """An aligned plain-text table for the terminal: header, a dashed rule, one line per row."""
    widths = [max([len(h)] + [len(row[i]) for row in body]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in body])


def markdown_table(headers: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; ``|`` inside cells is escaped."""
    def esc(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    return "\n".join(lines)
