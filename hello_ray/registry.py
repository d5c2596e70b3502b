"""The stage registry: every stage module in recipe order, which of them a config runs, their
config checks and their resource asks, and the run's store. Below the runner, the preflight and the
report, which all read it; above the stages, which know nothing of one another.
"""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from hello_ray import launcher, placement
from hello_ray.config import Config
from hello_ray.stages import evaluate, external, recover, refine, select, teachers, transfer

if TYPE_CHECKING:
    from hello_ray.store import Store

STAGES: tuple[ModuleType, ...] = (teachers, select, recover, external, transfer, refine, evaluate)  # recipe order

# What a stage declares beside its STAGE name: its KIND, how it runs on Ray. The preflight's resource
# asks, cost model and rehearsal read these lists, never a stage's name.
KINDS = ("train", "actors", "driver")  # one Ray Train run | one Ray Data actor pool | the driver alone
for _s in STAGES:
    if getattr(_s, "KIND", None) not in KINDS:
        raise TypeError(f"stage module {_s.__name__} declares KIND={getattr(_s, 'KIND', None)!r}; one of {KINDS}")
TRAIN_STAGES = tuple(s.STAGE for s in STAGES if s.KIND == "train")
ACTOR_STAGES = tuple(s.STAGE for s in STAGES if s.KIND == "actors")



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
