"""The stage contract: what a stage module declares, read by the registry, the runner and the preflight.

A stage is ``stages/<name>.py`` (its Ray side), ``stages/<name>_core.py`` (its Ray-free compute) and
``stages/<name>_plan.py`` (how preflight checks, rehearses and prices it). No stage imports
another; nothing above the stages branches on a stage's name: the runner, the preflight and the cost
model read these declarations.

Required in ``stages/<name>.py`` (:data:`REQUIRED`):

- ``STAGE``: its name, the artifact key's prefix;
- ``KIND``: ``train`` (one Ray Train run), ``actors`` (one Ray Data actor pool, sized by
  ``pool(cfg) -> (actors, CPUs each)``) or ``driver`` (the driver's own threads);
- ``INPUTS``: the stages whose artifacts it reads (by role);
- ``stage_config(cfg)``: what keys its artifact; ``check(cfg)``: its pure config rules;
- ``resources(cfg)``: what it holds at once; ``run(cfg, store, key, inputs)`` -> its summary.

Optional, with their defaults (:data:`OPTIONAL`):

- ``DATA_SPLITS`` (``()``): the dataset splits it reads; their fingerprints join its key;
- ``CLASS_NAMES_IN_KEY`` (True): whether the class-name file's fingerprint joins it too;
- ``RESUMES_FROM_FILES`` (False): an unfinished attempt's files are kept to resume from;
- ``source_fingerprint(cfg, store)`` (None): a set read from outside the recipe, fingerprinted
  into its key under its own name;
- ``before_run(cfg, store, known)`` (None): checks at ``Run.start``, before any stage runs;
  what it learns goes into ``known`` for the stages after it;
- ``pool_reads_data(cfg)`` (None): an actor stage's read task beside its pool.

Its plan (``stages/<name>_plan.py``) has ``rehearse(rehearsal, sample)`` and ``work(basis,
rehearsal)``, and where it has them ``check(cfg, store, report, probe_network)``,
``gpu_hours(cfg, classes, train_images, profile, decode_per_cpu, cpus)``, ``PROFILE_SECTIONS``
and ``grid_hours`` / ``format_schedule`` (a schedule block of its own).
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

KINDS = ("train", "actors", "driver")
REQUIRED = ("STAGE", "KIND", "INPUTS", "stage_config", "check", "resources", "run")
OPTIONAL: dict[str, Any] = {"DATA_SPLITS": (), "CLASS_NAMES_IN_KEY": True, "RESUMES_FROM_FILES": False,
                            "source_fingerprint": None, "before_run": None, "pool_reads_data": None}


def declared(stage: ModuleType, name: str) -> Any:
    """``stage``'s declaration ``name``, or the contract's default for an optional one."""
    if name not in OPTIONAL:
        raise KeyError(f"{name!r} is not an optional stage declaration; the optional ones are {sorted(OPTIONAL)}")
    return getattr(stage, name, OPTIONAL[name])


def validate(stage: ModuleType) -> None:
    """A TypeError naming the module and what it lacks, at import of the registry."""
    missing = [n for n in REQUIRED if not hasattr(stage, n)]
    if missing:
        raise TypeError(f"stage module {stage.__name__} lacks {missing} (hello_ray/stages/__init__.py)")
    if stage.KIND not in KINDS:
        raise TypeError(f"stage module {stage.__name__} declares KIND={stage.KIND!r}; one of {KINDS}")
    if stage.KIND == "actors" and not (hasattr(stage, "pool") and hasattr(stage, "pool_reads_data")):
        raise TypeError(f"actor stage {stage.__name__} must declare pool(cfg) and pool_reads_data(cfg)")
