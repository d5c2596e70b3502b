"""What a rehearsal measures and with what: one stage's figures (:class:`StageRehearsal`), FLOPs
counted on the real modules, wall and process-CPU clocks, timed steps, and the few training images
read through the run's own reader and decoder (:func:`read_sample`)."""
from __future__ import annotations

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
