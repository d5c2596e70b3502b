"""The low-resolution protocol's model against the small-stem ResNet-18, side by side in one run.

    python benchmarks/lowres_models.py                      # 24 px (the demo) and 32 px (CIFAR), batch 25
    python benchmarks/lowres_models.py --sizes 32 --batch 50 --threads 2

For each model of ``--models`` and side of ``--sizes``: the median time of one student step
(forward + cross-entropy + backward + AdamW, channels-last as ``evaluate`` trains students) on
``--threads`` torch threads (1: what a half-CPU Ray worker gets), the FLOPs of one image's forward +
backward (``torch.utils.flop_counter``), the parameter count, and each model's step time relative to
the first model's. Cases run in rounds in a rotated order after one untimed warm-up, and each reports
its median round, so no case gains from running first or last on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from hello_ray.models.zoo import build_model, count_params  # noqa: E402
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)


def make_case(name: str, size: int, batch: int, classes: int):
    """A student, its optimizer and a fixed batch; returns a function that runs one step."""
    torch.manual_seed(0)
    model = build_model(name, classes, size).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, step


def flops_per_image(name: str, size: int, classes: int) -> float:
    model = build_model(name, classes, size)
    x = torch.rand(2, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.zeros(2, dtype=torch.long)).backward()
    return counter.get_total_flops() / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "conv3"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[24, 32])
    ap.add_argument("--batch", type=int, default=25, help="the demo's student batch")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="", help="also write the rows to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cases = {(m, s): make_case(m, s, args.batch, args.classes)[1] for s in args.sizes for m in args.models}
    for step in cases.values():  # untimed warm-up
        step()
    times: dict[tuple[str, int], list[float]] = {k: [] for k in cases}
    order = list(cases)
    for r in range(args.rounds):
        for k in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                cases[k]()
            times[k].append((time.perf_counter() - t0) / args.steps)

    rows = []
    for s in args.sizes:
        base = statistics.median(times[(args.models[0], s)])
        for m in args.models:
            step_s = statistics.median(times[(m, s)])
            rows.append({"model": m, "image_size": s, "batch": args.batch, "threads": args.threads,
                         "step_ms": round(1000 * step_s, 1),
                         "gflops_per_image": round(flops_per_image(m, s, args.classes) / 1e9, 3),
                         "params": count_params(build_model(m, args.classes, s)),
                         f"vs_{args.models[0]}": round(step_s / base, 3)})
    print(f"# {cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}, "
          f"{args.threads} thread(s), median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'model':10s} {'px':>4s} {'step ms':>8s} {'GFLOP/img':>10s} {'params':>11s} {'vs ' + args.models[0]:>12s}")
    for r in rows:
        print(f"{r['model']:10s} {r['image_size']:4d} {r['step_ms']:8.1f} {r['gflops_per_image']:10.3f} "
              f"{r['params']:11,d} {r[f'vs_{args.models[0]}']:12.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
