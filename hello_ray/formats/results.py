"""The evaluate artifact's results: one row per trained student, its summary and its table.

    results.parquet   the rows (without ``classes`` and ``row``), for pandas / SQL readers
    results.json      {"rows": [...], "table": summarise(rows)}
    rows/<id>.json    one finished row each, written as it finishes (``evaluate.parallel=queue``):
                      what a restarted grid resumes from; ``results.*`` are written from them

A row is what the evaluate stage trains and measures (``stages/evaluate.py``: ``plan_rows`` then
``_train_row``), and this is the only results schema: the report, the sweep and the jobs read it.

- identity: ``student``, ``strategy`` (a label strategy spec: ``hard``, ``teacher``, ``stored``,
  ``stored/10``, ``projector``), ``seed``, ``images`` (``distilled``, or ``floor``: random real
  images with hard labels), ``continual_steps`` (0: not a continual-learning row) and
  ``continual_step`` (1..continual_steps), ``classes`` (continual rows: the classes seen so far),
  ``row`` (a unique id);
- measured: ``top1`` (the final epoch's top-1, a fraction in [0, 1] of ``val_images``), ``top1_best``
  and ``best_epoch`` (the best of ``scored_epochs`` under ``report``: ``final`` scores only the last
  epoch; ``rded_best`` / ``fkd_best`` pick on the validation set, as those references report),
  ``steps`` (student optimiser steps), ``label_bytes`` (the bytes the
  strategy ships), ``train_images``, ``steps``, ``step_s`` (mean seconds per step), ``wall_s``,
  ``final_loss``, ``peak_mem_mb`` (``peak_mem_kind`` says what was measured), ``device``,
  ``workers``, ``parallel``, ``start_unix`` / ``end_unix`` (when the row ran: the schedule's busy
  fraction is computed from them), ``worker`` (the Train rank that ran it).

``summarise`` gives mean ± std (population, ddof=0) of top-1 over seeds per (images, student,
strategy, continual_steps, continual_step); ``format_table`` is the table the pipeline prints
and ``results_table`` its cells, which the report renders as markdown.
"""
from __future__ import annotations

import hashlib
import io
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from hello_ray.formats.jsonfile import read_json, write_json
from hello_ray.tables import (as_records, cell, check_rows, format_pct, human_bytes, is_missing,
                              text_table)

if TYPE_CHECKING:
    from hello_ray.store import Store

RESULTS_PARQUET = "results.parquet"
RESULTS_JSON = "results.json"
# Every row has these (a row without them cannot be placed in a comparison).
REQUIRED = ("student", "strategy", "seed", "top1", "label_bytes", "images", "continual_steps",
            "continual_step")
# One summary group: the seeds of one student trained one way.
GROUP_KEYS = ("images", "student", "strategy", "continual_steps", "continual_step")
# Row fields the parquet file leaves out: a list per row (``classes``) and the resume id (``row``).
JSON_ONLY = ("classes", "row")
ROW_RECORDS = "rows"


def row_record_name(row_id: str) -> str:
    """The file of one finished row (a hash of its id: ids hold '|' and class lists)."""
    return f"{ROW_RECORDS}/{hashlib.sha256(row_id.encode()).hexdigest()[:20]}.json"


def write_row_record(store: "Store", key: str, record: dict[str, Any]) -> None:
    """One finished row, written at once (one object: a reader sees it whole or not at all)."""
    write_json(store, key, row_record_name(record["row"]), record)


def has_row_record(store: "Store", key: str, row_id: str) -> bool:
    """Whether row ``row_id`` has its record (one object read, no listing)."""
    from hello_ray.store import ArtifactNotFound

    try:
        store.get_bytes(key, row_record_name(row_id))
    except ArtifactNotFound:
        return False
    return True


def read_row_records(store: "Store", key: str, row_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The finished rows among ``row_ids`` (row id -> record); a record of another id is refused."""
    names = set(store.list_files(key))
    out = {}
    for rid in row_ids:
        name = row_record_name(rid)
        if name in names:
            rec = read_json(store, key, name)
            if not isinstance(rec, dict) or rec.get("row") != rid:
                raise ValueError(f"{store.uri_for(key, name)}: not the record of row {rid!r}")
            out[rid] = rec
    return out


def _mean(group: list[dict[str, Any]], key: str) -> float | None:
    vals = [float(r[key]) for r in group if not is_missing(r.get(key))]
    return float(np.mean(vals)) if vals else None


def _max(group: list[dict[str, Any]], key: str) -> float | None:
    vals = [float(r[key]) for r in group if not is_missing(r.get(key))]
    return max(vals) if vals else None


def summarise(rows: Any) -> list[dict[str, Any]]:
    """Mean ± std of top-1 over seeds per (images, student, strategy, continual step), in first-seen
    order. ``rows``: dicts or a DataFrame; a row without a required key or with a top-1 outside
    [0, 1] is a ValueError naming it.

    Each group: the group keys, ``seeds``, ``top1_mean``, ``top1_std`` (population), ``label_bytes``
    (the largest if seeds disagree: bytes follow the config, not the seed), mean ``step_s`` and
    ``wall_s``, the largest ``peak_mem_mb``; a measure no row of the group has is None.
    """
    recs = as_records(rows, "results")
    check_rows(recs, REQUIRED, "results")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in recs:
        # Cast so DataFrame input (numpy scalars) groups and serialises like plain rows.
        k = (str(r["images"]), str(r["student"]), str(r["strategy"]), int(r["continual_steps"]),
             int(r["continual_step"]))
        groups.setdefault(k, []).append(r)
    out = []
    for k, g in groups.items():
        top1 = np.array([float(r["top1"]) for r in g])  # [seeds]
        best = np.array([float(r.get("top1_best", r["top1"])) for r in g])  # [seeds]
        report = str(g[0].get("report", "final"))
        out.append({**dict(zip(GROUP_KEYS, k)), "seeds": len(g), "top1_mean": float(top1.mean()),
                    "top1_std": float(top1.std()), "report": report,
                    "top1_best_mean": float(best.mean()), "top1_best_std": float(best.std()),
                    "steps": _max(g, "steps"), "label_bytes": max(int(r["label_bytes"]) for r in g),
                    "step_s": _mean(g, "step_s"), "wall_s": _mean(g, "wall_s"),
                    "peak_mem_mb": _max(g, "peak_mem_mb"), "train_images": _max(g, "train_images")})
    return out


def write_results(store: "Store", key: str, rows: list[dict[str, Any]], wall_s: float,
                  scores: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``results.parquet`` + ``results.json`` (rows, the mean ± std table and DD-Ranking's fair
    ``scores``, ``hello_ray.scores.fair_scores``) of evaluate artifact ``key``; returns the stage
    summary ``{"rows": count, "table": summary, "scores": [...], "wall_s"}``."""
    table = summarise(rows)                  # validates before anything is written
    df = pd.DataFrame(rows).drop(columns=list(JSON_ONLY), errors="ignore")
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    store.put_bytes(key, RESULTS_PARQUET, buf.getvalue())
    write_json(store, key, RESULTS_JSON, {"rows": rows, "table": table, "scores": scores or []})
    return {"rows": len(rows), "table": table, "scores": scores or [], "wall_s": round(wall_s, 1)}


def read_results(store: "Store", key: str) -> list[dict[str, Any]]:
    """The rows of evaluate artifact ``key`` (from ``results.json``: every field, ``classes`` too)."""
    data = read_json(store, key, RESULTS_JSON)
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{store.uri_for(key, RESULTS_JSON)}: expected {{\"rows\": [...], \"table\": [...]}}, "
                         f"got {type(data).__name__}")
    return data["rows"]


def results_table(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and display cells of the results table, one line per ``summarise`` group."""
    best_of = any(s.get("report", "final") != "final" for s in summary)
    headers = ["images", "student", "strategy", "continual", "top-1 % (final epoch)"]
    headers += ["top-1 % (best epoch on val*)"] if best_of else []
    headers += ["seeds", "steps", "label bytes", "label size", "step ms", "wall s", "peak mem"]
    body = []
    for s in summary:
        best = ([format_pct(s["top1_best_mean"], s["top1_best_std"]) + f" ({s['report']})"
                 if s.get("report", "final") != "final" and "top1_best_mean" in s else "-"] if best_of else [])
        body.append([
            s["images"], s["student"], s["strategy"],
            f"{s['continual_step']}/{s['continual_steps']}" if s["continual_steps"] else "-",
            format_pct(s["top1_mean"], s["top1_std"]), *best, str(s["seeds"]),
            "-" if is_missing(s.get("steps")) else f"{int(s['steps']):,}",
            f"{s['label_bytes']:,}", human_bytes(s["label_bytes"]),
            # .get: tables stored before wall_s joined the summary still print
            "-" if is_missing(s.get("step_s")) else f"{1000 * s['step_s']:.1f}",
            "-" if is_missing(s.get("wall_s")) else f"{s['wall_s']:.1f}",
            "-" if is_missing(s.get("peak_mem_mb")) else human_bytes(s["peak_mem_mb"] * 2**20),
        ])
    return headers, body


def format_table(rows: Any, columns: Sequence[str] | None = None) -> str:
    """An aligned plain-text table for the terminal.

    Results rows are summarised first (``print(format_table(rows))`` is what ``jobs/distill.py``
    shows at the end); a ``summarise`` table (e.g. a manifest's ``summary["table"]``) is shown as
    it is; any other dicts get one column per key (or per name in ``columns``).
    """
    recs = as_records(rows, "rows")
    if recs and columns is None and all(k in recs[0] for k in REQUIRED):
        headers, body = results_table(summarise(recs))
    elif recs and columns is None and all(k in recs[0] for k in (*GROUP_KEYS, "top1_mean", "seeds")):
        headers, body = results_table(recs)
    else:
        headers = list(columns) if columns else list(dict.fromkeys(k for r in recs for k in r))
        body = [[cell(r.get(h)) for h in headers] for r in recs]
    text = text_table(headers, body)
    if any(h.endswith("*)") for h in headers):
        text += ("\n* best of the scored epochs, picked on the validation set (as the reference "
                 "protocol reports it): an optimistic number; the final-epoch column is the fair one")
    return text
