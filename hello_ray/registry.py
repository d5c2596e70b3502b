"""The stage registry: every stage module in recipe order, which of them a config runs, their
config checks and their resource asks, and the run's store. Below the runner, the preflight and the
report, which all read it; above the stages, which know nothing of one another.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from hello_ray import launcher, placement
from hello_ray.config import Config
from hello_ray.stages import evaluate, external, recover, refine, select, teachers, transfer, validate

if TYPE_CHECKING:
    from hello_ray.store import Store

STAGES: tuple[ModuleType, ...] = (teachers, select, recover, external, transfer, refine, evaluate)  # recipe order

# What a stage declares (hello_ray/stages/__init__.py: its KIND, how it runs on Ray, and the rest),
# checked here once; the runner, the preflight's resource asks, cost model and rehearsal read the
# declarations, never a stage's name.
for _s in STAGES:
    validate(_s)



def plan(stage: ModuleType) -> ModuleType:
    """How preflight checks, rehearses and prices ``stage``: its module ``<stage>_plan`` (``rehearse``
    and ``work``; ``check`` and ``gpu_hours`` where it has them). Found by name, so a stage's plan
    lives beside it and nothing else lists it."""
    return importlib.import_module(f"{stage.__name__}_plan")


def by_name(name: str) -> ModuleType:
    """The registered stage module named ``name`` (a KeyError names the registered ones)."""
    for s in STAGES:
        if s.STAGE == name:
            return s
    raise KeyError(f"no stage {name!r}; the stages are {[s.STAGE for s in STAGES]}")


def check(cfg: Config) -> None:
    """Every stage's pure ``check`` (no I/O, no compute): a bad value fails here, in seconds,
    naming its key, before Ray starts or the store is written."""
    for stage in active_stages(cfg):
        stage.check(cfg)


def active_stages(cfg: Config) -> list[ModuleType]:
    """The stages a full run executes, in order: the image source ``images.source`` names (select
    for rded, recover for sre2l / lpld, external for external), refine only when enabled."""
    image_stage = {"rded": select, "external": external}.get(cfg.images.source, recover)
    skip = {select, recover, external} - {image_stage}
    if not cfg.refine.enabled:
        skip.add(refine)
    return [s for s in STAGES if s not in skip]


def check_resources(cfg: Config) -> None:
    """Each stage's ask against what the (local) Ray has, before the first stage starts."""
    launcher.check_resources({s.STAGE: s.resources(cfg) for s in active_stages(cfg)}, cfg.compute)
    placement.check_cluster_store(cfg.store, cfg.store_shared)  # a local store on many nodes: refused


def open_run_store(cfg: Config, check: bool = True) -> "Store":
    """The run's store; ``check=False`` neither reaches nor creates it yet (a read-only look)."""
    from hello_ray.store import open_store

    return open_store(cfg.store, cfg.s3_endpoint or None, check=check, timeout=cfg.s3_timeout,
                      max_attempts=cfg.s3_max_attempts)
