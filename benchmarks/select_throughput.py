"""Throughput and peak memory of the select stage (RDED scoring) against the bare observer.

    python benchmarks/select_throughput.py                 # 1500 (and 6000) images, 10 classes, 32 px, resnet18
    python benchmarks/select_throughput.py --images 2000 --image-size 64 --use-gpu

Prints, in one run on one machine:

- crops/s of the full Ray pipeline: ``crops scored / wall time of select.run`` (mipc cut,
  decode + crop tasks, scoring actors, top-k, re-cut, stitch, PNG write), Ray already up;
- crops/s of the bare observer forward (show + forward + cross-entropy, ``score_crops``) on
  the same crops in this process, crops prepared beforehand, with the same torch thread
  count as one scoring actor (Ray gives a 0.5-CPU actor OMP_NUM_THREADS=1);
- their ratio pipeline / bare (target >= 0.8);
- peak memory of the stage at 1x and 4x the input images (target: 4x within +15% of 1x).
  Measured as the summed PSS (proportional set size: shared pages such as the plasma
  object store split among the processes that map them, so counted once) of the driver and
  every process of its local Ray (GCS, raylet, workers, actors), sampled every 0.2 s during
  ``select.run``; each size runs on a fresh local Ray. Also printed: the peak minus the
  idle footprint just before the stage (what the stage itself adds).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402


class PssSampler:
    """Background thread: peak summed PSS of this process and all its descendants, and the CPU
    time of the scoring actors (to tell a starved actor from a slow one)."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0
        self.actor_cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def total(actor_cpu: dict[int, float] | None = None) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
                if actor_cpu is not None and "ObserverScorer" in " ".join(p.cmdline()):
                    t = p.cpu_times()
                    actor_cpu[p.pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.total(self.actor_cpu))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.total())


def write_dataset(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> None:
    """An ImageFolder train split of class-tinted noise PNGs (the encode cost is not timed)."""
    from hello_ray.data.images import encode_png

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / "train" / f"class_{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        tint = rng.integers(0, 256, size=3)
        for i in range(per_class):
            img = (0.6 * tint + 0.4 * rng.integers(0, 256, size=(size, size, 3))).astype(np.uint8)
            (d / f"img_{i:05d}.png").write_bytes(encode_png(img))


def write_teachers(store, model: str, classes: int, size: int) -> str:
    """A one-epoch teachers artifact (random-init observer) in the documented trajectory format."""
    import io

    from hello_ray.formats.trajectory import epoch_file, write_trajectory
    from hello_ray.models.zoo import build_model

    torch.manual_seed(0)
    net = build_model(model, classes, size)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    key = store.artifact_key("teachers", {"bench": model, "classes": classes, "size": size})
    if store.exists(key):
        return key
    store.put_bytes(key, epoch_file(1), buf.getvalue())
    traj = {"model": model, "num_classes": classes, "image_size": size,
            "class_names": [f"class_{c:03d}" for c in range(classes)],
            "epochs": [{"epoch": 1, "top1": 0.0, "file": epoch_file(1)}], "observer": epoch_file(1)}
    write_trajectory(store, key, traj)
    store.finalize(key, "teachers", {"bench": model}, {}, {})
    return key


def run_pipeline(cfg, store, teachers_key: str) -> tuple[dict, int, int]:
    """select.run on a fresh local Ray: (summary, peak PSS bytes, idle PSS bytes before the stage)."""
    import ray
    import ray.data

    from hello_ray.runtime import ensure_ray
    from hello_ray.stages import select

    ensure_ray(cfg.compute)
    ray.data.DataContext.get_current().enable_progress_bars = False  # keep the printed figures readable
    time.sleep(2.0)  # let Ray's start-up workers settle before the idle reading
    idle = PssSampler.total()
    key = store.artifact_key("select", {**select.stage_config(cfg), "t": time.time()}, {"teachers": teachers_key})
    with PssSampler() as mem:
        summary = select.run(cfg, store, key, {"teachers": teachers_key})
    ray.shutdown()
    summary["actor_cpu_s"] = round(sum(mem.actor_cpu.values()), 1)
    return summary, mem.peak, idle


def bare_forward(cfg, store, teachers_key: str, data_root: Path, threads: int) -> tuple[int, float]:
    """(crops, crops/s) of score_crops alone on the 1x dataset's crops, in this process."""
    from hello_ray.data.images import decode_resized
    from hello_ray.models.ensemble import load_observer
    from hello_ray.stages import select_core as core

    size, sel = cfg.data.image_size, cfg.select
    files = sorted((data_root / "train").glob("*/*.png"))
    names = sorted({f.parent.name for f in files})
    images = np.stack([decode_resized(f.read_bytes(), str(f), size) for f in files])
    labels = torch.tensor([names.index(f.parent.name) for f in files])
    _, crops = core.make_crops(images, [str(f) for f in files], sel.num_crop, size // sel.factor, sel.seed)
    crops = crops.reshape(-1, *crops.shape[2:])                                   # [N*K, c, c, 3]
    crop_labels = labels.repeat_interleave(sel.num_crop)
    device = torch.device("cuda") if cfg.compute.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    observer = load_observer(store, teachers_key, device)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        core.score_crops(observer, crops[:sel.batch_size], crop_labels[:sel.batch_size], size, sel.show,
                         sel.batch_size, device)                                  # warm-up
        t0 = time.perf_counter()
        core.score_crops(observer, crops, crop_labels, size, sel.show, sel.batch_size, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(saved)
    return len(crops), len(crops) / dt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1500, help="input images at 1x (4x runs 4 times as many)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--observer", default="resnet18", help="zoo model used as the observer")
    p.add_argument("--factor", type=int, default=1)
    p.add_argument("--num-crop", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=250, help="crops per scoring batch")
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--workdir", default=None, help="where to write the datasets/store (default: a temp dir)")
    args = p.parse_args(argv)

    from hello_ray.config import load_config
    from hello_ray.store import open_store

    work = Path(args.workdir or tempfile.mkdtemp(prefix="select_bench_"))
    store = open_store(str(work / "store"))
    teachers_key = write_teachers(store, args.observer, args.classes, args.image_size)
    per_class = max(1, args.images // args.classes)
    actor_threads = 1  # Ray gives an actor of 0.5 CPU OMP_NUM_THREADS = max(1, floor(0.5)) = 1

    def config(data_root: Path):
        return load_config("demo", overrides=[
            f"store={work / 'store'}", f"data.source={data_root}", "data.format=imagefolder",
            f"data.image_size={args.image_size}", f"compute.use_gpu={str(args.use_gpu).lower()}",
            "select.ipc=2", f"select.factor={args.factor}", f"select.mipc={4 * per_class}",
            f"select.num_crop={args.num_crop}", f"select.batch_size={args.batch_size}",
            f"select.num_actors={args.num_actors}", "select.actor_cpus=0.5",
        ])

    results = {}
    for scale in (1, 4):
        root = work / f"data_{scale}x"
        if not (root / "train").exists():
            write_dataset(root, args.classes, scale * per_class, args.image_size)
        summary, peak, idle = run_pipeline(config(root), store, teachers_key)
        results[scale] = (summary, peak, idle)
        print(f"[{scale}x] {summary['images_read']} images, {summary['crops_scored']} crops in "
              f"{summary['seconds']} s -> {summary['crops_per_s']} crops/s; peak PSS {peak / 2**20:.0f} MiB "
              f"(idle before {idle / 2**20:.0f} MiB); phases {summary['phase_s']}; scoring actors' CPU time "
              f"{summary['actor_cpu_s']} s", flush=True)

    # the same crops as the 4x pipeline run (same ids -> same seeded boxes)
    n_bare, bare = bare_forward(config(work / "data_4x"), store, teachers_key, work / "data_4x", actor_threads)
    print(f"[bare] {n_bare} crops, observer forward in one process ({actor_threads} torch thread(s)): "
          f"{bare:.1f} crops/s", flush=True)

    s1, s4 = results[1][0], results[4][0]
    pipe = s4["crops_per_s"]  # the larger run: start-up costs amortised as on real data
    peak1, peak4 = results[1][1], results[4][1]
    add1, add4 = peak1 - results[1][2], peak4 - results[4][2]
    print()
    print(f"device: {'cuda' if args.use_gpu and torch.cuda.is_available() else 'cpu'} "
          f"({psutil.cpu_count()} CPUs), observer {args.observer} at {args.image_size} px, factor {args.factor}, "
          f"{args.num_crop} crops/image, {args.num_actors} actor(s)")
    print(f"pipeline crops/s       1x: {s1['crops_per_s']:.1f}   4x: {s4['crops_per_s']:.1f}")
    print(f"bare forward crops/s   {bare:.1f}")
    print(f"ratio pipeline/bare    {pipe / bare:.2f} (4x run, same crops; 1x run {s1['crops_per_s'] / bare:.2f}, "
          f"fixed start-up less amortised; target >= 0.8)")
    print(f"peak PSS  1x: {peak1 / 2**20:.0f} MiB   4x: {peak4 / 2**20:.0f} MiB   "
          f"4x/1x = {peak4 / peak1:.3f} (target <= 1.15)")
    print(f"stage's own (peak - idle)  1x: {add1 / 2**20:.0f} MiB   4x: {add4 / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
