"""The spelling of a label strategy, and what each part means.

    spec     := base ["/" N] ["@" modifier] ("+" flag)*
    base     := hard | teacher | stored | projector
    /N       := stored only: LPLD's pool, 1/N of the label batches (``stored/10``)
    @topK    := stored only: LPQLD's top-k labels, the K largest logits of each stored view (fp16)
                and their class ids (int16), replayed as a softmax over the K at the current
                temperature scattered into C zeros (``stored/10@top50``)
    @DTYPE   := projector only: the adapter re-encoded as fp32 | fp16 | int8 and labelling from
                those bytes (``projector@int8``), so each precision is a point with its own accuracy
    +phases  := soft strategies: train in ``evaluate.phases`` (HALD: soft -> hard -> soft)
    +noaug   := online strategies (hard, teacher, projector): no augmentation; every view is the
                whole image, no flip, no CutMix (DD-Ranking's "without augmentation" rows)

The spec is the row's ``strategy`` field and names its label folder, so every variant is its own
row, its own group in the results table and its own point on the frontier.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

BASES = ("hard", "teacher", "stored", "projector")
ADAPTER_DTYPES = ("fp32", "fp16", "int8")
FLAGS = ("phases", "noaug")
_SPEC = re.compile(r"^(?P<base>[a-z]+)(?:/(?P<prune>\d+))?(?:@(?P<mod>[a-z0-9]+))?(?P<flags>(?:\+[a-z]+)*)$")


class StrategySpecError(ValueError):
    """A label strategy spec that does not parse, or combines parts that do not go together."""


@dataclass(frozen=True)
class StrategySpec:
    base: str
    prune: int = 1          # stored/N: keep 1/N of the label batches
    topk: int = 0           # stored@topK: keep K logits per view (0 = all C)
    adapter_dtype: str = ""  # projector@DTYPE ('' = the adapter as the transfer stage wrote it)
    phases: bool = False
    noaug: bool = False

    @property
    def soft(self) -> bool:
        return self.base != "hard"

    @property
    def online(self) -> bool:
        return self.base in ("hard", "teacher", "projector")


def parse_spec(spec: str) -> StrategySpec:
    """``stored/10@top50+phases`` -> StrategySpec(base='stored', prune=10, topk=50, phases=True).

    Raises :class:`StrategySpecError` naming the spec and what is wrong with it."""
    m = _SPEC.match(spec)
    if m is None:
        raise StrategySpecError(f"unknown label strategy {spec!r}: a spec is base[/N][@modifier][+flag]...")
    base, prune, mod = m["base"], m["prune"], m["mod"]
    flags = [f for f in m["flags"].split("+") if f]
    if base not in BASES:
        raise StrategySpecError(f"unknown label strategy {spec!r}: its base {base!r} is not one of {', '.join(BASES)}")
    if prune is not None and (base != "stored" or int(prune) < 1):
        raise StrategySpecError(f"label strategy {spec!r}: only stored/N with integer N >= 1 takes a prune ratio")
    topk, dtype = 0, ""
    if mod is not None:
        if base == "stored":
            if not re.fullmatch(r"top[1-9]\d*", mod):
                raise StrategySpecError(f"label strategy {spec!r}: stored takes @topK (K >= 1), not @{mod}")
            topk = int(mod[3:])
        elif base == "projector":
            if mod not in ADAPTER_DTYPES:
                raise StrategySpecError(f"label strategy {spec!r}: projector takes @{'|@'.join(ADAPTER_DTYPES)}")
            dtype = mod
        else:
            raise StrategySpecError(f"label strategy {spec!r}: {base} takes no @modifier")
    for f in flags:
        if f not in FLAGS:
            raise StrategySpecError(f"label strategy {spec!r}: unknown flag +{f} (one of +{', +'.join(FLAGS)})")
    if len(set(flags)) != len(flags):
        raise StrategySpecError(f"label strategy {spec!r}: a flag is given twice")
    out = StrategySpec(base, int(prune) if prune else 1, topk, dtype, "phases" in flags, "noaug" in flags)
    if out.phases and not out.soft:
        raise StrategySpecError(f"label strategy {spec!r}: +phases alternates soft and hard labels; "
                                "hard labels are hard in every phase")
    if out.noaug and not out.online:
        raise StrategySpecError(f"label strategy {spec!r}: +noaug needs labels made online (hard, teacher, "
                                "projector); stored labels only exist for the augmented views they stored")
    if out.noaug and out.phases:
        raise StrategySpecError(f"label strategy {spec!r}: +phases and +noaug do not combine (the hard "
                                "phase draws fresh augmented views)")
    return out


def parse_strategy(spec: str) -> tuple[str, int]:
    """'stored/10@top5' -> ('stored', 10); 'teacher' -> ('teacher', 1)."""
    s = parse_spec(spec)
    return s.base, s.prune
