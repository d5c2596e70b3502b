"""How preflight rehearses and prices stage ``evaluate`` (see ``teachers_plan`` for the four names),
and the evaluate grid's GPU-hours on one node from a measured device profile.

- rehearse: ``evaluate_core.train_student`` in the driver for every student with the hard, teacher
  and projector labellers (the rehearsed teacher and projector), at the row's batch;
- work: per planned row (``evaluate.plan_rows``: students x strategies x seeds, floor, continual),
  epochs x its images views; hard rows cost a student step, online and stored rows add the labeller
  (stored labels are made by the same teacher forward, once per view, in the relabel pass); the
  stored labels' bytes (``hello_ray.accounting``, the numbers ``hello-ray storage`` prints);
- gpu_hours / grid_hours: before and after the queue, from a device profile (below).

A *device profile* is what ``benchmarks/gpu_check.py`` writes on a GPU (``benchmarks/results/
gpu_check_h200.json`` is the H200's): a ResNet-18 student step at its batch and size, with the
views built on the CPU or on the device, per labeller and precision, and the views' own time. From
it, for every row of ``evaluate.plan_rows`` on ``compute.num_workers`` GPUs:

- *after* (``evaluate.parallel=queue``): a row is one GPU's, its step the profile's step with the
  views built on the device; the rows are placed longest first on the GPUs (LPT) and the node is
  held until the last ends: held = GPUs x makespan;
- *before* (the earlier default: DDP over every GPU, views drawn on one CPU thread per rank for
  the whole global batch): a step is the views' CPU time plus the rest of the step on 1/GPUs of the
  batch; the rows run one after another, every GPU held throughout;
- *useful work*: the sum of the rows' steps at the after step, the GPU time the grid needs.

A student other than the profile's scales its step by its forward + backward FLOPs per image and the
batch by the ratio of batch sizes (``evaluate_queue.student_flops``).
"""
from __future__ import annotations

import copy
import math
from typing import Any


from hello_ray.config import Config
from hello_ray.label_spec import parse_spec
from hello_ray.labels import parse_strategy
from hello_ray.measure import Clock, CostBasis, Sample, StageRehearsal, count_flops


def _one_step(s: Any, batch_size: int) -> Any:
    """evaluate TrainSettings for one epoch of ``batch_size``-image steps."""
    s = copy.copy(s)
    s.epochs, s.batch_size = 1, batch_size
    return s


def rehearse(r: Any, sample: Sample) -> StageRehearsal:
    from hello_ray.labels import HardLabels, ProjectorLabels, TeacherLabels
    from hello_ray.models.zoo import build_model
    from hello_ray.stages.evaluate import settings_for
    from hello_ray.stages.evaluate_core import train_student
    from hello_ray.stages.evaluate_queue import plan_parallel

    ev = r.cfg.evaluate
    x, y = sample.cycle(1)
    probe = build_model(ev.students[0], r.C, r.S).to(r.device)
    flops1 = count_flops(lambda: train_student(probe, x.permute(0, 3, 1, 2).contiguous(), y,
                                               HardLabels(y.numpy(), r.C, 0),
                                               _one_step(settings_for(r.cfg, ev.students[0]), 1),
                                               0, r.device))
    ddp = plan_parallel(r.cfg)[0] == "ddp"                  # evaluate.parallel=auto resolved
    per_worker = ev.batch_size // r.cfg.compute.num_workers if ddp else ev.batch_size
    B = r.batch(per_worker, 2 * flops1)  # room for a labeller beside the student
    x, y = sample.cycle(B * (r.steps + 1))
    images = x.permute(0, 3, 1, 2).contiguous()                                  # uint8 [M,3,S,S]
    labellers: dict[str, Any] = {"hard": HardLabels(y.numpy(), r.C, 0)}
    if r.teacher is not None:
        labellers["teacher"] = TeacherLabels(r.teacher, r.C, r.S)
    if r.projector is not None:
        merged = copy.deepcopy(r.projector).merge_lora(unload=True).eval()
        labellers["projector"] = ProjectorLabels(merged, r.C, r.S, 0)
    per_student: dict[str, dict[str, float]] = {}
    cpu_steps: dict[str, dict[str, float]] = {}
    flops: dict[str, dict[str, float]] = {}
    for student in ev.students:
        s = _one_step(settings_for(r.cfg, student), B)
        per_student[student], flops[student] = {}, {}
        for name, strategy in labellers.items():
            model = build_model(student, r.C, r.S).to(r.device)
            with Clock() as c:
                out = train_student(model, images, y, strategy, s, 0, r.device)
            per_student[student][name] = out["step_s"]
            cpu_steps.setdefault(student, {})[name] = c.cpu / out["steps"]
            flops[student][name] = count_flops(
                lambda: train_student(model, images[:1], y[:1], strategy, _one_step(s, 1), 0, r.device))
    first = ev.students[0]
    r.cpu_step_s = cpu_steps[first]["hard"]
    return StageRehearsal("evaluate", "stages/evaluate_core.train_student in the driver (hard, teacher, "
                          "projector labels)", "student view (image x epoch x row)", B, r.steps + 1,
                          per_student[first]["hard"], flops[first]["hard"], 0, "",
                          notes=["step time of hard labels; per labeller in extra"],
                          extra={"step_s": per_student, "cpu_step_s": cpu_steps, "flops_per_item": flops})


def _strategy_labeller(strategy: str) -> str:
    base = parse_spec(strategy).base
    return {"hard": "hard", "projector": "projector"}.get(base, "teacher")  # teacher, stored, stored/N


def work(b: CostBasis, s: StageRehearsal) -> dict[str, Any]:
    from hello_ray.accounting import pruned_label_bytes, storage_report, topk_label_bytes
    from hello_ray.stages.evaluate import plan_rows

    cfg, C, train, images = b.cfg, b.classes, b.train_images, b.images
    ev, ipc = cfg.evaluate, cfg.select.ipc
    flops = s.extra["flops_per_item"]
    steps = ({st: {k: v / b.parallel for k, v in d.items()} for st, d in s.extra["cpu_step_s"].items()}
             if b.cpu_clock else s.extra["step_s"])
    items = secs = fl = 0.0
    rows = plan_rows(cfg, C)
    for row in rows:
        views = ev.epochs * (len(row["classes"]) * ipc if row.get("classes") else
                             (train or images) if row["images"] == "full" else images)
        lab = _strategy_labeller(row["strategy"])
        lab = lab if lab in steps[row["student"]] else "hard"
        items += views
        secs += views * steps[row["student"]][lab] / s.batch
        fl += views * flops[row["student"]][lab]
    storage = storage_report(C, ipc, ev.epochs, cfg.transfer.conv_rank, cfg.transfer.head_rank,
                             cfg.transfer.clip_model, cfg.transfer.lora_style, cfg.teachers.model,
                             cfg.data.image_size, ev.batch_size)
    label_bytes = 0
    for strategy in ev.strategies:
        spec = parse_spec(strategy)
        if spec.base == "stored" and spec.topk:
            label_bytes += topk_label_bytes(C, ipc, ev.epochs, ev.batch_size, spec.prune, spec.topk)
        elif spec.base == "stored":
            label_bytes += (storage["stored_soft_labels_bytes"] if spec.prune <= 1 else
                            pruned_label_bytes(C, ipc, ev.epochs, ev.batch_size, spec.prune))
    return {"work": f"{len(rows)} rows x {ev.epochs} epochs x {images:,} images", "items": int(items),
            "flops": fl, "seconds_here": secs, "bytes": label_bytes,
            "bytes_what": "stored labels", "units": cfg.compute.num_workers,
            "stored_soft_labels_bytes": storage["stored_soft_labels_bytes"],
            "stored_labels_what": f"IPC {ipc}, {ev.epochs} epochs",
            "projector_lora_params": storage["projector_lora_params"]}


def gpu_hours(cfg: Config, classes: int, train_images: int, profile: dict[str, Any],
              decode_per_cpu: float | None, cpus: int | None) -> dict[str, Any] | None:
    ev = evaluate_gpu_hours(cfg, classes, profile, train_images)
    return {"before_gpu_h": ev["before"]["gpu_h"], "after_gpu_h": ev["after"]["gpu_h"],
            "why": "DDP rows, views on the CPU -> a row per GPU, views on the device"}


def grid_hours(cfg: Config, classes: int, profile: dict[str, Any]) -> dict[str, Any]:
    """The preflight's schedule block: the grid's GPU-hours before and after (:func:`evaluate_gpu_hours`)."""
    return evaluate_gpu_hours(cfg, classes, profile)


def _device_step(profile: dict[str, Any], strategy: str, precision: str) -> float:
    """The profile's step (s) with the views on the device for a strategy's labeller."""
    base = parse_strategy(strategy)[0]
    if base in ("hard", "stored"):          # stored replays logits: no labeller forward
        return profile["steps"]["hard images@device"]
    prec = "bf16" if precision == "bf16" or (precision == "auto" and profile["native_bf16"]) else "fp32"
    return profile["steps"][f"{base} {prec} images@device"]


def lpt_makespan(times: list[float], slots: int) -> float:
    """Longest-processing-time-first on ``slots`` identical machines: the last finish."""
    loads = [0.0] * max(1, slots)
    for t in sorted(times, reverse=True):
        i = loads.index(min(loads))
        loads[i] += t
    return max(loads)


def evaluate_gpu_hours(cfg: Config, classes: int, profile: dict[str, Any], train_images: int | None = None
                       ) -> dict[str, Any]:
    """Before / after GPU-hours held and the useful GPU-hours of the evaluate grid (see the module).
    ``train_images``: the training split's size, what a ``full`` row (``evaluate.full_data``) trains on."""
    from hello_ray.stages.evaluate import plan_rows
    from hello_ray.stages.evaluate_queue import student_flops

    ev, gpus = cfg.evaluate, cfg.compute.num_workers
    images = classes * cfg.select.ipc
    ref = student_flops("resnet18", classes, profile["image_size"])
    after, before = [], []
    for row in plan_rows(cfg, classes):
        n = images * (len(row["classes"]) / classes if row.get("classes") else 1)
        if row["images"] == "full":
            n = train_images or images
        steps = ev.epochs * math.ceil(n / ev.batch_size)
        scale = (ev.batch_size / profile["batch"]) * (
            student_flops(row["student"], classes, cfg.data.image_size) / ref)
        step = _device_step(profile, row["strategy"], ev.label_precision) * scale
        views_cpu = profile["views_cpu_s"] * ev.batch_size / profile["batch"]
        rest = step - profile["views_device_s"] * ev.batch_size / profile["batch"]
        after.append(steps * step)
        before.append(steps * (views_cpu + rest / gpus))
    makespan, serial = lpt_makespan(after, gpus), sum(before)
    useful = sum(after)
    return {"device": profile["device"], "profile": profile["path"], "gpus": gpus, "rows": len(after),
            "useful_gpu_h": useful / 3600,
            "after": {"wall_h": makespan / 3600, "gpu_h": gpus * makespan / 3600},
            "before": {"wall_h": serial / 3600, "gpu_h": gpus * serial / 3600},
            "after_over_useful": gpus * makespan / useful if useful else float("nan")}


def format_schedule(s: dict[str, Any]) -> str:
    return (f"evaluate grid, {s['rows']} rows on {s['gpus']} x {s['device']} (profile {s['profile']}):\n"
            f"  before (DDP over every GPU, views drawn on the CPU): {s['before']['wall_h']:.1f} h wall, "
            f"{s['before']['gpu_h']:.1f} GPU-h held\n"
            f"  after (a row per GPU from the queue, longest first, views on the device): "
            f"{s['after']['wall_h']:.2f} h wall, {s['after']['gpu_h']:.1f} GPU-h held\n"
            f"  useful work: {s['useful_gpu_h']:.1f} GPU-h (after / useful {s['after_over_useful']:.2f})")
