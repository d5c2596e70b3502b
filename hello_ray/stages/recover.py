"""Stage ``recover``: distilled images synthesised from the observer (``images.source`` sre2l | lpld).

The second image source beside RDED's selection: SRe2L's recover (VILA-Lab/SRe2L @ 8d00cba
``SRe2L/recover/data_synthesis.py``) and LPLD's class-wise recover (he-y/soft-label-pruning-for-
dataset-distillation @ 63eee18 ``recover/data_synthesis_class.py``). The math is
:mod:`hello_ray.stages.recover_core`; this module feeds and scales it:

1. *class statistics* (lpld only) - one Ray Data pass over the training split (the select stage's
   readers and decoding: images at ``data.image_size``, ``data.max_per_class`` and
   ``data.on_corrupt`` apply) through ``ClassStatsActor`` actors, each emitting per batch the
   count, sum and sum of squares per class present and per BN layer; the driver adds them up
   exactly (memory: classes x BN channels, never images) and stores ``class_stats.pt``.
2. *recover* - the batches (``recover_core.plan_units``: one class each for lpld, ``batch_size``
   classes of one image each for sre2l) are spread over ``RecoverActor`` actors (one GPU each
   with ``compute.use_gpu``), ``recover.classes_per_step`` batches per actor call (lpld), which
   the actor optimises together, one forward pass per iteration (``recover_core.recover_step``).
   Each finished batch writes its PNGs, then its marker ``done/unit_{i:05d}.json`` (its
   objective's first and last iteration, BN term, seconds: its share of its step).
3. *index* (driver) - once every batch has its marker: ``index.parquet`` and ``imageset.json``.

Resume: a batch whose marker exists is never redone, by the driver (a re-run after a crash submits
only batches without one) nor by an actor (a restarted actor retrying a batch skips it), and the
statistics file is reused. Every batch's draws are seeded by (seed, variant, its slots), so a
redone batch gives the same pixels.
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import json
import logging
import os
import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from hello_ray import placement
from hello_ray.config import Config, ConfigError, data_identity, section_dict
from hello_ray.stages import recover_core as core

log = logging.getLogger("hello_ray.recover")

STAGE = "recover"
KIND = "actors"  # one Ray Data actor pool, sized by pool(cfg) (hello_ray/stages/__init__.py)
INPUTS = ("teachers",)  # the observer; for lpld the real training images come from cfg.data
# The training split's fingerprint joins the key (pipeline.Run.stage_config): lpld reads the split;
# sre2l's images change with it anyway, through the teachers they are recovered from. The names
# come from the trajectory or data.class_names, not from a class-name file.
DATA_SPLITS = ("train",)
CLASS_NAMES_IN_KEY = False
# A re-run keeps what an earlier attempt wrote: each finished batch left its PNGs and then a marker
# (done/unit_NNNNN.json), and only unmarked batches are redone (pipeline.Run.needs, lease.prepare_key).
RESUMES_FROM_FILES = True
SOURCES = core.VARIANTS  # the images.source values this stage serves
# Fields that change how fast the stage runs, not its images: left out of the artifact key.
# classes_per_step changes no draw and no objective, only float rounding (convolutions at another
# batch size, which Adam can amplify in a few pixels: recover_core's docstring); in the key it
# would also re-key every finished recover artifact.
_RUNTIME_FIELDS = ("num_actors", "actor_cpus", "stats_batch_size", "classes_per_step")
STATS_FILE = "class_stats.pt"


def marker_name(unit: int) -> str:
    """The file saying batch ``unit`` is finished (written after its images)."""
    return f"done/unit_{unit:05d}.json"


def stage_config(cfg: Config) -> dict[str, Any]:
    """What decides the synthesised images (the observer comes via inputs); lpld's class
    statistics also depend on the training data."""
    rec = {k: v for k, v in section_dict(cfg.recover).items() if k not in _RUNTIME_FIELDS}
    out: dict[str, Any] = {"source": cfg.images.source, "ipc": cfg.select.ipc,
                           "image_size": cfg.data.image_size, "recover": rec,
                           "observer": cfg.teachers.observer,
                           "class_names": json.loads(json.dumps(cfg.data.class_names))}  # list or mapping
    if cfg.images.source == "lpld":
        out["data"] = {k: v for k, v in data_identity(cfg.data).items() if k != "val_split"}
    return out


def has_batchnorm(model_name: str, image_size: int) -> bool:
    """Whether zoo model ``model_name`` has BatchNorm2d layers (built on the meta device: no memory,
    no compute)."""
    from hello_ray.models.zoo import build_model

    with torch.device("meta"):
        model = build_model(model_name, 2, image_size)
    return any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def check(cfg: Config) -> None:
    """Rules decidable from the config alone: an observer with BatchNorm, a jitter below the side,
    several classes per step only where a batch holds one class (lpld)."""
    if cfg.images.source not in SOURCES:
        return
    rc, size = cfg.recover, cfg.data.image_size
    if cfg.images.source == "sre2l" and rc.classes_per_step != 1:
        raise ConfigError(f"config key 'recover.classes_per_step': {rc.classes_per_step} with images.source=sre2l; "
                          "it packs lpld's one-class batches into one forward pass, and an sre2l batch already "
                          "holds recover.batch_size classes (SRe2L: 100): set it to 1")
    if rc.jitter >= size:
        raise ConfigError(f"config key 'recover.jitter': {rc.jitter} must be smaller than data.image_size "
                          f"({size}); a circular shift by the whole side is no shift (32 at 224 px)")
    model = "resnet18" if cfg.teachers.observer == "torchvision" else cfg.teachers.model
    if not has_batchnorm(model, size):
        raise ConfigError(f"config key 'teachers.model': images.source={cfg.images.source} matches the "
                          f"observer's BatchNorm statistics, and {model} has no BatchNorm2d layer; use a "
                          "teacher with BatchNorm (resnet18, mobilenet_v2, ...) or images.source=rded")


def pool(cfg: Config) -> tuple[int, float]:
    """The actor pool: (actors, CPUs each). Its bundles, start-up and cores are priced from it."""
    return cfg.recover.num_actors, cfg.recover.actor_cpus


def pool_reads_data(cfg: Config) -> bool:
    """Whether a Ray Data read task runs beside the actor pool: lpld's per-class statistics pass."""
    return cfg.images.source == "lpld"


def resources(cfg: Config) -> dict[str, float]:
    """What the stage holds at once: its actors, and for lpld's statistics pass a read task."""
    rc = cfg.recover
    read = cfg.data.cpus_per_task if pool_reads_data(cfg) else 0.0
    return {"CPU": rc.num_actors * rc.actor_cpus + read,
            "GPU": float(rc.num_actors) if cfg.compute.use_gpu else 0.0}


# ---------------------------------------------------------------------------- Ray actors

class ClassStatsActor:
    """Ray Data actor: loads the observer once; a batch of decoded images {"image" uint8 [N,S,S,3],
    "label" [N]} -> one row per class present: label, count [L], sum / sumsq [sum F_l] (float64)."""

    def __init__(self, store: Any, teachers_key: str, num_classes: int, use_gpu: bool, observer: str = "last"):
        from hello_ray.models.ensemble import load_observer
        from hello_ray.runtime import quiet_library_logs, torch_device

        quiet_library_logs(worker=True)
        placement.record("ClassStatsActor")  # the node it runs on: the manifest's summary["nodes"]
        self.device = torch_device(use_gpu)
        self.observer = load_observer(store, teachers_key, self.device, observer=observer)
        self.layers = core.bn_layers(self.observer)
        self.num_classes = num_classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from hello_ray.data.augment import to_float

        stats = core.ClassStats.empty(self.num_classes, self.layers)
        x = to_float(torch.from_numpy(np.ascontiguousarray(batch["image"]))).to(self.device)  # [N,3,S,S]
        core.observe_batch(self.observer, x, torch.as_tensor(np.asarray(batch["label"], dtype=np.int64)), stats)
        return stats.rows()


class RecoverActor:
    """Ray Data actor: loads the observer (and lpld's class statistics) once; each row names a batch
    of the plan. The unfinished batches of a call are synthesised ``classes_per_step`` at a time in
    one forward pass per iteration (equal-sized ones together), then each is stored (PNGs, then
    its marker) and reported."""

    def __init__(self, store: Any, key: str, teachers_key: str, variant: str, settings: dict[str, Any],
                 seed: int, ipc: int, batch_size: int, class_names: list[str], image_size: int, use_gpu: bool,
                 observer: str = "last", classes_per_step: int = 1):
        from hello_ray.models.ensemble import load_observer
        from hello_ray.runtime import quiet_library_logs, torch_device

        quiet_library_logs(worker=True)
        placement.record("RecoverActor")  # the node it runs on: the manifest's summary["nodes"]
        self.device = torch_device(use_gpu)
        self.observer = load_observer(store, teachers_key, self.device, observer=observer)
        self.stats = _load_stats(store, key) if variant == "lpld" else None
        self.units = core.plan_units(variant, len(class_names), ipc, batch_size)
        self.store, self.key, self.variant, self.seed, self.ipc = store, key, variant, seed, ipc
        self.settings = core.RecoverSettings(**settings)
        self.class_names, self.image_size = class_names, image_size
        self.classes_per_step = classes_per_step

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        indices = [int(i) for i in batch["unit"]]
        rows = {i: self._finished(i) for i in indices}
        todo = [self.units[i] for i in indices if rows[i] is None]
        for step in core.plan_steps(todo, self.classes_per_step):
            rows.update(self._step(step))
        return {k: np.asarray([rows[i][k] for i in indices]) for k in MARKER_NUMBERS + ("unit", "resumed")}

    def _finished(self, index: int) -> dict[str, Any] | None:
        """Batch ``index``'s marker if it is finished (kept, not redone), else None."""
        from hello_ray.store import ArtifactNotFound

        try:  # one object, not a listing of the whole image set (50k PNGs on ImageNet)
            return {**json.loads(self.store.get_bytes(self.key, marker_name(index))), "resumed": True}
        except ArtifactNotFound:
            return None

    def _step(self, step: list[core.Unit]) -> dict[int, dict[str, Any]]:
        """Synthesise ``step``'s batches together; store each one's PNGs, then its marker."""
        from hello_ray.data.imageset import image_name
        from hello_ray.data.images import encode_png

        out = core.recover_step(
            self.observer, [torch.tensor([c for c, _ in u.slots]) for u in step],
            [core.unit_targets(self.variant, u, self.observer, self.stats, self.class_names) for u in step],
            self.settings, [core.unit_seed(self.seed, self.variant, u) for u in step], self.image_size,
            self.device, [core.describe_unit(u, self.class_names) for u in step])
        files = [(image_name(j), res.images[k].numpy()) for u, res in zip(step, out)
                 for k, j in enumerate(u.image_indices(self.ipc))]
        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda f: self.store.put_bytes(self.key, f[0], encode_png(f[1])), files))
        rows = {}
        for unit, res in zip(step, out):  # every PNG of the step is stored: now the markers
            marker = {"unit": unit.index, "classes": unit.classes, "slots": [list(s) for s in unit.slots],
                      "iterations": len(res.objective),
                      "objective_first": res.objective[0], "objective_last": res.objective[-1],
                      "bn_first": res.bn[0], "bn_last": res.bn[-1], "ce_first": res.ce[0], "ce_last": res.ce[-1],
                      "seconds": round(res.seconds, 3), "step_units": len(step), "pid": os.getpid(),
                      "device": str(self.device)}
            self.store.put_bytes(self.key, marker_name(unit.index), json.dumps(marker, indent=1).encode())
            rows[unit.index] = {**marker, "resumed": False}
        return rows


MARKER_NUMBERS = ("objective_first", "objective_last", "bn_first", "bn_last", "ce_first", "ce_last", "seconds")


def _load_stats(store: Any, key: str) -> core.ClassStats:
    state = torch.load(io.BytesIO(store.get_bytes(key, STATS_FILE)), map_location="cpu", weights_only=True)
    return core.ClassStats.from_state(state)


# ---------------------------------------------------------------------------- driver

def run(cfg: Config, store: Any, key: str, inputs: dict[str, str]) -> dict[str, Any]:
    """Synthesise the image set of artifact ``key`` (resuming finished batches); return the summary.
    A DataError raised in a Ray task (a corrupt image with ``data.on_corrupt=fail``) comes back as
    itself."""
    from hello_ray.data.errors import data_errors

    with data_errors():
        return _run(cfg, store, key, inputs)


def _run(cfg: Config, store: Any, key: str, inputs: dict[str, str]) -> dict[str, Any]:
    from hello_ray.data.imageset import write_image_set_index
    from hello_ray.formats.trajectory import load_trajectory
    from hello_ray.models.ensemble import check_observer

    variant, rc, ipc, size = cfg.images.source, cfg.recover, cfg.select.ipc, cfg.data.image_size
    if variant not in SOURCES:
        raise ConfigError(f"config key 'images.source': {variant!r} is not a recover source ({', '.join(SOURCES)})")
    traj = load_trajectory(store, inputs["teachers"])
    check_observer(store, inputs["teachers"], cfg.teachers.observer)  # here, not in every actor
    # data.class_names renames without retraining (names are not in the teachers key); a mapping
    # resolves by the split's class keys, which only a listing of the split knows.
    split = None
    if variant == "lpld" or cfg.data.class_names:
        from hello_ray.data.sources import load_split

        split = load_split(cfg.data, cfg.data.train_split, store)
    names = list(split.class_names) if cfg.data.class_names else list(traj["class_names"])
    if len(names) != int(traj["num_classes"]):
        raise ConfigError(f"config key 'data.class_names': {len(names)} names for the {traj['num_classes']} "
                          f"classes of teachers artifact {inputs['teachers']}")
    if int(traj["image_size"]) != size:
        raise ValueError(f"recover {key}: the observer of {inputs['teachers']} takes {traj['image_size']} px "
                         f"images but data.image_size is {size}")
    units = core.plan_units(variant, len(names), ipc, rc.batch_size)
    t0 = time.perf_counter()
    phase: dict[str, float] = {}
    files = set(store.list_files(key))
    stats_state, corrupt = "none", None
    if variant == "lpld":
        from hello_ray.data.corrupt import corrupt_summary

        corrupt = corrupt_summary({"train": split}, cfg.data, store)  # before the statistics pass
        stats_state = "reused" if STATS_FILE in files else "computed"
        if STATS_FILE not in files:
            _class_stats_pass(cfg, store, key, inputs["teachers"], names, split)
        phase["class_stats"] = time.perf_counter() - t0
    finished = {u.index for u in units if marker_name(u.index) in files}
    # Equal-sized batches next to each other: the actors pack them into steps (core.plan_steps).
    pending = [u.index for u in sorted(units, key=lambda u: (len(u.slots), u.index)) if u.index not in finished]
    if finished:
        log.info("[recover] resuming: %d of %d batches already finished", len(finished), len(units))
    if pending:
        _recover_pass(cfg, store, key, inputs["teachers"], names, pending, len(units))
    phase["recover"] = time.perf_counter() - t0 - sum(phase.values())

    markers = _read_markers(store, key, units)
    index = pd.DataFrame([{"image": c * ipc + k, "class": c, "k": k, "unit": u.index}
                          for u in units for c, k in u.slots]).sort_values("image", ignore_index=True)
    settings = {k: getattr(rc, k) for k in ("iterations", "lr", "r_bn", "first_bn_multiplier", "jitter",
                                           "batch_size", "seed")}
    summary = _summary(variant, markers, units, names, ipc)
    summary.update(units_resumed=len(finished), units_recovered=len(pending), class_stats=stats_state,
                   seconds=round(time.perf_counter() - t0, 2), phase_s={p: round(v, 2) for p, v in phase.items()})
    if corrupt is not None:
        summary["corrupt"] = corrupt
    meta = {"image_source": variant, "ipc": ipc, "parent": inputs["teachers"], "seed": rc.seed,
            "recover": {**settings, "objective_first": summary["objective_first"],
                        "objective_last": summary["objective_last"]}}
    write_image_set_index(store, key, np.repeat(np.arange(len(names)), ipc), names, size, index, meta)
    log.info("[recover] %s: %d images (%d classes x %d), objective %.4g -> %.4g (BN term %.4g -> %.4g), "
             "%.2f s per batch, %d of %d batches resumed, in %.1f s", variant, len(names) * ipc, len(names), ipc,
             summary["objective_first"], summary["objective_last"], summary["bn_first"], summary["bn_last"],
             summary["seconds_per_unit"], len(finished), len(units), summary["seconds"])
    return summary


def _class_stats_pass(cfg: Config, store: Any, key: str, teachers_key: str, names: list[str], split: Any) -> None:
    """lpld: per-class BN statistics of the training split, a Ray Data pass reduced on the driver."""
    import ray.data

    from hello_ray.data.decode import decoded_split
    from hello_ray.data.errors import EmptyClassError
    from hello_ray.models.ensemble import load_observer

    rc, data = cfg.recover, cfg.data
    if len(split.class_names) != len(names):
        raise ValueError(f"recover {key}: the training split of {split.source} has {len(split.class_names)} "
                         f"classes but the observer {teachers_key} was trained on {len(names)}")
    t0 = time.perf_counter()
    stats = core.ClassStats.empty(len(names), core.bn_layers(load_observer(store, teachers_key,
                                                                            observer=cfg.teachers.observer)))
    parts = decoded_split(split, data, batch_size=rc.stats_batch_size, columns=["image", "label"]).map_batches(
        ClassStatsActor, batch_format="numpy", batch_size=rc.stats_batch_size,
        compute=ray.data.ActorPoolStrategy(size=rc.num_actors),
        num_cpus=rc.actor_cpus, num_gpus=1 if cfg.compute.use_gpu else 0,
        fn_constructor_kwargs=dict(store=store, teachers_key=teachers_key, num_classes=len(names),
                                   use_gpu=cfg.compute.use_gpu, observer=cfg.teachers.observer))
    for part in parts.iter_batches(batch_size=None, batch_format="numpy"):
        stats.add_rows(part)
    seen = stats.images_per_class()
    for c in range(len(names)):
        if float(seen[c]) == 0:  # listed images, all undecodable (an empty class fails at listing)
            raise EmptyClassError(names[c], f"{split.source} (class index {c}, train split: no decodable image "
                                  "to compute its BatchNorm statistics from)")
    buf = io.BytesIO()
    torch.save(stats.state(), buf)
    store.put_bytes(key, STATS_FILE, buf.getvalue())
    log.info("[recover] class statistics of %s images over %d BN layers in %.1f s", split.num_rows or "?",
             len(stats.layer_names), time.perf_counter() - t0)


def _recover_pass(cfg: Config, store: Any, key: str, teachers_key: str, names: list[str],
                  pending: list[int], total: int) -> None:
    """The pending batches on an actor pool, ``recover.classes_per_step`` per actor call (one
    forward pass per iteration for all of them); each one's line is logged as it finishes."""
    import ray.data

    rc = cfg.recover
    settings = {k: getattr(rc, k) for k in ("iterations", "lr", "r_bn", "first_bn_multiplier", "jitter")}
    ds = ray.data.from_items([{"unit": i} for i in pending], override_num_blocks=len(pending))
    out = ds.map_batches(
        RecoverActor, batch_format="numpy", batch_size=rc.classes_per_step,
        compute=ray.data.ActorPoolStrategy(size=rc.num_actors),
        num_cpus=rc.actor_cpus, num_gpus=1 if cfg.compute.use_gpu else 0,
        fn_constructor_kwargs=dict(store=store, key=key, teachers_key=teachers_key, variant=cfg.images.source,
                                   settings=settings, seed=rc.seed, ipc=cfg.select.ipc, batch_size=rc.batch_size,
                                   class_names=names, image_size=cfg.data.image_size,
                                   use_gpu=cfg.compute.use_gpu, observer=cfg.teachers.observer,
                                   classes_per_step=rc.classes_per_step))
    units = core.plan_units(cfg.images.source, len(names), cfg.select.ipc, rc.batch_size)
    done = 0
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        for j, i in enumerate(b["unit"]):
            done += 1
            log.info("[recover] %d/%d %s: objective %.4g -> %.4g, BN term %.4g -> %.4g, %.1f s%s", done,
                     len(pending), core.describe_unit(units[int(i)], names), b["objective_first"][j],
                     b["objective_last"][j], b["bn_first"][j], b["bn_last"][j], b["seconds"][j],
                     " (finished before, kept)" if b["resumed"][j] else "")


def _read_markers(store: Any, key: str, units: list[core.Unit]) -> list[dict[str, Any]]:
    files = set(store.list_files(key))
    missing = [u.index for u in units if marker_name(u.index) not in files]
    if missing:
        raise RuntimeError(f"recover {key}: {len(missing)} of {len(units)} batches have no marker after the "
                           f"recover pass (first: {missing[:5]}); re-run to finish them")
    with cf.ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda u: json.loads(store.get_bytes(key, marker_name(u.index))), units))


def _summary(variant: str, markers: list[dict[str, Any]], units: list[core.Unit], names: list[str],
             ipc: int) -> dict[str, Any]:
    """Means over batches of the objective (and BN term, CE) at the first and last iteration, per
    class for lpld, and the seconds per batch."""
    def mean(k: str, ms: list[dict[str, Any]] = markers) -> float:
        return float(np.mean([m[k] for m in ms]))

    out: dict[str, Any] = {"variant": variant, "num_images": len(names) * ipc, "units": len(units),
                           "iterations": markers[0]["iterations"],
                           **{k: round(mean(k), 6) for k in MARKER_NUMBERS if k != "seconds"},
                           "seconds_per_unit": round(mean("seconds"), 3)}
    if variant == "lpld":
        per: dict[str, list[float]] = {}
        for c, name in enumerate(names):
            mine = [m for m in markers if m["classes"] == [c]]
            per[name] = [round(mean(k, mine), 6) for k in ("objective_first", "objective_last", "bn_first", "bn_last")]
        out["per_class"] = per  # [objective first, last, BN term first, last]
    return out
