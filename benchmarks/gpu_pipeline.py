"""The whole Ray pipeline on one machine's accelerator: per stage, its wall time, its throughput
and how busy the GPU was while it ran.

    python benchmarks/gpu_pipeline.py --out gpu_pipeline.json        # one GPU: 224 px, 100 classes
    python benchmarks/gpu_pipeline.py --tiny --out x.json            # CPU, tiny shapes (a test runs it)

It writes ImageNet-shaped synthetic data (``hello-ray synth-data``: JPEGs of ImageNet's sizes and
modes, 100 classes) into a local folder, keeps the store in another, and walks the recipe one
stage at a time on a local Ray: teachers, select (RDED), transfer, refine, evaluate, the report,
then recover (LPLD's synthesis, ``recover.classes_per_step`` classes per step) on the same
teachers. The GPU's utilisation is sampled every ``--sample-s`` seconds from NVML (through
``torch.cuda.utilization``, else ``nvidia-smi``) and averaged over each stage's wall time; the
JSON and the printed table carry the date, the commit, the CPU and the card's name.

Every weight is ``random-init`` (seeded, made locally, nothing downloaded): the cost is that of
real weights, the accuracies mean nothing. Sized (GPU) to finish within about 4 minutes of an
H100's time after Ray has started.

On a GPU machine with torch, torchvision and pyarrow but no Ray and no package index, bring the
wheels along (``pip download ray==<version> open_clip_torch ftfy regex wcwidth --no-deps
--python-version 3.12 --only-binary=:all: -d wheels`` here; Ray's wheel is about 70 MB, so on a
transfer limited to 64 MiB split it: ``split -b 40M ray-*.whl ray.part.`` and join the parts there
with ``cat ray.part.* > ray-<...>.whl``), then ``pip install --no-index --find-links wheels ray
open_clip_torch`` and ``pip install --no-deps -e .`` in the checkout before running this script.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_name  # noqa: E402

CLASSES = 100

# The stages in the order walked; what one unit of each stage's throughput is.
UNITS = {"teachers": "train images x epochs", "select": "candidate images read", "transfer":
         "train images x epochs", "refine": "image updates", "evaluate": "student images x epochs",
         "report": "reports", "recover": "image iterations"}


def overrides(root: str, store: str, tiny: bool) -> tuple[str, list[str]]:
    """The preset and its overrides: the GPU shape, or the same recipe at tiny shapes on CPU."""
    common = [f"data.source={root}", f"store={store}", "data.format=imagefolder", "evaluate.seeds=[0]",
              "evaluate.floor=false", "evaluate.strategies=[hard, stored, projector]",
              "refine.enabled=true", "transfer.pretrained=random-init", "recover.num_actors=1"]
    if tiny:
        return "smoke", common + ["data.image_size=16", "data.max_per_class=0", "select.mipc=6", "refine.steps=2", "evaluate.epochs=1",
                                  "recover.iterations=3", "recover.classes_per_step=2"]
    return "imagenet100", common + [
        "compute.num_workers=1", "compute.cpus_per_worker=4", "data.cpus_per_task=1",
        "teachers.epochs=3", "teachers.batch_size=128", "teachers.lr_step=2",
        "select.ipc=10", "select.mipc=20", "select.num_actors=1", "select.actor_cpus=2",
        "transfer.teacher_window=1-3", "transfer.n_teachers=3", "transfer.epochs=1", "transfer.batch_size=128",
        "refine.steps=20", "evaluate.epochs=20", "evaluate.students=[resnet18]", "evaluate.batch_size=100",
        "recover.iterations=100", "recover.classes_per_step=10", "recover.batch_size=10"]


class GpuSampler:
    """GPU utilisation (%) every ``every`` seconds in a thread: [(unix time, percent)]; empty
    without a GPU (then ``mean`` is None)."""

    def __init__(self, every: float) -> None:
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._read = self._reader()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _reader() -> Callable[[], float] | None:
        import torch

        if not torch.cuda.is_available():
            return None
        try:
            torch.cuda.utilization()
            return lambda: float(torch.cuda.utilization())
        except Exception:  # noqa: BLE001 - no pynvml: ask nvidia-smi
            cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]
            return lambda: float(subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip())

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.samples.append((time.time(), self._read()))
            except Exception:  # noqa: BLE001 - a missed sample is not a failed benchmark
                pass

    def __enter__(self) -> "GpuSampler":
        if self._read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def mean(self, t0: float, t1: float) -> float | None:
        """Mean busy fraction (0..1) of the samples taken in [t0, t1]."""
        xs = [u for t, u in self.samples if t0 <= t <= t1]
        return round(sum(xs) / len(xs) / 100, 3) if xs else None


def units(stage: str, c: Any, n_train: int, classes: int) -> float:
    """How much work a stage did, in ``UNITS[stage]``."""
    images = classes * c.select.ipc
    return {"teachers": n_train * c.teachers.epochs, "select": n_train, "transfer": n_train * c.transfer.epochs,
            "refine": images * c.refine.steps, "report": 1,
            "evaluate": images * c.evaluate.epochs * len(c.evaluate.strategies) * len(c.evaluate.students)
            * len(c.evaluate.seeds), "recover": images * c.recover.iterations}[stage]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (the test's run)")
    ap.add_argument("--out", default="gpu_pipeline.json")
    ap.add_argument("--workdir", default=None, help="data and store go here (default: a temporary folder)")
    ap.add_argument("--train-per-class", type=int, default=None)
    ap.add_argument("--sample-s", type=float, default=0.5)
    a = ap.parse_args(argv)

    import torch

    from hello_ray import pipeline
    from hello_ray.config import load_config
    from hello_ray.data.synthetic import write_synthetic

    work = Path(a.workdir or tempfile.mkdtemp(prefix="gpu_pipeline-"))
    per_class = a.train_per_class or (6 if a.tiny else 10)
    root, store = work / "data", work / "store"
    classes = 4 if a.tiny else CLASSES
    sides = (20, 40) if a.tiny else (200, 500)
    write_synthetic(str(root), classes, per_class, 2, "imagefolder", 0, *sides)
    preset, extra = overrides(str(root), str(store), a.tiny)
    cfg = load_config(preset, overrides=extra + (["compute.use_gpu=false"] if a.tiny else []))
    recover_cfg = load_config(preset, overrides=extra + ["images.source=lpld"]
                              + (["compute.use_gpu=false"] if a.tiny else []))
    n_train = classes * per_class

    steps: list[tuple[str, Callable[[pipeline.Run], Any]]] = [
        ("teachers", pipeline.run_teachers), ("select", pipeline.run_source_images),
        ("transfer", pipeline.run_transfer), ("refine", pipeline.run_images), ("evaluate", pipeline.run_evaluate)]
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with GpuSampler(a.sample_s) as gpu:
        def timed(stage: str, c: Any, fn: Callable[[], Any]) -> None:
            t0 = time.time()
            fn()
            t1 = time.time()
            wall = t1 - t0
            rows.append({"stage": stage, "wall_s": round(wall, 2), "units": UNITS[stage],
                         "per_s": round(units(stage, c, n_train, classes) / wall, 2), "gpu_busy": gpu.mean(t0, t1)})
            print(f"[gpu_pipeline] {stage:9s} {wall:7.1f} s", flush=True)

        run = pipeline.Run.start(cfg)
        for stage, step in steps:
            timed(stage, cfg, lambda step=step: step(run))
        timed("report", cfg, lambda: pipeline.make_report(cfg, run.store, run.keys))
        rec = pipeline.Run.start(recover_cfg)
        pipeline.run_teachers(rec)  # cached: the same teachers
        timed("recover", recover_cfg, lambda: pipeline.run_source_images(rec))
    total = time.perf_counter() - t_start
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result = {"date": datetime.date.today().isoformat(), "commit": commit(), "cpu": cpu_name(),
              "gpu": device, "tiny": a.tiny, "classes": classes, "train_images": n_train,
              "image_size": cfg.data.image_size, "total_s": round(total, 1), "stages": rows}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(format_table(result))
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def format_table(result: dict[str, Any]) -> str:
    """The per-stage table, headed by what it ran on."""
    head = (f"gpu_pipeline {result['date']} {result['commit']}: {result['gpu'] or 'no GPU'}, {result['cpu']}; "
            f"{result['classes']} classes, {result['train_images']} train images at {result['image_size']} px")
    lines = [head, f"{'stage':10s} {'wall s':>8s} {'per s':>10s}  {'GPU busy':>8s}  unit"]
    for r in result["stages"]:
        busy = "-" if r["gpu_busy"] is None else f"{100 * r['gpu_busy']:.0f} %"
        lines.append(f"{r['stage']:10s} {r['wall_s']:8.1f} {r['per_s']:10.1f}  {busy:>8s}  {r['units']}")
    lines.append(f"{'total':10s} {result['total_s']:8.1f}  (Ray's start included)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
