"""The runner: one run of the recipe (``Run``): its artifact keys (config slice plus the data's
fingerprints), each stage's lease, its placement record and its finalize; ``run_stage`` for a tool
that holds a stage module. The recipe (hello_ray/recipe.py) calls it step by step."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator

from hello_ray import lease, placement
from hello_ray.config import Config
from hello_ray.registry import STAGES, check, check_resources, open_run_store
from hello_ray.runtime import ensure_ray
from hello_ray.stages import declared

if TYPE_CHECKING:
    from hello_ray.store import Store

log = logging.getLogger("hello_ray.pipeline")


def run_stage(stage: ModuleType, cfg: Config, store: "Store", inputs: dict[str, str] | None = None) -> str:
    """Run one stage unless its artifact exists; returns the artifact key (tests and tools that
    hold a stage module; the recipe below spells each stage's call out)."""
    run = Run(cfg, store)
    inputs = dict(inputs or {})
    with run.writing(stage, inputs) as key:
        if key:
            run.done(stage, inputs, stage.run(cfg, store, key, inputs))
    return run.keys[stage.STAGE]


class NotFinished(Exception):
    """A dry run (``Run.dry``) met a stage whose artifact is not finished yet."""


@dataclass
class Run:
    """One run of the recipe: its config, its store and the artifact keys known so far (by stage;
    "images" is the distilled set evaluate reads: the refined one, or the selection).

    ``dry``: only derive keys; a stage whose artifact is not finished raises :class:`NotFinished`
    instead of taking its lease (:func:`finished_result` walks the recipe so, without Ray).
    ``stage_s``: each stage's wall seconds in this run, None for one found finished."""
    cfg: Config
    store: "Store"
    keys: dict[str, str] = field(default_factory=dict)
    _started: dict[str, float] = field(default_factory=dict)
    _leases: dict[str, lease.Lease] = field(default_factory=dict)
    fingerprints: dict[str, dict[str, Any]] = field(default_factory=dict)  # by split name, once per run
    stage_s: dict[str, float | None] = field(default_factory=dict)
    dry: bool = False

    @classmethod
    def start(cls, cfg: Config, store: "Store | None" = None) -> "Run":
        """Checks first (config, then the cluster's room for every stage), then the store."""
        check(cfg)
        ensure_ray(cfg.compute)
        check_resources(cfg)
        run = cls(cfg, store if store is not None else open_run_store(cfg))
        # What each stage reads besides the recipe's artifacts, checked now (listings only, no image
        # read): a mismatch fails before the teachers train. In recipe order, each stage's findings
        # passed on in ``known``.
        known: dict[str, Any] = {}
        for stage in STAGES:
            before = declared(stage, "before_run")
            if before is not None:
                before(cfg, run.store, known)
        return run

    def needs(self, stage: ModuleType, inputs: dict[str, str]) -> bool:
        """Derive the stage's key (into ``keys``); True when its artifact is not finished yet, and
        then this run holds the key's lease (released by ``done``/``release``).

        Another driver writing the key: wait for it (one log line naming it) and reuse what it
        finishes, take over if its lease expires (it died), or with ``compute.lease_wait=false``
        raise :class:`hello_ray.lease.LeaseHeld`."""
        if set(inputs) != set(stage.INPUTS):
            raise ValueError(f"stage {stage.STAGE} takes the inputs {sorted(stage.INPUTS)}, got {sorted(inputs)}")
        key = self.store.artifact_key(stage.STAGE, self.stage_config(stage), inputs)
        known = self.keys.get(stage.STAGE) == key
        self.keys[stage.STAGE] = key
        if self.store.exists(key):
            if not known:
                self.store.check_reuse(key)  # another manifest format is refused, by name
                log.info("[%s] cached: %s", stage.STAGE, self.store.uri_for(key))
                self.stage_s.setdefault(stage.STAGE, None)
            return False
        if self.dry:
            raise NotFinished(stage.STAGE)
        held = lease.acquire(self.store, key, stage.STAGE, ttl=self.cfg.compute.lease_ttl_s,
                             wait=self.cfg.compute.lease_wait, finished=lambda: self.store.exists(key),
                             logger=log)
        if held is None:
            log.info("[%s] reused, finished by another driver: %s", stage.STAGE, self.store.uri_for(key))
            return False
        self._leases[stage.STAGE] = held
        # Writes into the key (here and in the stage's workers, which get pickled copies of the
        # store) check the lease first: a writer whose lease was taken over stops.
        self.store.fences = {**self.store.fences, key: held.fence()}
        try:
            prep = lease.prepare_key(self.store, key, resumable=declared(stage, "RESUMES_FROM_FILES"))
        except BaseException:
            self.release(stage)
            raise
        if prep["removed"] or prep["partials"] or prep["kept"]:
            log.info("[%s] unfinished attempt found: %s", stage.STAGE,
                     f"kept its {prep['kept']} files to resume from" if prep["resumes_ray_run"] else
                     f"removed its {prep['removed']} files and {prep['partials']} temp files")
        log.info("[%s] running -> %s", stage.STAGE, self.store.uri_for(key))
        placement.begin(key)  # the stage's workers report their nodes under its key
        self._started[stage.STAGE] = time.perf_counter()
        return True

    def stage_config(self, stage: ModuleType) -> dict[str, Any]:
        """What keys ``stage``'s artifact: its ``stage_config``, plus under "dataset" the fingerprint
        of every split it reads. The class-name file enters only for stages that key on names
        (``CLASS_NAMES_IN_KEY``, default True): the teachers learn label indices, not names."""
        from hello_ray.data.fingerprint import split_fingerprint

        config = stage.stage_config(self.cfg)
        roles = declared(stage, "DATA_SPLITS")
        if roles:
            data = self.cfg.data
            dataset = {}
            for role in roles:
                name = {"train": data.train_split, "val": data.val_split}[role]
                if name not in self.fingerprints:
                    self.fingerprints[name] = split_fingerprint(data, name, self.store)
                fp = dict(self.fingerprints[name])
                if not declared(stage, "CLASS_NAMES_IN_KEY"):
                    fp.pop("class_file")
                dataset[role] = fp
            config["dataset"] = dataset
        if declared(stage, "source_fingerprint"):  # a set read from outside the recipe
            name = f"source:{stage.STAGE}"
            if name not in self.fingerprints:
                self.fingerprints[name] = stage.source_fingerprint(self.cfg, self.store)
            config[stage.STAGE] = self.fingerprints[name]
        return config

    def done(self, stage: ModuleType, inputs: dict[str, str], summary: dict[str, Any] | None) -> None:
        """Finalize the stage's artifact: the manifest is written last, here, so a stage that dies
        half-way leaves nothing that readers would take for a finished artifact. Only while this
        run still holds the key's lease (LeaseLost otherwise); the lease is released after."""
        key = self.keys[stage.STAGE]
        held = self._leases.get(stage.STAGE)
        try:
            if held is None:
                raise lease.LeaseLost(f"[{stage.STAGE}] {key}: finalize without the key's lease "
                                      "(Run.needs takes it)")
            held.check()
            wall = time.perf_counter() - self._started.pop(stage.STAGE)
            config = self.stage_config(stage)
            summary = {**(summary or {}), "wall_s": round(wall, 2), "writer": held.record()}
            nodes = placement.collect(key)  # {role: Ray node ids} of its workers, actors and tasks
            if nodes:
                summary["nodes"] = nodes
            if "dataset" in config:
                summary["dataset"] = config["dataset"]
            self.store.finalize(key, stage.STAGE, config, inputs, summary)
        finally:
            self.release(stage)
        self.stage_s[stage.STAGE] = wall
        log.info("[%s] done in %.1f s: %s", stage.STAGE, wall, self.store.uri_for(key))

    def release(self, stage: ModuleType) -> None:
        """Give up the stage's lease if this run holds it (after done, or after a failure)."""
        held = self._leases.pop(stage.STAGE, None)
        if held is None:
            return
        self.store.fences = {k: f for k, f in self.store.fences.items() if k != held.key}
        held.release()

    @contextmanager
    def writing(self, stage: ModuleType, inputs: dict[str, str]) -> Iterator[str | None]:
        """``needs`` as a block: yields the key to compute (lease held), or None when the artifact
        is finished; the lease is released however the block ends."""
        todo = self.needs(stage, inputs)
        try:
            yield self.keys[stage.STAGE] if todo else None
        finally:
            self.release(stage)
