"""The teachers' input pipeline: a global shuffle of the read bytes against a shuffled file list.

    python benchmarks/teachers_input.py                      # the demo digits, 3 passes each, 2 CPUs
    python benchmarks/teachers_input.py --max-per-class 30   # the smoke preset's 300 images
    python benchmarks/teachers_input.py --data s3://bucket/imagenet --cpus 16 --passes 2

Each pass reads the training split as the teachers stage feeds its workers (decoded to
``data.image_size``, batches of 32, the ``teachers`` local shuffle buffer) through one of:

- ``bytes``: ``ds.random_shuffle()`` after the read, the earlier rule (every pass waits until the
  whole split is read, and moves every image's bytes);
- ``files``: ``data.sources.shuffled_files``, the listing shuffled before the read (files or shards);
- ``files+whole``: the same, each image's RandomResizedCrop cut from the whole image as it is decoded
  (``data.train_crop=whole``, the default since; ``files`` is ``centre_square``'s decode).

It prints images/s and images/s per CPU of the local Ray for each, in one run, in a rotated order
(the first pass of each mode is a warm-up and is not counted).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="demo", help="data.source (default: the demo digits)")
    ap.add_argument("--image-size", type=int, default=24)
    ap.add_argument("--max-per-class", type=int, default=0, help="data.max_per_class (the smoke preset: 30)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--passes", type=int, default=3, help="timed passes per mode (after one warm-up)")
    args = ap.parse_args()

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    from hello_ray.config import DataConfig
    from hello_ray.data.augment import train_crop_scale
    from hello_ray.data.decode import decoded_split
    from hello_ray.data.sources import load_split, shuffled_files
    from hello_ray.store import open_store

    with tempfile.TemporaryDirectory() as d:
        store = open_store(d)
        data = DataConfig(source=args.data, image_size=args.image_size, max_per_class=args.max_per_class)
        split = load_split(data, data.train_split, store)
        modes = {"bytes": dataclasses.replace(split, ds=split.ds.random_shuffle()), "files": shuffled_files(split),
                 "files+whole": shuffled_files(split)}
        crop = {"files+whole": train_crop_scale(args.image_size)}
        times: dict[str, list[float]] = {m: [] for m in modes}
        n = 0
        for p in range(args.passes + 1):
            for m in list(modes)[p % len(modes):] + list(modes)[:p % len(modes)]:  # rotated
                t0 = time.perf_counter()
                rows = decoded_split(modes[m], data, columns=["image", "label"], train_crop=crop.get(m))
                n = sum(len(b["label"]) for b in rows.iter_batches(batch_size=32, batch_format="numpy",
                                                                  local_shuffle_buffer_size=256))
                if p > 0:
                    times[m].append(time.perf_counter() - t0)
    print(f"{n} images of {args.data} at {args.image_size} px, {args.cpus} CPUs, {args.passes} passes each")
    print(f"{'shuffle':<12} {'images/s':>9} {'per CPU':>8}")
    rate = {m: n * len(t) / sum(t) for m, t in times.items()}
    for m in modes:
        print(f"{m:<12} {rate[m]:9.1f} {rate[m] / args.cpus:8.1f}")
    print(f"files / bytes {rate['files'] / rate['bytes']:.2f}x")


if __name__ == "__main__":
    main()
