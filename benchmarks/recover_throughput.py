"""Recover (LPLD class-wise) throughput against ``recover.classes_per_step``.

    python benchmarks/recover_throughput.py                       # CPU: ResNet-18, 32 px, 10 classes x 4 images
    python benchmarks/recover_throughput.py --per-step 1 5 10 --image-size 16 --json

Prints, in one run on one machine, for each classes-per-step value, the recover throughput in
*class-iterations per second* (classes x iterations / wall time: how fast a run of many classes
advances) and images x iterations per second, of ``hello_ray.stages.recover_core.recover_images``
with ``variant="lpld"`` and ``units_per_step`` = classes per step: every class's ``ipc`` images
alone in a batch (``batch_size = ipc``, as LPLD runs), against that class's own BN statistics
(computed beforehand from random images: only the cost is measured). The observer is a random-init
zoo network in eval mode. Cases run in rounds (``--rounds``), each round in a rotated order after
one untimed warm-up run of every case, and each case reports its median round: on a shared
machine no case gains from running first or last. The run also prints the largest uint8
difference between the images of the first case and every other (float rounding only; see
``recover_core``'s docstring for why Adam can amplify it in a few pixels).

On the CPU torch runs with ``--threads`` intra-op threads (default 1, as a 0.5-CPU Ray actor gets
OMP_NUM_THREADS=1); there a step is compute-bound, so packing saves only per-pass overheads. On a
GPU (``--device cuda``) the point is to fill the device, and the gain is larger.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hello_ray.models.zoo import build_model  # noqa: E402
from hello_ray.stages import recover_core as core  # noqa: E402
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", help="zoo observer (needs BatchNorm)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--ipc", type=int, default=4, help="images per class (one batch per class, as LPLD)")
    ap.add_argument("--iterations", type=int, default=20, help="recover iterations per class")
    ap.add_argument("--per-step", type=int, nargs="+", default=[1, 10], help="classes per step to compare")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds over all cases, in rotated order")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true", help=f"also write {RESULTS}/recover_throughput_<device>.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {args.threads} threads"
    size, C, ipc = args.image_size, args.classes, args.ipc
    print(f"device {device} ({what}), torch {torch.__version__}, {args.model} random init, {size} px, "
          f"lpld: {C} classes x {ipc} images, {args.iterations} iterations, {args.rounds} rounds, "
          f"{datetime.date.today().isoformat()}", flush=True)

    torch.manual_seed(0)
    observer = build_model(args.model, C, size).eval().requires_grad_(False).to(device)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(C * 8, size, size, 3, generator=g) * 255).to(torch.uint8)
    stats = core.class_stats(observer, images, torch.arange(C).repeat(8), C, device=device)
    jitter = max(1, size // 8)

    def run(per_step: int, iterations: int) -> tuple[float, torch.Tensor]:
        s = core.RecoverSettings(iterations=iterations, lr=0.25, r_bn=0.01, first_bn_multiplier=10.0, jitter=jitter)
        sync(device)
        t0 = time.perf_counter()
        out, _ = core.recover_images(observer, "lpld", C, ipc, ipc, s, 0, size, stats, device=device,
                                     units_per_step=per_step)
        sync(device)
        return time.perf_counter() - t0, out

    cases = list(dict.fromkeys(args.per_step))
    for k in cases:                                              # untimed: allocator and kernel caches warm
        run(k, 2)
    seconds: dict[int, list[float]] = {k: [] for k in cases}
    images_of: dict[int, torch.Tensor] = {}
    for r in range(args.rounds):
        shift = r % len(cases)
        for k in cases[shift:] + cases[:shift]:
            dt, images_of[k] = run(k, args.iterations)
            seconds[k].append(dt)

    rows = []
    base = statistics.median(seconds[cases[0]])
    print(f"\n{'classes/step':>12} {'steps':>6} {'median s':>9} {'class-it/s':>11} {'image-it/s':>11} "
          f"{'ms/step':>8} {'speed-up':>9} {'max uint8 diff':>15}")
    for k in cases:
        med = statistics.median(seconds[k])
        steps = -(-C // k) * args.iterations
        diff = int((images_of[k].int() - images_of[cases[0]].int()).abs().max())
        row = {"classes_per_step": k, "median_s": round(med, 3), "rounds_s": [round(s, 3) for s in seconds[k]],
               "class_iterations_per_s": round(C * args.iterations / med, 2),
               "image_iterations_per_s": round(C * ipc * args.iterations / med, 1),
               "ms_per_step": round(1e3 * med / steps, 2), "speedup": round(base / med, 2),
               "max_uint8_diff_vs_first": diff}
        rows.append(row)
        print(f"{k:>12} {steps:>6} {med:>9.2f} {row['class_iterations_per_s']:>11.2f} "
              f"{row['image_iterations_per_s']:>11.1f} {row['ms_per_step']:>8.1f} {row['speedup']:>8.2f}x {diff:>15}")
    if args.json:
        os.makedirs(RESULTS, exist_ok=True)
        path = os.path.join(RESULTS, f"recover_throughput_{device.type}.json")
        with open(path, "w") as f:
            json.dump({"device": what, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                       "model": args.model, "image_size": size, "classes": C, "ipc": ipc,
                       "iterations": args.iterations, "rounds": args.rounds, "rows": rows}, f, indent=1)
        print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
