"""DD-Ranking's fair scores of a distilled set, from the rows of one evaluation.

NUS-HPC-AI-Lab/DD-Ranking at b8b0966 defines two scores, each a gap normalised by
``norm(x) = (e^x - e^-1) / (e - e^-1)`` (so x = -1, 0, 1 give 0, 0.269, 1):

- **Label Robust Score** (``ddranking/metrics/hard_label.py`` l. 380-383, ``soft_label.py`` l. 561-564):
  HLR = A(full, hard) - A(syn, hard) (hard-label recovery), IOR = A(syn, L) - A(rdm, L)
  (improvement over random real images with the same labels L), LRS = norm(w IOR - (1 - w) HLR),
  w = ``lrs_lambda`` = 0.5. The hard-label variant takes L = hard labels; the soft-label one the
  method's own labels (here: each soft strategy).
- **Augmentation Robust Score** (``ddranking/metrics/aug_robust.py`` l. 577-580):
  S(aug) = A(syn, L) - A(rdm, L) with the method's augmentation, S(naug) the same gap without it,
  ARS = norm(g S(aug) + (1 - g) S(naug)), g = ``ars_lambda`` = 0.5.

Accuracies enter in percent, as DD-Ranking's code computes them (its meter multiplies by 100), so
the scores are not bounded to [0, 1]; ``scale="fraction"`` takes them as fractions (its docs'
reading, where a gap of 1 is all the accuracy there is). Each score is computed per seed (a seed's
distilled row against the same seed's random-image row, as each DD-Ranking run pairs its own
random subset), then mean and population std over seeds, as DD-Ranking reports its runs.

Which rows, here: A(syn, L) is the ``distilled`` row of strategy L, A(rdm, L) the ``floor`` row
(random real images, as many per class) of the same strategy, student and seed; "without
augmentation" is the strategy's ``+noaug`` variant (whole images, no flip, no CutMix);
A(full, hard) is the ``full`` row of the same student and seed (``evaluate.full_data``: the whole real
training set, hard labels, the same schedule), else ``evaluate.full_top1`` (DD-Ranking caches 56.5 %
for ImageNet-1K ResNet-18). A row's
accuracy is its final-epoch top-1 (DD-Ranking takes the best checkpoint and the best of a
learning-rate search; the rows here are trained once, at the protocol's rate).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from hello_ray.label_spec import parse_spec

DD_RANKING = "NUS-HPC-AI-Lab/DD-Ranking @ b8b0966"


def normalise(x: float) -> float:
    """DD-Ranking's map of a gap to a score: (e^x - e^-1) / (e - e^-1)."""
    return (math.exp(x) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def label_robust_score(full_hard: float, syn_hard: float, syn_label: float, rdm_label: float,
                       weight: float = 0.5) -> dict[str, float]:
    """LRS of one run: accuracies in the units the caller chose. Returns {hlr, ior, lrs}."""
    hlr = full_hard - syn_hard
    ior = syn_label - rdm_label
    return {"hlr": hlr, "ior": ior, "lrs": normalise(weight * ior - (1.0 - weight) * hlr)}


def augmentation_robust_score(syn_aug: float, rdm_aug: float, syn_naug: float, rdm_naug: float,
                              weight: float = 0.5) -> dict[str, float]:
    """ARS of one run. Returns {with_aug, without_aug, ars} (the two gaps and the score)."""
    s_aug, s_naug = syn_aug - rdm_aug, syn_naug - rdm_naug
    return {"with_aug": s_aug, "without_aug": s_naug, "ars": normalise(weight * s_aug + (1.0 - weight) * s_naug)}


def _by_seed(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], dict[int, float]]:
    """{(images, student, strategy): {seed: top-1 fraction}} of the main grid (no continual rows)."""
    out: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in rows:
        if int(r.get("continual_steps", 0) or 0):
            continue
        out.setdefault((str(r["images"]), str(r["student"]), str(r["strategy"])), {})[int(r["seed"])] = float(r["top1"])
    return out


def _stats(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std())


def fair_scores(rows: Iterable[dict[str, Any]], full_top1: float = 0.0, scale: str = "percent",
                weight: float = 0.5) -> list[dict[str, Any]]:
    """LRS and ARS of every (student, strategy) the rows allow, one dict each.

    rows: results rows (``images``, ``student``, ``strategy``, ``seed``, ``top1`` as a fraction).
    ``full_top1``: A(full, hard) as a fraction where no ``full`` row (``evaluate.full_data``) measured it
    for that student and seed (0 = unknown: no LRS). Each dict: student, strategy,
    seeds, and where computable ``lrs_mean/std``, ``hlr``, ``ior_mean``, ``ars_mean/std``,
    ``with_aug_mean``, ``without_aug_mean`` (gaps in ``scale`` units). A strategy lacking a row a
    score needs (its floor control, its +noaug variant, the hard row) has None for that score.
    """
    if scale not in ("percent", "fraction"):
        raise ValueError(f"fair_scores: scale {scale!r} is not 'percent' or 'fraction'")
    unit = 100.0 if scale == "percent" else 1.0
    acc = _by_seed(list(rows))
    out = []
    for (images, student, strategy), syn in acc.items():
        if images in ("floor", "full") or parse_spec(strategy).noaug:   # distilled (or its source's name)
            continue
        rdm = acc.get(("floor", student, strategy), {})
        syn_hard = acc.get((images, student, "hard"), {})
        full = acc.get(("full", student, "hard"), {})
        lrs, ars = [], []
        for seed in sorted(syn):
            a_full = full.get(seed, full_top1 if full_top1 > 0 else None)   # measured, else given
            if a_full is not None and seed in rdm and seed in syn_hard:
                lrs.append(label_robust_score(unit * a_full, unit * syn_hard[seed], unit * syn[seed],
                                              unit * rdm[seed], weight))
            naug = acc.get((images, student, f"{strategy}+noaug"), {})
            rdm_naug = acc.get(("floor", student, f"{strategy}+noaug"), {})
            if seed in rdm and seed in naug and seed in rdm_naug:
                ars.append(augmentation_robust_score(unit * syn[seed], unit * rdm[seed], unit * naug[seed],
                                                     unit * rdm_naug[seed], weight))
        if not lrs and not ars:
            continue
        rec: dict[str, Any] = {"images": images, "student": student, "strategy": strategy, "scale": scale, "weight": weight,
                               "variant": "hard" if strategy == "hard" else "soft",
                               "lrs_seeds": len(lrs), "ars_seeds": len(ars)}
        for name, runs, keys in (("lrs", lrs, ("lrs", "hlr", "ior")),
                                 ("ars", ars, ("ars", "with_aug", "without_aug"))):
            for k in keys:
                mean, std = _stats([r[k] for r in runs]) if runs else (None, None)
                rec[f"{k}_mean"], rec[f"{k}_std"] = mean, std
        out.append(rec)
    return out


def scores_table(scores: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the fair-scores table (one line per student and strategy)."""
    def f(v: float | None, std: float | None = None, digits: int = 3) -> str:
        if v is None:
            return "-"
        return f"{v:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")

    headers = ["images", "student", "strategy", "LRS", "HLR", "IOR", "ARS", "gap with aug", "gap without aug", "seeds"]
    body = [[s["images"], s["student"], s["strategy"], f(s["lrs_mean"], s["lrs_std"]), f(s["hlr_mean"], None, 2),
             f(s["ior_mean"], s["ior_std"], 2), f(s["ars_mean"], s["ars_std"]),
             f(s["with_aug_mean"], s["with_aug_std"], 2), f(s["without_aug_mean"], s["without_aug_std"], 2),
             str(max(s["lrs_seeds"], s["ars_seeds"]))] for s in scores]
    return headers, body



def format_scores(scores: list[dict[str, Any]]) -> str:
    """The fair-scores table for the terminal, under its heading ('' when there is no score)."""
    from hello_ray.tables import text_table

    return "fair scores (DD-Ranking: LRS, ARS)\n" + text_table(*scores_table(scores)) if scores else ""
