"""GPU figures of the benchmarks and of every stage's compute, in one prepared run without Ray.

    python benchmarks/gpu_check.py --out gpu_check.json          # on a GPU machine: ImageNet shapes
    python benchmarks/gpu_check.py --small --strict --out x.json # a few seconds on a CPU: the same code, tiny shapes

Built for a GPU machine that has PyTorch but no Ray, no open_clip and no package registry: it
imports only plain-PyTorch code (``hello_ray/stages/*_core.py``, ``hello_ray/labels/``,
``hello_ray/models/*`` and the CPU benchmarks' own functions) and checks that Ray stayed out of
``sys.modules``. open_clip and its few pure-Python needs travel as wheels (docs/benchmarks.md, On a GPU).
Every weight is ``random-init`` (seeded, made locally, nothing downloaded): the cost is that of real
weights. Shapes (full run): ImageNet-1K, 224 px, 1000 classes, OpenAI's RN50 CLIP with LoRA
(conv rank 8, head rank 128), ResNet-18 teachers, observer and student.

Sections (each one's failure is recorded in the JSON and the run goes on; ``--strict`` raises):

- ``student_step``: ``benchmarks/student_step.py``'s measure (``evaluate_core.train_student``) with
  hard, teacher (ResNet-18) and projector (RN50, LoRA merged) labels, fp32 and bf16 labelling, the
  images on the CPU as ``evaluate`` keeps them (views drawn there) and resident on the device;
  median of rounds in rotated order; peak memory; the projector/teacher ratio (goal <= 1.3) with a
  breakdown of one step (views, labelling forward, student update) and a torch.profiler summary.
- ``labeller_prep``: how many BatchNorms ``labels.prepare_labeller`` folds on the device (cuDNN TF32
  as set, and off while preparing) and each prepared labeller's bf16 forward.
- ``projector_step``: ``benchmarks/projector_step.py``'s bench_clip (LoRA train step, labelling
  forwards unmerged / merged / prepared, each vs a ResNet-18 forward).
- ``select_score``: the selection's bare observer forward (``select_core.score_crops``, pad mode,
  ResNet-18 observer, crops of 224 // 2 px held on the CPU as the scoring actors get them): crops/s.
- ``teachers_step``, ``transfer_step``, ``refine_step``, ``recover_step`` (+ the class-statistics
  pass): one step of each stage's compute, with its dtype and peak memory.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hello_ray.config import TeacherConfig  # noqa: E402
from hello_ray.labels import HardLabels, ProjectorLabels, TeacherLabels  # noqa: E402
from hello_ray.views import view_batch  # noqa: E402
from hello_ray.models.clip import RANDOM_INIT  # noqa: E402
from hello_ray.models.ensemble import TeacherEnsemble  # noqa: E402
from hello_ray.models.projector import Projector  # noqa: E402
from hello_ray.models.zoo import build_model  # noqa: E402
from hello_ray.runtime import auto_bf16, native_bf16  # noqa: E402
from hello_ray.stages import recover_core, refine_core, select_core, teachers_core, transfer_core  # noqa: E402
from hello_ray.measure import PeakMemory  # noqa: E402
from projector_step import bench_clip  # noqa: E402
from student_step import flops_per_image, measure, student_flops  # noqa: E402

GOAL_RATIO = 1.3


@dataclass
class Shapes:
    """Every size the run uses; ``imagenet`` is the published setting, ``small`` a CPU smoke run."""
    image_size: int
    classes: int
    clip: str
    conv_rank: int
    head_rank: int
    student_batch: int
    student_steps: int
    rounds: int
    projector_batch: int
    projector_repeats: int
    crops: int
    crop_batch: int
    teacher_batch: int
    n_teachers: int
    transfer_batch: int
    refine_batch: int
    recover_batch: int
    stats_images: int
    steps: int          # timed steps of each stage's compute
    warmup: int

    @classmethod
    def imagenet(cls) -> "Shapes":
        return cls(image_size=224, classes=1000, clip="RN50", conv_rank=8, head_rank=128, student_batch=100,
                   student_steps=12, rounds=2, projector_batch=256, projector_repeats=10, crops=5120,
                   crop_batch=256, teacher_batch=256, n_teachers=9, transfer_batch=256, refine_batch=100,
                   recover_batch=100, stats_images=2048, steps=8, warmup=2)

    @classmethod
    def small(cls) -> "Shapes":
        return cls(image_size=32, classes=10, clip="hello-tiny-rn", conv_rank=4, head_rank=8, student_batch=8,
                   student_steps=2, rounds=1, projector_batch=8, projector_repeats=1, crops=32, crop_batch=16,
                   teacher_batch=8, n_teachers=2, transfer_batch=8, refine_batch=4, recover_batch=4,
                   stats_images=16, steps=2, warmup=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int) -> dict[str, float]:
    """Per-call seconds of ``fn`` (synchronised around each call): median, mean, min over ``iters``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": float(np.median(times)), "mean_s": float(np.mean(times)), "min_s": float(min(times)),
            "iters": iters}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def mib(n: int) -> float:
    return round(n / 2**20, 1)


def class_names(n: int) -> list[str]:
    return [f"class {i}" for i in range(n)]


def merged_projector(sh: Shapes, device: torch.device) -> Projector:
    """RN50 (or the tiny CLIP) random-init, prompts encoded on ``device``, LoRA added and merged as
    ``evaluate`` labels; returned on the CPU (ProjectorLabels probes its class count there)."""
    proj = Projector.from_clip(sh.clip, RANDOM_INIT, class_names=class_names(sh.classes), device=device)
    proj.add_lora(sh.conv_rank, sh.head_rank).merge_lora(unload=True)
    return proj.eval().cpu()


# ------------------------------------------------------------------------------------ sections

def env_section(device: torch.device) -> dict[str, Any]:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "missing"

    out: dict[str, Any] = {
        "device": str(device), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "open_clip_torch": version("open_clip_torch"), "peft": version("peft"),
        "timm": version("timm"), "torchvision": version("torchvision"), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "native_bf16": native_bf16(device),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "ray_imported": any(m == "ray" or m.startswith("ray.") for m in sys.modules),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_mib=mib(p.total_memory),
                   multiprocessors=p.multi_processor_count)
    else:
        out["name"] = f"CPU ({platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()})"
    return out


def student_section(sh: Shapes, device: torch.device, base: Projector, strict: bool = False) -> dict[str, Any]:
    args = argparse.Namespace(batch=sh.student_batch, image_size=sh.image_size, classes=sh.classes,
                              steps=sh.student_steps)
    precisions = ["fp32", "bf16"]
    factories: dict[str, Callable[[], Any]] = {
        "hard": lambda: HardLabels(np.zeros(1), sh.classes, 0),
        "teacher": lambda: TeacherLabels(build_model("resnet18", sh.classes, sh.image_size), sh.classes,
                                         sh.image_size),
        "projector": lambda: ProjectorLabels(copy.deepcopy(base), sh.classes, sh.image_size, adapter_bytes=0),
    }
    where = {"cpu": None, "device": device}   # images on the CPU (as evaluate) / resident on the device
    cases = [(lab, prec, w) for w in where for lab in factories
             for prec in ([None] if lab == "hard" else precisions)]

    def name(lab: str, prec: str | None, w: str) -> str:
        return f"{lab}{'' if prec is None else ' ' + prec} images@{w}"

    measure(factories["hard"](), argparse.Namespace(**{**vars(args), "steps": 2}), device)  # warm caches
    runs: dict[str, list[dict]] = {name(*c): [] for c in cases}
    errors: dict[str, str] = {}
    for r in range(sh.rounds):
        shift = (r * 3) % len(cases)
        for lab, prec, w in cases[shift:] + cases[:shift]:
            if name(lab, prec, w) in errors:
                continue
            try:   # one case's failure (say, views drawn on the device) keeps the other cases' figures
                torch.manual_seed(0)
                strategy = factories[lab]().to(device)
                if prec is not None:
                    strategy.with_precision(prec)
                runs[name(lab, prec, w)].append(measure(strategy, args, device, where[w]))
                del strategy
            except Exception as e:
                if strict:
                    raise
                errors[name(lab, prec, w)] = "".join(traceback.format_exception(e))[-2000:]
                print(f"  student_step {name(lab, prec, w)} FAILED: {e!r}", flush=True)
            free(device)
        print(f"  student_step round {r + 1}/{sh.rounds}", flush=True)
    results = {}
    for key, rs in runs.items():
        if not rs:
            continue
        results[key] = {"step_ms": round(1e3 * float(np.median([x["step_s"] for x in rs])), 2),
                        "rounds_ms": [round(1e3 * x["step_s"], 2) for x in rs],
                        "peak_mib": round(max(x["peak_mib"] for x in rs), 1), "mem_kind": rs[0]["mem_kind"],
                        "steps": rs[0]["steps"]}
    ratios = {}
    for w in where:
        for prec in precisions:
            keys = (name("teacher", prec, w), name("projector", prec, w), name("hard", None, w))
            if not all(k in results for k in keys):
                continue
            t, p, h = (results[k] for k in keys)
            ratios[f"{prec} images@{w}"] = {"projector/teacher": round(p["step_ms"] / t["step_ms"], 3),
                                           "projector/hard": round(p["step_ms"] / h["step_ms"], 3),
                                           "teacher/hard": round(t["step_ms"] / h["step_ms"], 3)}
    flops = {"student_fwd_bwd": student_flops(sh.classes, sh.image_size, device)}
    for lab in ("teacher", "projector"):
        labeller = factories[lab]().to(device)
        flops[f"{lab}_fwd"] = flops_per_image(lambda x: labeller.logits(x), sh.image_size, device)
    f_s = flops["student_fwd_bwd"]
    flops_ratio = (f_s + flops["projector_fwd"]) / (f_s + flops["teacher_fwd"])
    return {"batch": sh.student_batch, "image_size": sh.image_size, "classes": sh.classes, "clip": sh.clip,
            "results": results, "ratios": ratios, "case_errors": errors, "goal_projector_over_teacher": GOAL_RATIO,
            "gflops_per_image": {k: round(v / 1e9, 3) for k, v in flops.items()},
            "flops_ratio_projector_over_teacher": round(flops_ratio, 3)}


def breakdown_section(sh: Shapes, device: torch.device, base: Projector) -> dict[str, Any]:
    """Where a labelled student step's time goes: drawing the views (CPU-held images, as evaluate,
    and device-held), each labeller's forward, the student's forward + backward + AdamW; and a
    torch.profiler summary of three projector-labelled steps (device-held images)."""
    from hello_ray.stages.evaluate_core import TrainSettings, student_loss
    from hello_ray.labels import LabelContext

    n, size = sh.student_batch, sh.image_size
    g = torch.Generator().manual_seed(0)
    images_cpu = torch.randint(0, 256, (2 * n, 3, size, size), dtype=torch.uint8)
    images_dev = images_cpu.to(device)
    labels = torch.arange(2 * n) % sh.classes
    index = torch.randperm(2 * n, generator=g)[:n]
    iters, warm = max(2, sh.steps), sh.warmup
    out: dict[str, Any] = {}
    out["views_images@cpu_ms"] = 1e3 * timed(lambda: view_batch(images_cpu, index, size, 1.0, g)[1].to(device),
                                             device, iters, warm)["median_s"]
    out["views_images@device_ms"] = 1e3 * timed(lambda: view_batch(images_dev, index, size, 1.0, g),
                                                device, iters, warm)["median_s"]
    view, x = view_batch(images_dev, index, size, 1.0, g)
    x = x.contiguous(memory_format=torch.channels_last)
    labellers = {"teacher": TeacherLabels(build_model("resnet18", sh.classes, size), sh.classes, size).to(device),
                 "projector": ProjectorLabels(copy.deepcopy(base), sh.classes, size, 0).to(device)}
    for lab, strat in labellers.items():
        for prec in ("fp32", "bf16"):
            strat.with_precision(prec)
            out[f"label_{lab}_{prec}_ms"] = 1e3 * timed(lambda: strat.logits(x), device, iters, warm)["median_s"]
    student = build_model("resnet18", sh.classes, size).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.01)
    s = TrainSettings(epochs=1, batch_size=n, lr=1e-3, weight_decay=0.01, cutmix_alpha=1.0, loss="mse_ce",
                      ce_weight=0.025, temperature=4.0, image_size=size)
    y = labels[view.index].to(device)
    ctx = LabelContext(y_a=y, y_b=y[view.perm.to(device)], lam=view.lam, num_classes=sh.classes)
    target = labellers["teacher"].logits(x)

    def update() -> None:
        loss = student_loss(student(x), target, ctx, True, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out["student_update_ms"] = 1e3 * timed(update, device, iters, warm)["median_s"]

    # torch.profiler over three projector-labelled (bf16) steps: the top operators by device time
    proj = labellers["projector"].with_precision("bf16")

    def step() -> None:
        _, xv = view_batch(images_dev, index, size, 1.0, g)
        xv = xv.contiguous(memory_format=torch.channels_last)
        t = proj.logits(xv)
        loss = student_loss(student(xv), t, ctx, True, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step()
    sync(device)
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            with record_function("label_projector"):
                _, xv = view_batch(images_dev, index, size, 1.0, g)
                t = proj.logits(xv.contiguous(memory_format=torch.channels_last))
            with record_function("student_update"):
                loss = student_loss(student(xv.contiguous(memory_format=torch.channels_last)), t, ctx, True, s)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        sync(device)
    events = prof.key_averages()

    def dev_time(e) -> float:  # microseconds on the device (CPU time when there is none)
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            v = getattr(e, attr, None)
            if v:
                return float(v)
        return float(e.self_cpu_time_total) if device.type == "cpu" else 0.0
    # aten operators only: the record_function ranges and the kernels under an operator would count
    # the same device time twice
    ops = [e for e in events if e.key.startswith("aten::")]
    total = sum(dev_time(e) for e in ops) or 1.0
    top = sorted(ops, key=dev_time, reverse=True)[:8]
    out["profile_top_ops"] = [{"op": e.key, "device_ms_per_step": round(dev_time(e) / 3e3, 3),
                               "share": round(dev_time(e) / total, 3), "calls_per_step": e.count / 3}
                              for e in top]
    ranges = {e.key: e for e in events if e.key in ("label_projector", "student_update")}
    out["profile_ranges_cpu_ms_per_step"] = {k: round(e.cpu_time_total / 3e3, 3) for k, e in ranges.items()}
    t_lab, p_lab = out["label_teacher_bf16_ms"], out["label_projector_bf16_ms"]
    out["line"] = (f"projector-labelled step (bf16) = views {out['views_images@cpu_ms']:.1f} ms (images@cpu) or "
                   f"{out['views_images@device_ms']:.1f} ms (images@device) + label {p_lab:.1f} ms (teacher "
                   f"{t_lab:.1f} ms) + student update {out['student_update_ms']:.1f} ms; top device ops: "
                   + ", ".join(f"{d['op']} {100 * d['share']:.0f}%" for d in out["profile_top_ops"][:4]))
    out = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}
    return out


def labeller_prep_section(sh: Shapes, device: torch.device, base: Projector) -> dict[str, Any]:
    """How many BatchNorms ``prepare_labeller`` folds on this device (its probe check refuses a fold
    that moves the logits by more than 1e-3 of their scale), with cuDNN's TF32 as set and with TF32
    off during the preparation, and the bf16 labelling forward of each result."""
    from torch import nn

    from hello_ray.labels import prepare_labeller

    x = torch.rand(sh.student_batch, 3, sh.image_size, sh.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    out: dict[str, Any] = {}
    models = {"teacher": lambda: build_model("resnet18", sh.classes, sh.image_size),
              "projector": lambda: copy.deepcopy(base)}
    for lab, make in models.items():
        for tf32 in (torch.backends.cudnn.allow_tf32, False):
            saved = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = tf32
            try:
                model = make().eval()
                bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
                prepared = prepare_labeller(model, device, sh.image_size)
            finally:
                torch.backends.cudnn.allow_tf32 = saved
            left = sum(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())

            def label() -> None:
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                    prepared(x)
            t = timed(label, device, max(2, sh.steps), sh.warmup)["median_s"]
            out[f"{lab} prepared with cudnn tf32 {'on' if tf32 else 'off'}"] = {
                "bn": bns, "bn_left": left, "label_bf16_ms": round(1e3 * t, 3)}
    return out


def projector_section(sh: Shapes, device: torch.device) -> dict[str, Any]:
    with PeakMemory(device) as mem:
        r = bench_clip(sh.clip, sh.image_size, sh.projector_batch, sh.classes, sh.conv_rank, sh.head_rank,
                       sh.projector_repeats, device)
    unit = r["teacher_fwd_fp32"]
    return {"clip": sh.clip, "batch": sh.projector_batch, "image_size": sh.image_size, "classes": sh.classes,
            "ms": {k: round(1e3 * v, 3) for k, v in r.items()},
            "x_teacher_fwd_fp32": {k: round(v / unit, 3) for k, v in r.items()},
            "train_step_dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
            "peak_mib": mib(mem.peak_bytes), "mem_kind": mem.kind}


def select_section(sh: Shapes, device: torch.device) -> dict[str, Any]:
    size, c = sh.image_size, sh.image_size // 2           # factor 2: crops of half the side, padded
    observer = build_model("resnet18", sh.classes, size).eval().requires_grad_(False).to(device)
    crops = torch.randint(0, 256, (sh.crops, c, c, 3), dtype=torch.uint8)   # on the CPU, as actors get them
    labels = torch.randint(0, sh.classes, (sh.crops,))
    out: dict[str, Any] = {"observer": "resnet18", "image_size": size, "crop_size": c, "show": "pad",
                           "crops": sh.crops, "batch": sh.crop_batch}
    for dtype, amp in (("fp32", contextlib.nullcontext), ("bf16 autocast (not what the stage runs)",
                       lambda: torch.autocast(device.type, dtype=torch.bfloat16))):
        def score() -> None:
            with amp():
                select_core.score_crops(observer, crops, labels, size, "pad", sh.crop_batch, device)
        score_first = lambda: select_core.score_crops(observer, crops[:sh.crop_batch], labels[:sh.crop_batch],  # noqa: E731
                                                      size, "pad", sh.crop_batch, device)
        with amp():
            score_first()                                                   # warm-up
        with PeakMemory(device) as mem:
            t = timed(score, device, 1, 0)["median_s"]
        key = "fp32" if dtype == "fp32" else "bf16"
        out[key] = {"dtype": dtype, "crops_per_s": round(sh.crops / t, 1), "seconds": round(t, 3),
                    "peak_mib": mib(mem.peak_bytes)}
    return out


def teachers_section(sh: Shapes, device: torch.device) -> dict[str, Any]:
    size, n = sh.image_size, sh.teacher_batch
    model = build_model("resnet18", sh.classes, size).to(device)
    opt, _ = teachers_core.make_optimizer(model, TeacherConfig())
    gen = torch.Generator(device=device).manual_seed(0)
    batch = {"image": torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, device=device),
             "label": torch.randint(0, sh.classes, (n,), device=device)}

    def augment(im: torch.Tensor) -> torch.Tensor:
        return teachers_core.train_augment(im, size, gen)
    teachers_core.train_epoch(model, [batch] * sh.warmup, opt, device, augment)
    sync(device)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        teachers_core.train_epoch(model, [batch] * sh.steps, opt, device, augment)
        sync(device)
        dt = (time.perf_counter() - t0) / sh.steps
    return {"model": "resnet18", "batch": n, "image_size": size, "dtype": "fp32 (cuDNN TF32 as default)",
            "step_ms": round(1e3 * dt, 2), "images_per_s": round(n / dt, 1), "peak_mib": mib(mem.peak_bytes),
            "note": "uint8 batch resident on the device; the loader is not timed; augmentation on the device"}


def transfer_section(sh: Shapes, device: torch.device) -> dict[str, Any]:
    size, n = sh.image_size, sh.transfer_batch
    proj = Projector.from_clip(sh.clip, RANDOM_INIT, class_names=class_names(sh.classes), device=device)
    proj = proj.to(device).add_lora(sh.conv_rank, sh.head_rank)
    teachers = TeacherEnsemble([build_model("resnet18", sh.classes, size) for _ in range(sh.n_teachers)]).to(device)
    opt = torch.optim.AdamW(transfer_core.lora_parameters(proj), lr=5e-4)
    x = torch.rand(n, 3, size, size, device=device)
    y = torch.randint(0, sh.classes, (n,), device=device)
    step = lambda: transfer_core.transfer_step(proj, teachers, x, y, opt, 0.1)  # noqa: E731
    for _ in range(sh.warmup):
        step()
    with PeakMemory(device) as mem:
        t = timed(step, device, sh.steps, 0)
    with torch.inference_mode():
        t_teach = timed(lambda: transfer_core.teacher_targets(teachers, x), device, sh.steps, 1)
    return {"clip": sh.clip, "n_teachers": sh.n_teachers, "batch": n, "image_size": size,
            "dtype": "bf16 autocast" if auto_bf16(device) else "fp32", "step_ms": round(1e3 * t["median_s"], 2),
            "of_which_teacher_targets_ms": round(1e3 * t_teach["median_s"], 2),
            "images_per_s": round(n / t["median_s"], 1), "peak_mib": mib(mem.peak_bytes)}


def refine_section(sh: Shapes, device: torch.device, base: Projector) -> dict[str, Any]:
    size, n = sh.image_size, sh.refine_batch
    proj = copy.deepcopy(base).to(device).eval().requires_grad_(False)
    x = torch.rand(n, 3, size, size, device=device)
    refine_core.refine_images(proj.encode, x, sh.warmup, 0.01, 2)          # warm-up
    sync(device)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        _, hist = refine_core.refine_images(proj.encode, x, sh.steps, 0.01, 2)
        sync(device)
        dt = (time.perf_counter() - t0) / sh.steps
    return {"encoder": f"{sh.clip} (LoRA merged)", "batch": n, "image_size": size, "factor": 2, "target": "joint",
            "dtype": "fp32 (no autocast in refine)", "step_ms": round(1e3 * dt, 2),
            "images_x_steps_per_s": round(n / dt, 1), "peak_mib": mib(mem.peak_bytes),
            "objective_first_last": [hist[0], hist[-1]]}


def recover_section(sh: Shapes, device: torch.device) -> dict[str, Any]:
    size, n = sh.image_size, sh.recover_batch
    observer = build_model("resnet18", sh.classes, size).eval().requires_grad_(False).to(device)
    targets = recover_core.running_moments(observer)
    labels = torch.arange(n) % sh.classes
    jitter = 32 if size >= 224 else max(1, size // 8)

    def run(iterations: int) -> recover_core.RecoverResult:
        s = recover_core.RecoverSettings(iterations=iterations, lr=0.25, r_bn=0.01, first_bn_multiplier=10.0,
                                         jitter=jitter)
        return recover_core.recover_unit(observer, labels, targets, s, seed=0, image_size=size, device=device)
    run(sh.warmup)
    sync(device)
    with PeakMemory(device) as mem:
        res = run(sh.steps)
    out = {"observer": "resnet18", "variant": "sre2l (global BN statistics)", "batch": n, "image_size": size,
           "dtype": "fp32", "iteration_ms": round(1e3 * res.seconds / sh.steps, 2),
           "peak_mib": mib(mem.peak_bytes),
           "objective_first_last": [res.objective[0], res.objective[-1]]}
    images = torch.randint(0, 256, (sh.stats_images, size, size, 3), dtype=torch.uint8)
    ys = torch.randint(0, sh.classes, (sh.stats_images,))
    recover_core.class_stats(observer, images[:256], ys[:256], sh.classes, 256, device)   # warm-up
    sync(device)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        recover_core.class_stats(observer, images, ys, sh.classes, 256, device)
        sync(device)
        dt = time.perf_counter() - t0
    out["class_stats"] = {"images_per_s": round(sh.stats_images / dt, 1), "batch": 256, "dtype": "fp32",
                          "peak_mib": mib(mem.peak_bytes), "note": "uint8 images on the CPU, as the actors get them"}
    return out


# ------------------------------------------------------------------------------------ driver

SECTIONS = ("student_step", "breakdown", "labeller_prep", "projector_step", "select_score", "teachers_step", "transfer_step",
            "refine_step", "recover_step")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run of the same code)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--strict", action="store_true", help="raise on the first failing section")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sh = Shapes.small() if args.small else Shapes.imagenet()
    report: dict[str, Any] = {"shapes": asdict(sh), "small": args.small, "env": env_section(device),
                              "sections": {}, "errors": {}}

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    save()
    print(f"gpu_check on {report['env']['name']} ({device}); shapes {'small' if args.small else 'imagenet'}",
          flush=True)
    t_all = time.perf_counter()
    base: Projector | None = None

    def projector_base() -> Projector:
        nonlocal base
        if base is None:
            base = merged_projector(sh, device)
        return base

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "student_step": lambda: student_section(sh, device, projector_base(), args.strict),
        "breakdown": lambda: breakdown_section(sh, device, projector_base()),
        "labeller_prep": lambda: labeller_prep_section(sh, device, projector_base()),
        "projector_step": lambda: projector_section(sh, device),
        "select_score": lambda: select_section(sh, device),
        "teachers_step": lambda: teachers_section(sh, device),
        "transfer_step": lambda: transfer_section(sh, device),
        "refine_step": lambda: refine_section(sh, device, projector_base()),
        "recover_step": lambda: recover_section(sh, device),
    }
    for name in args.only:
        t0 = time.perf_counter()
        try:
            result = runners[name]()
            result["section_s"] = round(time.perf_counter() - t0, 1)
            report["sections"][name] = result
            print(f"[{name}] {result['section_s']} s: {json.dumps(result)[:600]}", flush=True)
        except Exception as e:  # one section's failure must not lose the others' figures
            report["errors"][name] = "".join(traceback.format_exception(e))[-3000:]
            print(f"[{name}] FAILED: {e!r}", flush=True)
            if args.strict:
                save()
                raise
        finally:
            free(device)
        save()
    report["env"]["ray_imported"] = any(m == "ray" or m.startswith("ray.") for m in sys.modules)
    report["total_s"] = round(time.perf_counter() - t_all, 1)
    save()
    print(f"done in {report['total_s']} s; errors: {sorted(report['errors']) or 'none'}; "
          f"Ray imported: {report['env']['ray_imported']}; JSON: {args.out}", flush=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
