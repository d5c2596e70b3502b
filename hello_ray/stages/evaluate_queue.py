"""Evaluate's rows from a queue: longest first, a worker that finishes takes the next row.

``evaluate.parallel=queue`` runs every row whole on one Train worker (no gradient all-reduce) and
hands the rows out from a :class:`RowQueue` actor the driver creates: sorted by their estimated cost
(:func:`row_cost`, longest first, the LPT rule), taken one at a time, so no worker waits for a round's
slowest row. A worker may hold a fraction of a GPU (``evaluate.gpus_per_row``): small low-resolution
rows share a GPU several to one. Each finished row is written to the store at once
(``formats/results.write_row_record``), which is what resumes: a restarted worker group (a killed
worker) puts the rows that were in flight back at the front, and a re-run of the driver queues only
the rows without a record. ``ddp`` (one row at a time over every worker) stays for grids with fewer
rows than workers.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from hello_ray.config import Config
from hello_ray.labels import parse_strategy

#: Labelling cost per student step, as a multiple of the student's forward + backward: an online
#: labeller adds about one forward (a third of forward + backward) of a network of similar size;
#: the projector (CLIP + merged LoRA) about twice that; stored and hard labels almost nothing.
LABEL_COST = {"hard": 0.0, "stored": 0.02, "teacher": 0.35, "projector": 0.7}


@lru_cache(maxsize=None)
def student_flops(student: str, num_classes: int, image_size: int) -> float:
    """Forward + backward FLOPs of one ``student`` image (torch's counter, a random-init model)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hello_ray.models.zoo import build_model

    model = build_model(student, num_classes, image_size).train()
    x = torch.rand(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return float(counter.get_total_flops())


def row_cost(cfg: Config, row: dict[str, Any], n_images: int, num_classes: int) -> float:
    """Estimated FLOPs of a row: steps x batch x the student's per-image cost x (1 + labelling).

    Only the order matters (longest first); ``n_images`` is the row's training set (the distilled
    set, or the floor's), continual rows train on their seen classes' share of it.
    """
    ev = cfg.evaluate
    images = n_images * (len(row["classes"]) / num_classes if row.get("classes") else 1.0)
    steps = ev.epochs * math.ceil(max(images, 1) / ev.batch_size)
    per_step = min(ev.batch_size, images) * student_flops(row["student"], num_classes, cfg.data.image_size)
    return steps * per_step * (1.0 + LABEL_COST[parse_strategy(row["strategy"])[0]])


def longest_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows by decreasing ``cost``; ties keep the plan's order (a stable sort)."""
    return sorted(rows, key=lambda r: -r["cost"])


def auto_gpus_per_row(cfg: Config) -> float:
    """The GPU share of one row when ``evaluate.gpus_per_row`` is 0 (auto): a step's pixels against
    an ImageNet step's (batch 100 at 224 px, which fills a GPU), rounded up to a quarter, at most 1."""
    pixels = cfg.evaluate.batch_size * cfg.data.image_size ** 2
    return min(1.0, max(0.25, math.ceil(4 * pixels / (100 * 224 ** 2)) / 4))


def count_rows(cfg: Config) -> int:
    """How many rows ``evaluate.plan_rows`` plans (known from the config alone)."""
    ev = cfg.evaluate
    per_student = len(ev.strategies) + (len(ev.floor_strategies) if ev.floor else 0)
    continual = sum(ev.continual_steps) * len(ev.continual_strategies)
    return (len(ev.students) * per_student + continual) * len(ev.seeds)


def plan_parallel(cfg: Config) -> tuple[str, int, float]:
    """(mode, Train workers, GPUs per worker) for the grid, on ``compute.num_workers`` workers:
    ``queue`` gives each worker one row at a time and ``gpus_per_row`` of a GPU (so 8 GPUs hold 32
    workers at 0.25); ``ddp`` splits one row over all workers, a GPU each; ``auto`` picks queue when
    the rows are at least as many as the workers."""
    ev, compute = cfg.evaluate, cfg.compute
    mode = ev.parallel
    if mode == "auto":
        mode = "queue" if count_rows(cfg) >= compute.num_workers else "ddp"
    if not compute.use_gpu:
        return mode, compute.num_workers, 0.0
    return mode, compute.num_workers, (ev.gpus_per_row or auto_gpus_per_row(cfg)) if mode == "queue" else 1.0


def busy_fraction(records: list[dict[str, Any]], workers: int) -> float:
    """Sum of the rows' wall times over workers x the grid's wall (first start to last end)."""
    spans = [(r["start_unix"], r["end_unix"]) for r in records if "start_unix" in r]
    if not spans:
        return float("nan")
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    return sum(e - s for s, e in spans) / (workers * wall) if wall > 0 else 1.0


class RowQueue:
    """The grid's pending rows, handed out longest first (a Ray actor; the driver owns it).

    A worker group calls :meth:`begin` once from rank 0 before any worker takes a row: rows taken
    by an earlier attempt and never finished (its worker was killed) go back to the queue.
    """

    def __init__(self, rows: list[dict[str, Any]]):
        self.pending = longest_first(rows)
        self.taken: dict[str, dict[str, Any]] = {}
        self.finished: set[str] = set()
        self.attempts = 0

    def begin(self) -> int:
        """Start a worker group's attempt; returns how many rows were put back."""
        back = list(self.taken.values())
        self.pending = longest_first(back + self.pending)
        self.taken.clear()
        self.attempts += 1
        return len(back)

    def take(self) -> dict[str, Any] | None:
        """The longest pending row, or None when none is left."""
        if not self.pending:
            return None
        row = self.pending.pop(0)
        self.taken[row["row"]] = row
        return row

    def finish(self, row_id: str) -> None:
        self.taken.pop(row_id, None)
        self.finished.add(row_id)

    def left(self) -> int:
        return len(self.pending) + len(self.taken)


# ---------------------------------------------------------------------------- a worker's side

def row_line(r: dict[str, Any]) -> str:
    """A finished row's log line."""
    return (f"{r['row']}: top1 {r['top1']:.4f}  label bytes {r['label_bytes']:,}  "
            f"step {r['step_s'] * 1e3:.1f} ms  wall {r['wall_s']:.1f} s")


def queue_rows(config: dict[str, Any], rank: int, world: int, train: Any, say: Any) -> None:
    """Queue mode on one rank: take rows until the queue is empty, writing each record as it ends.

    Rank 0 first puts back the rows an earlier attempt of the worker group left unfinished; every
    rank waits for that before taking a row. One report at the end (Ray Train's reports are
    collective); the records in the store are what a restart resumes from.
    """
    import time

    import ray
    import torch.distributed as dist

    from hello_ray import launcher
    from hello_ray.formats.results import has_row_record, write_row_record

    queue, store, key = config["queue"], config["store"], config["key"]
    if rank == 0:
        back = ray.get(queue.begin.remote())
        if back and say:
            say(f"{back} rows of an earlier attempt put back in the queue")
    if world > 1:
        dist.barrier()
    ran = 0
    drill = config.get("drill")
    armed = drill is not None and rank == drill.rank and not launcher.drill_fired(drill, store, key)
    while (row := ray.get(queue.take.remote())) is not None:
        if has_row_record(store, key, row["row"]):
            # Finished by a worker that was torn down before it could tell the queue (a restart
            # put the row back): its record stands, it is not trained again.
            ray.get(queue.finish.remote(row["row"]))
            continue
        start = time.time()
        on_view = None
        if armed and ran == 1:  # the second row: the first one's record is then in the store
            def on_view(epoch: int, _view: Any) -> None:
                if epoch == drill.epoch:
                    launcher.wait_to_be_killed(drill, store, key, rank)
        record = train(row, on_view)
        record.update(start_unix=start, end_unix=time.time(), worker=rank, parallel="queue")
        record.pop("cost", None)
        write_row_record(store, key, record)
        ray.get(queue.finish.remote(row["row"]))
        ran += 1
        if say:
            say(f"[worker {rank}] " + row_line(record))
    if world > 1:
        dist.barrier()
    launcher.report({"rows_done": ran}, store)
