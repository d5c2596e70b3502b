"""How many ImageNet-sized JPEGs one CPU thread turns into 224 px training crops per second, by each
of the package's decode paths (no Ray: the cost per image is what a decode task or a worker pays).

    python benchmarks/decode_rate.py                              # 200 synthetic JPEGs, 3 rounds
    python benchmarks/decode_rate.py --out benchmarks/results/decode_rate_cpu.json

The JPEGs are ``hello-ray synth-data``'s (smooth noise at ImageNet's sizes: shorter side 300..500 px,
aspect 1:2..2:1, some greyscale and CMYK), encoded at quality 90. Paths, each over the same images:

- ``centre_square``: ``images.decode_resized`` (JPEG draft decode, shorter side to 224, centre crop):
  what the CPU tasks did before ``data.train_crop=whole``, and still do for val and select;
- ``whole_cpu``: ``images.decode_random_crop`` (full decode, RandomResizedCrop box over the whole
  image, PIL bilinear resize): the CPU tasks' training crop now;
- ``worker_cpu``: ``device_decode.decode_batch`` on the CPU (torchvision's ``decode_jpeg`` in batches
  of 32, crop and resize in torch): what ``data.decode=worker`` costs where the worker has no GPU.

Rounds are rotated; the first is a warm-up. ``torch.set_num_threads(1)``: one CPU's rate. Preflight
(``preflight/schedule.py``) reads ``images_per_s`` of ``whole_cpu`` to model how many CPUs keep a
GPU's teachers fed.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_name  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import numpy as np
    import torch

    from hello_ray.data.device_decode import decode_batch
    from hello_ray.data.images import decode_random_crop, decode_resized
    from hello_ray.data.synthetic import image_mode, synthetic_image

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    datas = []
    for i in range(a.images):
        buf = io.BytesIO()
        synthetic_image(rng, 300, 500, image_mode(i)).save(buf, format="JPEG", quality=90)
        datas.append(buf.getvalue())
    ids = [f"{i}.jpg" for i in range(a.images)]
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)

    def centre_square() -> None:
        for d, i in zip(datas, ids):
            decode_resized(d, i, a.size)

    def whole_cpu() -> None:
        g = torch.Generator().manual_seed(0)
        for d, i in zip(datas, ids):
            decode_random_crop(d, i, a.size, scale, ratio, g)

    def worker_cpu() -> None:
        g = torch.Generator().manual_seed(0)
        for s in range(0, len(datas), 32):
            decode_batch(datas[s:s + 32], ids[s:s + 32], a.size, torch.device("cpu"), scale, g)

    paths = {"centre_square": centre_square, "whole_cpu": whole_cpu, "worker_cpu": worker_cpu}
    times: dict[str, list[float]] = {p: [] for p in paths}
    for r in range(a.rounds + 1):
        order = list(paths)[r % len(paths):] + list(paths)[:r % len(paths)]
        for p in order:
            t0 = time.perf_counter()
            paths[p]()
            if r > 0:
                times[p].append(time.perf_counter() - t0)
    rates = {p: round(a.images * len(t) / sum(t), 1) for p, t in times.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    result = {"date": datetime.date.today().isoformat(), "commit": commit, "cpu": cpu_name(), "threads": 1,
              "images": a.images, "size": a.size, "jpeg": "synthetic, shorter side 300-500 px, quality 90",
              "images_per_s": rates}
    print(f"decode_rate {result['date']} {commit}, {result['cpu']}, one thread, {a.images} JPEGs -> {a.size} px")
    for p, v in rates.items():
        print(f"  {p:14s} {v:8.1f} images/s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
