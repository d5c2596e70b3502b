"""Stage 5 and 6 of METHOD.md: students trained on the distilled images, every label strategy.

Reads an image-set artifact (select or refine output), the teachers artifact and the transfer
artifact; writes ``results.parquet`` + ``results.json`` (one row per student, strategy, seed, plus
the floor and continual rows) and, for stored strategies, the relabelled views under ``labels/``.

The whole grid runs inside ONE Ray Train ``TorchTrainer``: small students start in seconds while a
trainer costs ~10 s to start, so one trainer amortises it. ``evaluate.parallel``: ``queue`` trains
each row whole on one worker, the rows handed out longest first from a queue (``evaluate_queue``;
each finished row is written to the store at once, and a restart queues only the rows without a
record); ``ddp`` trains one row at a time over every worker (each finished row is checkpointed; a
restarted run, same artifact key = same run name, skips the rows it already has); ``auto`` picks
queue when the rows fill the workers.

Rows:
- ``(student, strategy, seed)`` for every strategy of ``evaluate.strategies``;
- ``floor``: random real training images (as many per class as the distilled set, seeded) with
  hard labels, the baseline any distilled set must beat;
- ``full`` (``evaluate.full_data``): the whole real training set with hard labels, DD-Ranking's
  A(full, hard) for the Label Robust Score;
- continual (GDumb, class-incremental): classes split in natural order into S steps; after step k
  a fresh ``students[0]`` trains on the distilled images of the classes seen so far and is scored
  on their real validation images (argmax over the seen classes, as GDumb masks the rest).
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hello_ray import launcher, placement
from hello_ray.config import Config, ConfigError, data_identity, section_dict
from hello_ray.formats.results import read_row_records, write_results  # the results format
from hello_ray.config.evaluate import parse_phases
from hello_ray.scores import fair_scores
from hello_ray.labels import (HardLabels, LabelStrategy, ProjectorLabels, RelabelPlan, StoredLabels, TeacherLabels,
                              meta_file, parse_spec, parse_strategy, prune_stored, relabel, stored_name, top_k_stored,
                              write_stored_meta)
from hello_ray.stages.evaluate_inputs import (  # noqa: F401 (Run.start and the tests use them here)
    FLOOR_SPARE, _uses_teacher, check_imported_labels, check_sources, check_stored_labels, load_full, pick_floor,
    sample_floor, validate_inputs)
from hello_ray.measure import PeakMemory
from hello_ray.stages.evaluate_core import (TrainSettings, nhwc_to_nchw, top1_counts,
                                            train_student)
from hello_ray.stages.evaluate_queue import RowQueue, busy_fraction, plan_parallel, queue_rows, row_cost, row_line

STAGE = "evaluate"
KIND = "train"  # one Ray Train run (launcher.fit; hello_ray/stages/__init__.py)
INPUTS = ("images", "teachers", "transfer")  # the distilled set; the labellers' sources
DATA_SPLITS = ("train", "val")  # their fingerprints join the key (pipeline.Run.stage_config)
log = logging.getLogger("hello_ray.evaluate")
ROWS_FILE = "rows.json"


# Keys added after evaluate artifacts existed: at their defaults they stay out of the key, so runs that
# do not use them keep the keys they had (the imported labels; LPQLD/HALD/DD-Ranking's keys).
ADDED_KEYS = ("stored_labels", "temperature_schedule", "student_temperature", "phases", "label_smoothing",
              "full_data", "full_top1", "score_scale", "score_weight")


def stage_config(cfg: Config) -> dict[str, Any]:
    """Data + evaluate sections, and where the teacher labels come from when a strategy uses them:
    the teacher window, or the observer (``teachers.observer``)."""
    ev = section_dict(cfg.evaluate)
    defaults = section_dict(type(cfg.evaluate)())
    for k in ADDED_KEYS:
        if ev[k] == defaults[k]:
            ev.pop(k)
    ev.pop("loss_check_every")  # how often the host looks, not what is trained
    ev.pop("gpus_per_row")      # where rows run, not what they train
    out = {"data": data_identity(cfg.data), "evaluate": ev}
    if _uses_teacher(cfg):
        if cfg.evaluate.teacher_labels == "window":
            out["teacher_window"] = {"window": cfg.transfer.teacher_window, "n": cfg.transfer.n_teachers}
        else:
            out["observer"] = cfg.teachers.observer
    return out


def check(cfg: Config) -> None:
    """Rules decidable from the config alone: something to train, a batch every worker shares
    (DDP rows), and continual steps that fit the named classes (when class names are given)."""
    ev = cfg.evaluate
    if not ev.strategies and not ev.continual_steps:
        raise ConfigError("config key 'evaluate.strategies': name at least one label strategy "
                          "(hard, teacher, stored, stored/N, projector)")
    if plan_parallel(cfg)[0] == "ddp":  # evaluate.parallel=auto resolved
        launcher.check_batch_split("evaluate.batch_size", ev.batch_size, cfg.compute)
    if cfg.data.class_names:
        check_continual(ev.continual_steps, len(cfg.data.class_names))


def check_continual(steps: list[int], num_classes: int) -> None:
    for n_steps in steps:
        if n_steps > num_classes:
            raise ConfigError(f"config key 'evaluate.continual_steps': {n_steps} steps for only "
                              f"{num_classes} classes")


def before_run(cfg: Config, store: Any, known: dict[str, Any]) -> None:
    """``Run.start``, before any stage: what evaluate reads besides the recipe's artifacts
    (``check_sources``), for ``known["distilled_images"]`` images where a stage before knows them."""
    check_sources(cfg, store, known.get("distilled_images"))


def resources(cfg: Config) -> dict[str, float]:
    """What the stage holds at once: its Train workers (in queue mode each with its share of a GPU),
    plus the data tasks feeding them."""
    out = launcher.train_resources(cfg.compute, cfg.data.cpus_per_task)
    _, workers, share = plan_parallel(cfg)
    return {**out, "GPU": workers * share}


def settings_for(cfg: Config, student: str, strategy: str = "hard") -> TrainSettings:
    """The student schedule of one row: ``strategy``'s +phases / +noaug flags pick its phases and views."""
    ev = cfg.evaluate
    spec = parse_spec(strategy)
    return TrainSettings(epochs=ev.epochs, batch_size=ev.batch_size, lr=ev.lr[student],
                         weight_decay=ev.weight_decay, cutmix_alpha=ev.cutmix_alpha, loss=ev.loss,
                         ce_weight=ev.ce_weight, temperature=ev.temperature, image_size=cfg.data.image_size,
                         schedule=ev.schedule, decay=ev.decay, report=ev.report, precision=ev.precision,
                         loss_check_every=ev.loss_check_every, temperature_schedule=ev.temperature_schedule,
                         student_temperature=ev.student_temperature,
                         phases=tuple(parse_phases(ev.phases)) if spec.phases else (),
                         label_smoothing=ev.label_smoothing, augment=not spec.noaug)


# ----------------------------------------------------------------------------- the grid

def plan_rows(cfg: Config, num_classes: int) -> list[dict[str, Any]]:
    """Every row to train, in order: main grid, floor, continual (each with a unique ``row`` id)."""
    ev = cfg.evaluate
    rows = []
    for student in ev.students:
        for strategy in ev.strategies:
            for seed in ev.seeds:
                rows.append({"student": student, "strategy": strategy, "seed": seed, "images": "distilled"})
        if ev.floor:
            for strategy in ev.floor_strategies:
                for seed in ev.seeds:
                    rows.append({"student": student, "strategy": strategy, "seed": seed, "images": "floor"})
        if ev.full_data:  # DD-Ranking's A(full, hard): the whole real training set, hard labels
            for seed in ev.seeds:
                rows.append({"student": student, "strategy": "hard", "seed": seed, "images": "full"})
    check_continual(ev.continual_steps, num_classes)
    for n_steps in ev.continual_steps:
        groups = np.array_split(np.arange(num_classes), n_steps)
        for strategy in ev.continual_strategies:
            for seed in ev.seeds:
                for k in range(n_steps):
                    seen = np.concatenate(groups[:k + 1]).tolist()
                    rows.append({"student": ev.students[0], "strategy": strategy, "seed": seed,
                                 "images": "distilled", "continual_steps": n_steps, "continual_step": k + 1,
                                 "classes": seen})
    for r in rows:
        r.setdefault("continual_steps", 0)
        r.setdefault("continual_step", 0)
        r["row"] = (f"{r['images']}|{r['student']}|{r['strategy']}|{r['seed']}"
                    f"|{r['continual_steps']}|{r['continual_step']}")
    return rows


# ------------------------------------------------------------------------- Ray wrapper

def run(cfg: Config, store, key: str, inputs: dict[str, str], *, drill: launcher.KillDrill | None = None
        ) -> dict[str, Any]:
    """Train the whole grid on Ray Train, write results.parquet/json under ``key``; return a summary.

    ``drill`` (tests, queue mode): on the first attempt, rank ``drill.rank`` waits to be killed
    (SIGKILL) at the first step of student epoch ``drill.epoch`` (0-based) of the second row it takes.
    """
    import ray

    from hello_ray.data.corrupt import corrupt_summary
    from hello_ray.data.decode import decoded_split
    from hello_ray.data.imageset import load_image_set
    from hello_ray.data.sources import load_train_val

    t0 = time.perf_counter()
    imageset = load_image_set(store, inputs["images"])
    train, val = load_train_val(cfg.data, store)
    # The training images are read only for the floor's random real images (and the full-data rows).
    corrupt = corrupt_summary({"train": train, "val": val} if cfg.evaluate.floor or cfg.evaluate.full_data
                              else {"val": val},
                              cfg.data, store)
    num_classes = len(train.class_names)
    validate_inputs(cfg, store, inputs, len(imageset.class_names), num_classes)
    if cfg.evaluate.stored_labels:
        check_imported_labels(store, cfg.evaluate.stored_labels, len(imageset), num_classes, inputs["images"])
    images = nhwc_to_nchw(imageset.images)                       # uint8 [N, 3, S, S]
    if images.shape[-1] != cfg.data.image_size:
        raise ValueError(f"image set {inputs['images']}: images are {images.shape[-1]} px but "
                         f"data.image_size is {cfg.data.image_size}")
    labels = torch.as_tensor(np.asarray(imageset.labels), dtype=torch.long)
    rows = plan_rows(cfg, num_classes)
    payload: dict[str, Any] = {"images": ray.put(images), "labels": ray.put(labels)}
    if cfg.evaluate.floor:
        ipc = int(np.bincount(labels.numpy(), minlength=num_classes).max())
        floor_x, floor_y = sample_floor(cfg.data, store, num_classes, ipc,
                                        seed=cfg.evaluate.seeds[0])
        payload.update(floor_images=ray.put(nhwc_to_nchw(floor_x)), floor_labels=ray.put(torch.as_tensor(floor_y)))
    n_full = 0
    if cfg.evaluate.full_data:
        full_x, full_y = load_full(cfg.data, store, num_classes)
        n_full = len(full_y)
        payload.update(full_images=ray.put(nhwc_to_nchw(full_x)), full_labels=ray.put(torch.as_tensor(full_y)))
    val_ds = decoded_split(val, cfg.data, columns=["image", "label"]).materialize()
    mode, workers, share = plan_parallel(cfg)
    log.info("[evaluate] %d rows, %d distilled images, %d val images; %s", len(rows), len(images),
             val_ds.count(), describe_parallel(cfg, mode, workers, share))
    config = {"cfg": cfg, "store": store, "key": key, "inputs": inputs, "rows": rows, "mode": mode,
              "num_classes": num_classes, "drill": drill, **payload}
    if mode == "queue":
        finished = read_row_records(store, key, [r["row"] for r in rows])
        for r in rows:
            r["cost"] = row_cost(cfg, r, n_full if r["images"] == "full" else len(images), num_classes)
        queue = ray.remote(**placement.driver_actor_options())(RowQueue).remote(
            [r for r in rows if r["row"] not in finished])
        config["queue"] = queue
    result = launcher.fit(
        STAGE, cfg.compute, store, key, train_loop_per_worker, config, {"val": val_ds},
        # queue mode: every worker scores its own rows on the whole validation set
        split_datasets=mode == "ddp", gpus_per_worker=share or None,
        backend="gloo" if mode == "queue" else None)
    if mode == "queue":
        by_id = read_row_records(store, key, [r["row"] for r in rows])
        missing = [r["row"] for r in rows if r["row"] not in by_id]
        if missing:
            raise RuntimeError(f"evaluate {key}: the queue ended without a record of rows {missing[:3]}")
        done = [by_id[r["row"]] for r in rows]
        log.info("[evaluate] %d rows on %d workers: busy fraction %.2f", len(done), workers,
                 busy_fraction(done, workers))
    else:
        done = json.loads(launcher.checkpoint_bytes(result.checkpoint, ROWS_FILE))
    ev = cfg.evaluate
    scores = fair_scores(done, ev.full_top1, ev.score_scale, ev.score_weight)
    return {**write_results(store, key, done, wall_s=time.perf_counter() - t0, scores=scores), "corrupt": corrupt}


def describe_parallel(cfg: Config, mode: str, workers: int, share: float) -> str:
    """How the grid is spread, in words (printed before it starts)."""
    where = (f"{share:g} GPU each" if share else f"{cfg.compute.cpus_per_worker:g} CPU each")
    auto = " (evaluate.parallel=auto)" if cfg.evaluate.parallel == "auto" else ""
    if mode == "queue":
        return f"rows from a queue, longest first, on {workers} workers ({where}){auto}"
    return f"one row at a time over {workers} DDP workers ({where}){auto}"


# ------------------------------------------------------------------------ worker side

def build_strategy(spec: str, cfg: Config, store, key: str, inputs: dict[str, str], images: torch.Tensor,
                   labels: torch.Tensor, num_classes: int, device: torch.device, rank: int, world: int,
                   teacher: TeacherLabels | None, image_set: str = "distilled", seed: int | None = None
                   ) -> LabelStrategy:
    """The label strategy named ``spec`` on ``device`` for ``images`` (the distilled set, or the
    floor's random real images); stored labels are relabelled once, split over ranks. ``seed``
    (:func:`stored_seed`): relabel that seed's own views into its own folder; None: the first
    seed's, the set that ships."""
    import torch.distributed as dist

    parsed = parse_spec(spec)
    base, prune = parsed.base, parsed.prune
    size = cfg.data.image_size
    if base == "hard":
        return HardLabels.write(labels.numpy(), num_classes, store, key, write=rank == 0,
                                name="hard" if image_set == "distilled" else image_set)
    if base == "projector":
        return ProjectorLabels.from_store(store, inputs["transfer"], num_classes, size, dtype=parsed.adapter_dtype,
                                          out=(store, key) if rank == 0 else None).to(device).with_precision(
            cfg.evaluate.label_precision)
    if parsed.topk:
        # LPQLD's top-k of the same views and pool: built from the full-logit labels of this very
        # stored[/N] (made first, or found), copied by rank 0, met by every rank at the barrier.
        full_spec = "stored" if prune <= 1 else f"stored/{prune}"
        full = build_strategy(full_spec, cfg, store, key, inputs, images, labels, num_classes, device, rank, world,
                              teacher, image_set, seed)
        assert isinstance(full, StoredLabels)
        name = stored_name(prune, image_set, seed, parsed.topk)
        if rank == 0 and meta_file(name) not in store.list_files(key):
            top_k_stored(store, full, key, parsed.topk, image_set, seed)
        if world > 1:
            dist.barrier()
        return StoredLabels(store, key, prune, image_set, seed, topk=parsed.topk)
    if base == "teacher":
        return teacher
    ev = cfg.evaluate
    if ev.stored_labels and image_set == "distilled":  # imported records (labels_fkd): replayed as they are
        if prune <= 1:
            return StoredLabels(store, ev.stored_labels, prune, image_set)
        # Rank 0 alone looks and copies (LPLD's pool of the imported batches, so its bytes are real
        # files); every rank then meets at the barrier: a rank that looked after rank 0 had written
        # would otherwise skip it and leave the others waiting.
        if rank == 0 and meta_file(stored_name(prune, image_set)) not in store.list_files(key):
            prune_stored(store, ev.stored_labels, key, prune, ev.prune_pool, image_set)
        if world > 1:
            dist.barrier()
        return StoredLabels(store, key, prune, image_set)
    plan = RelabelPlan(epochs=ev.epochs, batch_size=ev.batch_size, image_size=size, cutmix_alpha=ev.cutmix_alpha,
                       seed=ev.seeds[0] if seed is None else seed, prune=prune, pool=ev.prune_pool)
    meta = meta_file(stored_name(prune, image_set, seed))
    listed = store.list_files(key)
    if prune > 1 and meta_file(stored_name(1, image_set, seed)) in listed:
        # The unpruned labels of these very views are in (built first, in the grid's order): LPLD's
        # pool is a subset of their batches, copied by rank 0 rather than labelled again. Every rank
        # takes this branch (the unpruned meta was written before the last barrier), so all meet below.
        if rank == 0 and meta not in store.list_files(key):
            prune_stored(store, key, key, prune, ev.prune_pool, image_set, seed, image_set, seed)
        if world > 1:
            dist.barrier()
        return StoredLabels(store, key, prune, image_set, seed)
    if meta not in listed:                                    # not relabelled before a restart
        mine = [e for e in range(ev.epochs) if e % world == rank]
        files = relabel(teacher.logits, images.to(device), plan, store, key, epochs=mine,
                        image_set=image_set, seed=seed)
        gathered: list[dict[str, int]] = [files]
        if world > 1:
            gathered = [None] * world  # type: ignore[list-item]
            dist.all_gather_object(gathered, files)
        if rank == 0:
            write_stored_meta(store, key, plan, len(images), num_classes,
                              {k: v for part in gathered for k, v in part.items()}, image_set=image_set,
                              seed=seed)
        if world > 1:
            dist.barrier()
    return StoredLabels(store, key, prune, image_set, seed)


def stored_seed(cfg: Config, spec: str, seed: int) -> int | None:
    """Whose views a row's stored labels replay: its own seed's (``evaluate.stored_views=per_seed``,
    seeds after the first; their own folder), or None: the first seed's relabel (that seed's rows,
    ``first_seed``, imported labels, and every strategy that is not stored)."""
    ev = cfg.evaluate
    if parse_strategy(spec)[0] != "stored" or ev.stored_views != "per_seed" or seed == ev.seeds[0]:
        return None
    return None if ev.stored_labels else seed


def _load_teacher(cfg: Config, store, inputs: dict[str, str], num_classes: int, device: torch.device
                  ) -> TeacherLabels:
    from hello_ray.models.ensemble import TeacherEnsemble, load_observer

    if cfg.evaluate.teacher_labels == "window":
        model = TeacherEnsemble.from_trajectory(store, inputs["teachers"], cfg.transfer.teacher_window,
                                                cfg.transfer.n_teachers)
    else:
        model = load_observer(store, inputs["teachers"], observer=cfg.teachers.observer)
    return TeacherLabels(model, num_classes, cfg.data.image_size,
                         where=f"teachers artifact {inputs['teachers']}").to(device).with_precision(
        cfg.evaluate.label_precision)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train loop: train every row not yet in the checkpoint; report after each round.

    ``ddp``: a round is one row, its batches split over all ranks (DDP), checkpointed after it.
    ``queue``: each rank takes rows from the driver's :class:`RowQueue` until none is left, trains
    each whole and writes its record to the store as it finishes.
    """
    import ray
    import ray.train

    cfg: Config = config["cfg"]
    store, key, inputs = config["store"], config["key"], config["inputs"]
    num_classes = config["num_classes"]
    # Every row reseeds with its own seed; this seeds the strategies' construction.
    w = launcher.worker_context(cfg.compute.use_gpu, cfg.evaluate.batch_size, cfg.evaluate.seeds[0])
    rank, world, device = w.rank, w.world, w.device
    by_queue = config["mode"] == "queue"
    images, labels = ray.get(config["images"]), ray.get(config["labels"])
    sets = {"distilled": (images, labels)}   # image set -> (uint8 [M, 3, S, S], labels [M])
    for name in ("floor", "full"):
        if f"{name}_images" in config:
            sets[name] = (ray.get(config[f"{name}_images"]), ray.get(config[f"{name}_labels"]))

    done: list[dict[str, Any]] = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None and not by_queue:
        done = json.loads(launcher.checkpoint_bytes(ckpt, ROWS_FILE))
    finished = {r["row"] for r in done}
    if by_queue:
        finished = set(read_row_records(store, key, [r["row"] for r in config["rows"]]))
    pending = [r for r in config["rows"] if r["row"] not in finished]
    val_shard = ray.train.get_dataset_shard("val")  # whole val set per rank in queue mode, else a shard
    wlog = launcher.worker_logger(STAGE)
    say = (lambda m: wlog.info("[evaluate] %s", m)) if rank == 0 or by_queue else None

    # Every strategy is built before training, by all ranks in the same order: the stored relabel
    # pass is collective, and in queue mode ranks train different strategies at the same time.
    # Online labellers (teacher, projector) serve both image sets; hard and stored labels are
    # per image set (the floor's random real images have their own files).
    strategies: dict[tuple[str, str, int | None], LabelStrategy] = {}
    teacher: TeacherLabels | None = None

    def strategy_of(r: dict[str, Any]) -> tuple[str, str, int | None]:
        return r["images"], r["strategy"], stored_seed(cfg, r["strategy"], r["seed"])

    t_labels = time.perf_counter()
    for image_set, spec, seed in dict.fromkeys(strategy_of(r) for r in pending):
        base = parse_strategy(spec)[0]
        if teacher is None and base in ("teacher", "stored"):
            teacher = _load_teacher(cfg, store, inputs, num_classes, device)
        if base in ("teacher", "projector") and ("distilled", spec, None) in strategies:
            strategies[(image_set, spec, seed)] = strategies[("distilled", spec, None)]
            continue
        x_set, y_set = sets[image_set]
        strategies[(image_set, spec, seed)] = build_strategy(spec, cfg, store, key, inputs, x_set, y_set,
                                                             num_classes, device, rank, world, teacher, image_set,
                                                             seed)

    if say:
        say(f"labellers and stored labels of {len(strategies)} strategies ready in "
            f"{time.perf_counter() - t_labels:.1f} s")
    if by_queue:
        def train(r: dict[str, Any], on_view: Any = None) -> dict[str, Any]:
            x, y = sets[r["images"]]
            return _train_row(cfg, r, x, y, strategies[strategy_of(r)], num_classes, val_shard, device, rank=0,
                              world=1, on_view=on_view)

        queue_rows(config, rank, world, train, say)
        return
    for mine in pending:
        x, y = sets[mine["images"]]
        strategy = strategies[strategy_of(mine)]
        record = _train_row(cfg, mine, x, y, strategy, num_classes, val_shard, device, rank=rank, world=world)
        done.append(record)
        if say:
            say(row_line(record))
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                (Path(d) / ROWS_FILE).write_text(json.dumps(done))
            # Through the launcher: on an S3 store the checkpoint goes up by the store's client.
            launcher.report({"rows_done": len(done), "top1": record["top1"]}, store, d if rank == 0 else None)


def _train_row(cfg: Config, row: dict[str, Any], x: torch.Tensor, y: torch.Tensor, strategy: LabelStrategy,
               num_classes: int, val_shard, device: torch.device, rank: int, world: int,
               on_view: Any = None) -> dict[str, Any]:
    """Train and score one row's student. ``world`` > 1: this rank's part of a DDP row (the counts
    and peak memory are reduced over the ranks), else the whole row on this rank."""
    import torch.distributed as dist
    from ray.train.torch import prepare_model

    from hello_ray.models.zoo import build_model
    from hello_ray.runtime import seed_everything

    t0 = time.perf_counter()
    classes = torch.as_tensor(row["classes"]) if row.get("classes") else None
    if classes is not None:                                    # continual: seen classes' images only
        keep = torch.isin(y, classes)
        x, y = x[keep], y[keep]
    seed_everything(row["seed"])
    # Channels-last before DDP wraps it: oneDNN and cuDNN convolve fastest in it (CPU: ~10 % per step).
    model = build_model(row["student"], num_classes, cfg.data.image_size).to(memory_format=torch.channels_last)
    model = prepare_model(model) if world > 1 else model.to(device)
    settings = settings_for(cfg, row["student"], row["strategy"])
    val_images = [0]

    def score() -> float:
        """Top-1 of the student now on the real validation images (counts summed over DDP ranks)."""
        correct, total = top1_counts(model, ((b["image"], b["label"]) for b in
                                             val_shard.iter_batches(batch_size=256, batch_format="numpy")),
                                     device, classes=classes)
        counts = torch.tensor([correct, total], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(counts)
        val_images[0] = int(counts[1])
        return float(counts[0] / max(counts[1], 1))

    with PeakMemory(device) as mem:
        stats = train_student(model, x, y, strategy, settings, row["seed"], device, classes=classes,
                              rank=rank, world_size=world, score=score, row=row["row"], on_view=on_view)
    peak = torch.tensor([mem.peak_bytes], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    scores = stats["scores"]                                   # {epoch (1-based): top-1}
    best_epoch = max(scores, key=lambda e: (scores[e], e))
    agg = torch.tensor([scores[settings.epochs] * val_images[0], val_images[0], float(peak[0])],
                       dtype=torch.float64)
    return {**row, "top1": scores[settings.epochs], "top1_best": scores[best_epoch], "best_epoch": best_epoch,
            "report": settings.report, "scored_epochs": sorted(scores), "val_images": int(agg[1]),
            "label_bytes": int(strategy.shipped_bytes()), "train_images": int(len(x)),
            "wall_s": time.perf_counter() - t0, "step_s": stats["step_s"], "steps": stats["steps"],
            "final_loss": stats["final_loss"], "peak_mem_mb": float(agg[2]) / 2**20,
            "peak_mem_kind": mem.kind, "device": device.type, "workers": world, "parallel": "ddp"}
