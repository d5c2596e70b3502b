"""What a rehearsal measures and with what: one stage's figures (:class:`StageRehearsal`), FLOPs
counted on the real modules, wall and process-CPU clocks, timed steps, the few training images
read through the run's own reader and decoder (:func:`read_sample`), and what every stage's cost
formula reads beside its own figures (:class:`CostBasis`).

Below the stages (each stage's ``<stage>_plan.py`` rehearses it and prices it with these), above
the data and models; the preflight (``hello_ray/preflight/``) runs the plans, never a stage by name."""
from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from hello_ray.config import Config


@dataclass
class StageRehearsal:
    stage: str
    path: str                   # what code ran
    item: str                   # what one unit of work is (the cost model counts these)
    batch: int
    steps: int
    step_s: float               # mean seconds per step (after the warm-up step)
    flops_per_item: float       # FlopCounterMode on the real modules
    peak_mem_bytes: int
    peak_mem_kind: str
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    cpu_step_s: float = 0.0     # process CPU seconds per step (all threads): what a shared machine
                                # cannot inflate; on CPU the cost model divides it by the cores the run uses

    @property
    def item_s(self) -> float:
        return self.step_s / max(self.batch, 1)

    @property
    def cpu_item_s(self) -> float:
        return self.cpu_step_s / max(self.batch, 1)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "item_s": self.item_s, "cpu_item_s": self.cpu_item_s}


class PeakMemory:
    """Peak memory of a block: ``torch.cuda.max_memory_allocated`` on GPU, else the process's peak RSS.

    On Linux the RSS high-water mark is reset per block (``/proc/self/clear_refs`` 5) so each row
    gets its own peak; where that is not allowed it is the process peak so far (``kind`` says so).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_peak"
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.kind = "cpu_rss_process_peak"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        try:
            with open("/proc/self/status") as f:
                hwm = next(line for line in f if line.startswith("VmHWM:"))
            self.peak_bytes = int(hwm.split()[1]) * 1024
        except (OSError, StopIteration):
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (matmuls and convolutions, forward and backward as run)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class Clock:
    """Wall and process-CPU seconds of a block (``with Clock() as c: ...; c.wall, c.cpu``)."""

    def __enter__(self) -> "Clock":
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0


def timed_steps(step: Callable[[int], Any], steps: int, device: torch.device) -> tuple[float, float]:
    """Run one warm-up step and ``steps`` timed ones; mean (wall, process CPU) seconds of the timed ones."""
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with Clock() as c:
            step(i)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        times.append((c.wall, c.cpu))
    wall, cpu = np.mean(times[1:], axis=0)
    return float(wall), float(cpu)


@dataclass
class Sample:
    """A few training images: decoded at the run's size, and the raw encoded bytes (for select)."""
    images: torch.Tensor        # uint8 [N, S, S, 3]
    labels: torch.Tensor        # int64 [N]
    raw: list[bytes]
    ids: list[str]

    def cycle(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [b,S,S,3] and labels [b], cycling the sample when it is smaller than b."""
        idx = torch.arange(b) % len(self.labels)
        return self.images[idx], self.labels[idx]


@dataclass
class CostBasis:
    """What a stage's cost formula (``<stage>_plan.work``) reads beside its own rehearsal: the run's
    sizes, and how a per-item time becomes seconds here (on a CPU the rehearsal's process CPU time
    divided by the ``parallel`` cores the stage's workers use, since a shared machine slows the wall
    clock of a few steps, not the CPU time they take; on a GPU the wall clock)."""
    cfg: Config
    classes: int
    train_images: int
    val_images: int
    png_bytes: float            # one distilled image as PNG (measured where a stage writes images)
    cpu_clock: bool
    parallel: int = 1           # cores the stage keeps busy here (preflight.cost.parallel_here)

    @property
    def images(self) -> int:
        """Distilled images: classes x ipc."""
        return self.classes * self.cfg.select.ipc

    def item_s(self, x: StageRehearsal) -> float:
        return x.cpu_item_s / self.parallel if self.cpu_clock else x.item_s

    def image_steps(self, x: StageRehearsal, steps: int, what: str, units: int) -> dict[str, Any]:
        """The work of a stage that optimises every distilled image ``steps`` times, then writes
        it as a PNG (recover, refine), on ``units`` actors."""
        n = self.images * steps
        return {"work": f"{self.images:,} images x {steps} {what}", "items": n, "flops": n * x.flops_per_item,
                "seconds_here": n * self.item_s(x), "bytes": self.images * self.png_bytes,
                "bytes_what": f"{self.images:,} PNGs", "units": units}

    def per_item(self, cpu_s: float, wall_s: float) -> float:
        """A figure the stage measured itself (CPU and wall seconds per item), as :meth:`item_s`."""
        return cpu_s / self.parallel if self.cpu_clock else wall_s


def gpu_hours_row(gpus: int, before_s: float | None, after_s: float | None, why: str) -> dict[str, Any]:
    """A stage's row of the per-stage GPU-hours (``preflight.schedule.stage_gpu_hours``): a node of
    ``gpus`` GPUs held for the stage's wall seconds, before and after (None: not measured)."""
    return {"before_gpu_h": None if before_s is None else gpus * before_s / 3600,
            "after_gpu_h": None if after_s is None else gpus * after_s / 3600, "why": why}


def read_sample(cfg: Config, store: Any, n: int) -> Sample:
    """``n`` training images through the run's Ray Data reader and decoder."""
    from hello_ray.data.decode import DecodeBatch
    from hello_ray.data.errors import data_errors
    from hello_ray.data.sources import load_split

    split = load_split(cfg.data, cfg.data.train_split, store)
    with data_errors():
        raw = split.ds.take_batch(n, batch_format="numpy")
    decoded = DecodeBatch(cfg.data.image_size, "skip")(raw)  # the run's decode UDF, here on the batch
    if len(decoded["label"]) == 0:
        raise ValueError(f"preflight: none of the {n} sampled training images decodes")
    return Sample(torch.from_numpy(np.ascontiguousarray(decoded["image"])),
                  torch.as_tensor(decoded["label"], dtype=torch.long),
                  [bytes(b) for b in raw["image"]], [str(i) for i in raw["id"]])
