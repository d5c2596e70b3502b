"""Student training step with projector labels vs teacher labels vs hard labels.

    python benchmarks/student_step.py                           # CPU defaults: batch 16, 224 px
    python benchmarks/student_step.py --batch 100 --image-size 224 --steps 20   # the published setting

Prints, in one run on one machine, the mean time of one student step (augment + label + forward +
backward + AdamW, ``hello_ray.stages.evaluate_core.train_student``, first step excluded) and the
peak memory of the run for a ResNet-18 student labelled by:

- ``hard``: class ids (no labeller; the floor of any step time);
- ``teacher``: a ResNet-18 observer (random init: only the cost is measured);
- ``projector``: CLIP + LoRA *merged* into the base weights, for the tiny test CLIP and for
  OpenAI's RN50 architecture (both ``pretrained="random-init"``: seeded weights made once in the
  local cache, nothing is downloaded; the cost is that of real weights),

and the ratios projector/teacher (published: 0.21 s / 0.12 s = 1.75x on an A5000; goal <= 1.3x)
and projector/hard, for each labelling precision of ``--precisions`` (``evaluate.label_precision``:
fp32, or bf16 autocast; teacher and projector always at the same precision). Labellers run as
``evaluate`` runs them (``hello_ray.labels.prepare_labeller``: BN folded, CLIP's attention pool
for its one output token, channels-last, ``torch.inference_mode``); the student trains
channels-last as in ``evaluate``. Peak memory: ``torch.cuda.max_memory_allocated`` on GPU, the process's peak RSS on CPU
(reset per case, so it includes everything resident: compare differences, not totals). Cases run
in rounds (``--rounds``), each round in a rotated order after one untimed warm-up run, and each
case reports its median round: on a shared machine no case gains from running first or last.

bf16 is measured by default only where the device computes it natively (``runtime.native_bf16``:
Ampere+ GPUs, AVX-512 CPUs); elsewhere it is emulated and only slower (``--precisions fp32 bf16``
measures it anyway). The FLOP line counts, per image, the student's forward + backward and each
labeller's forward (``torch.utils.flop_counter``), and the step-time ratio those FLOPs alone would
give: where the measured ratio sits near it, the step is compute-bound and only a cheaper labeller
(fewer FLOPs, or bf16 units) moves it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hello_ray.labels import HardLabels, LabelStrategy, ProjectorLabels, TeacherLabels  # noqa: E402
from hello_ray.models.clip import RANDOM_INIT  # noqa: E402
from hello_ray.models.projector import Projector  # noqa: E402
from hello_ray.models.zoo import build_model  # noqa: E402
from hello_ray.runtime import native_bf16, seed_everything  # noqa: E402
from hello_ray.measure import PeakMemory  # noqa: E402
from hello_ray.stages.evaluate_core import TrainSettings, train_student  # noqa: E402


def measure(strategy: LabelStrategy, args, device: torch.device,
            images_device: torch.device | None = None) -> dict:
    """One student run; its images sit on the CPU as ``evaluate`` keeps them (the views are drawn
    there), or on ``images_device`` (views drawn where the student trains)."""
    seed_everything(0)
    n = 2 * args.batch                                         # two steps per epoch
    images = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8)
    if images_device is not None:
        images = images.to(images_device)
    labels = torch.arange(n) % args.classes
    student = build_model("resnet18", args.classes, args.image_size).to(device, memory_format=torch.channels_last)
    s = TrainSettings(epochs=max(1, (args.steps + 1 + 1) // 2), batch_size=args.batch, lr=1e-3, weight_decay=0.01,
                      cutmix_alpha=1.0, loss="mse_ce", ce_weight=0.025, temperature=4.0,
                      image_size=args.image_size)
    with PeakMemory(device) as mem:
        stats = train_student(student, images, labels, strategy, s, seed=0, device=device)
    return {"step_s": stats["step_s"], "steps": stats["steps"], "peak_mib": mem.peak_bytes / 2**20,
            "mem_kind": mem.kind}


def flops_per_image(fn, image_size: int, device: torch.device) -> float:
    """FLOPs of ``fn(x)`` for one image [1, 3, S, S] (convolutions and matmuls, as counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        fn(x)
    return float(counter.get_total_flops())


def student_flops(classes: int, image_size: int, device: torch.device) -> float:
    """Forward + backward FLOPs of one ResNet-18 student image (the optimizer step is negligible)."""
    student = build_model("resnet18", classes, image_size).to(device, memory_format=torch.channels_last).train()
    return flops_per_image(lambda x: student(x).sum().backward(), image_size, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--batch", type=int, default=100 if cuda else 16)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000 if cuda else 100)
    ap.add_argument("--steps", type=int, default=20 if cuda else 5, help="timed steps (one more is warm-up)")
    ap.add_argument("--rounds", type=int, default=3 if cuda else 2,
                    help="rounds over all cases, in rotated order; each case reports its median round")
    ap.add_argument("--clip", nargs="+", default=["hello-tiny-rn", "RN50"])
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = native_bf16(device)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"] if bf16 else ["fp32"],
                    choices=["fp32", "bf16"],
                    help="labelling precisions to measure (teacher and projector alike); default fp32, "
                         "plus bf16 where the device has native bf16")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    what = (torch.cuda.get_device_name() if cuda
            else f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    print(f"device {device} ({what}; native bf16: {'yes' if bf16 else 'no'}), "
          f"ResNet-18 student, batch {args.batch}, {args.image_size} px, {args.classes} classes, "
          f"{args.steps} timed steps x {args.rounds} rounds, precisions {' '.join(args.precisions)}", flush=True)

    # A case is (labeller, precision). Each case builds its labeller afresh and drops it after,
    # so the peak memory of a case holds that labeller's weights and no other's.
    def projector(clip: str):
        def build() -> ProjectorLabels:
            names = [f"class {i}" for i in range(args.classes)]
            proj = Projector.from_clip(clip, RANDOM_INIT, class_names=names)
            proj.add_lora(8, 64 if args.classes <= 100 else 128).merge_lora(unload=True)  # as evaluate labels
            return ProjectorLabels(proj.eval(), args.classes, args.image_size, adapter_bytes=0)
        return build

    factories = {
        "hard": lambda: HardLabels(torch.zeros(1).numpy(), args.classes, 0),
        "teacher (resnet18)": lambda: TeacherLabels(build_model("resnet18", args.classes, args.image_size),
                                                    args.classes, args.image_size),
        **{f"projector ({clip})": projector(clip) for clip in args.clip},
    }
    cases = [("hard", None)] + [(name, prec) for prec in args.precisions for name in factories if name != "hard"]

    def case_name(name: str, prec: str | None) -> str:
        return name if prec is None else f"{name} {prec}"

    # FLOPs per image: what the ratio would be if every FLOP cost the same time.
    flops = {"student": student_flops(args.classes, args.image_size, device)}
    for name in factories:
        if name != "hard":
            labeller = factories[name]().to(device)
            flops[name] = flops_per_image(lambda x: labeller.logits(x), args.image_size, device)
            del labeller
    print("GFLOPs per image: student fwd+bwd {:.2f}; ".format(flops["student"] / 1e9)
          + "; ".join(f"{k} fwd {v / 1e9:.2f}" for k, v in flops.items() if k != "student"), flush=True)

    # One untimed run first: allocator and oneDNN/cuDNN kernel caches warm for everyone.
    measure(factories["hard"](), argparse.Namespace(**{**vars(args), "steps": 2}), device)
    rounds: dict[str, list[dict]] = {case_name(*c): [] for c in cases}
    for r in range(args.rounds):
        shift = r % len(cases)                                   # rotate: no case always goes first
        for name, prec in cases[shift:] + cases[:shift]:
            torch.manual_seed(0)
            strategy = factories[name]().to(device)
            if prec is not None:
                strategy.with_precision(prec)
            rounds[case_name(name, prec)].append(measure(strategy, args, device))
            del strategy
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        print(f"  round {r + 1}/{args.rounds} done", flush=True)
    results: dict[str, dict] = {}
    for key, runs in rounds.items():
        step = float(np.median([x["step_s"] for x in runs]))
        results[key] = {"step_s": step, "step_s_rounds": [x["step_s"] for x in runs],
                        "peak_mib": max(x["peak_mib"] for x in runs), "mem_kind": runs[0]["mem_kind"],
                        "steps": runs[0]["steps"]}
        r = results[key]
        print(f"  {key:<32} step {step * 1e3:8.1f} ms (rounds: "
              f"{', '.join(f'{x * 1e3:.0f}' for x in r['step_s_rounds'])})   "
              f"peak {r['peak_mib']:8.0f} MiB ({r['mem_kind']})", flush=True)
    h = results["hard"]
    print("ratios (median step time; published projector/teacher 1.75x, goal <= 1.3x; "
          "'FLOPs' = (student + projector) / (student + teacher) FLOPs):")
    f_s, f_t = flops["student"], flops["teacher (resnet18)"]
    for prec in args.precisions:
        t = results[f"teacher (resnet18) {prec}"]
        for clip in args.clip:
            p = results[f"projector ({clip}) {prec}"]
            f_p = flops[f"projector ({clip})"]
            print(f"  {clip:<14} {prec}  projector/teacher {p['step_s'] / t['step_s']:.2f}x "
                  f"(FLOPs {(f_s + f_p) / (f_s + f_t):.2f}x)   "
                  f"projector/hard {p['step_s'] / h['step_s']:.2f}x   "
                  f"peak memory projector/teacher {p['peak_mib'] / t['peak_mib']:.2f}x")
    if args.json:
        print(json.dumps({"args": vars(args), "device": str(device), "native_bf16": bf16, "flops": flops,
                          "results": results}, indent=1))


if __name__ == "__main__":
    main()
