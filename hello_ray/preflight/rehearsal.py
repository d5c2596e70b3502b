"""Rehearsal: every active stage takes a few real steps at the run's real shapes, timed.

Real shapes: the dataset's full class count in every head (teacher, projector, students), the
preset's image size, select's factor and crops, the configured CLIP architecture with LoRA on every
conv. Real data: a small sample of the training split read and decoded through Ray Data (the run's
reader). Real store: a teacher checkpoint and the adapter are written under a scratch helper key
``_preflight-<id>``, read back, and the key is removed. Compute: each stage's own compute module
(``stages/<name>_core.py``) called in this process by the stage's plan (``stages/<name>_plan.py``
``rehearse(rehearsal, sample)``), not the stage's Ray Train / actor wrapper: a few
steps through Ray Train would spend most of their time starting workers and placement groups, which
the cost model could not extrapolate from. Every stage says so in its ``path``.

Pretrained CLIP weights are used when they are already on this machine (the weights check found
them); otherwise the seeded ``random-init`` stand-in of the same architecture (said in the notes).
The stages share what a run passes between them: a plan sets ``teacher`` or ``projector`` here for
the plans after it, and ``cpu_step_s`` beside its step time.

Per stage: steps, mean step time (the first step, which pays allocations, is a warm-up), peak memory
of this process during the stage (``measure.PeakMemory``: peak RSS on CPU, max allocated on
GPU), and FLOPs per item counted by ``torch.utils.flop_counter.FlopCounterMode`` on the real modules.

Start-up (``Rehearsal.startup``): what a stage pays before its first step, which no per-item time
covers and which dominates small runs: one Ray Train launch that does nothing, with the run's own
workers (``launcher.fit``: placement group, worker processes, process group, the run's storage),
and one Ray Data actor pool that does nothing, with each actor stage's own pool size and CPUs.
Measured once per preflight on the live cluster; the cost model adds it to every stage of that kind.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable

import torch

from hello_ray.config import Config
from hello_ray.measure import PeakMemory, StageRehearsal, read_sample

log = logging.getLogger(__name__)

SAMPLE_IMAGES = 16  # training images read for the rehearsal (batches cycle through them)
# A rehearsal step runs the stage's own per-worker batch unless that exceeds this many FLOPs (then
# fewer images): ~1-2 s of a 2-core CPU, a few ms of a GPU. Per-item times come from these steps.
CPU_STEP_FLOPS = 3e10
GPU_STEP_FLOPS = 1e14


class Rehearsal:
    """Runs the stages' compute in order, sharing the models a run would pass between them."""

    def __init__(self, cfg: Config, store: Any, num_classes: int, class_names: list[str],
                 clip_weights: str, steps: int = 2, flop_budget: float | None = None):
        from hello_ray.runtime import torch_device

        self.cfg, self.store, self.C = cfg, store, num_classes
        self.names = list(class_names) or [f"class {c}" for c in range(num_classes)]
        self.clip_weights = clip_weights
        self.steps = steps
        self.device = torch_device(cfg.compute.use_gpu)
        self.flop_budget = flop_budget or (GPU_STEP_FLOPS if self.device.type == "cuda" else CPU_STEP_FLOPS)
        self.S = cfg.data.image_size
        self.scratch = f"_preflight-{uuid.uuid4().hex[:10]}"
        self.teacher: torch.nn.Module | None = None
        self.projector: torch.nn.Module | None = None
        self.results: list[StageRehearsal] = []
        self.startup_s: dict[str, float] = {}
        self.cpu_step_s = 0.0  # set by each stage's plan beside its step time

    def _measure(self, stage: str, body: Callable[[], StageRehearsal]) -> StageRehearsal:
        log.info("preflight: rehearsing %s", stage)
        with PeakMemory(self.device) as mem:
            r = body()
        r.peak_mem_bytes, r.peak_mem_kind = mem.peak_bytes, mem.kind
        r.cpu_step_s = self.cpu_step_s
        self.results.append(r)
        log.info("preflight: %s: %d steps of %d, %.3f s/step, %.3g FLOP/item, peak %.0f MiB", stage, r.steps,
                 r.batch, r.step_s, r.flops_per_item, r.peak_mem_bytes / 2 ** 20)
        return r

    def batch(self, per_worker: int, flops_per_item: float) -> int:
        """The stage's own per-worker batch, capped so one step stays within the FLOP budget."""
        return int(max(1, min(per_worker, self.flop_budget // max(flops_per_item, 1.0))))

    # ------------------------------------------------------------------ start-up
    def startup(self, stages: list[str]) -> dict[str, float]:
        """Seconds each stage spends starting its Ray machinery (see the module docstring): a no-op
        Ray Train run with ``compute``'s workers for the Train stages, a no-op actor pool of the
        stage's size for the actor stages. {} without a running Ray (the compute-only rehearsal)."""
        import ray

        if not ray.is_initialized():
            return {}
        from hello_ray import launcher, registry
        from hello_ray.preflight.resources import fit_stage, node_types_from_ray, stage_bundles
        from hello_ray.store import RAY_DIR

        # Only asks the live cluster can hold now: a GPU run rehearsed on a CPU machine (its node
        # types checked with --cluster) would wait forever for its workers.
        nodes, modules = node_types_from_ray(), {s: registry.by_name(s) for s in stages}
        held = [s for s in stages if not fit_stage(s, stage_bundles(modules[s], self.cfg), nodes, "here")]
        for s in sorted(set(stages) - set(held)):
            log.info("preflight: %s start-up not measured: this machine's Ray cannot hold its ask", s)
        stages = held
        out: dict[str, float] = {}
        train = [s for s in stages if modules[s].KIND == "train"]
        if train:
            name = f"{self.scratch}-train"
            t0 = time.perf_counter()
            try:
                launcher.fit("preflight", self.cfg.compute, self.store, name, _noop_loop, {}, {})
            finally:
                self.store.remove_folder(f"{RAY_DIR}/{name}")
            out.update({s: time.perf_counter() - t0 for s in train})
        pools: dict[tuple[int, float], float] = {}  # stages with the same pool share one measurement
        for stage in (s for s in stages if modules[s].KIND == "actors"):
            shape = modules[stage].pool(self.cfg)
            if shape not in pools:
                t0 = time.perf_counter()
                _noop_pool(*shape)
                pools[shape] = time.perf_counter() - t0
            out[stage] = pools[shape]
        for name, secs in out.items():
            log.info("preflight: %s start-up %.1f s", name, secs)
        return out

    # ------------------------------------------------------------------ all
    def run(self, stages: list[str], startup: bool = True) -> list[StageRehearsal]:
        sample = read_sample(self.cfg, self.store, SAMPLE_IMAGES)
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            # One thread, as Ray gives a worker of under 2 CPUs: CPU seconds per item then do not
            # count OpenMP threads spinning for a core that other processes hold.
            torch.set_num_threads(1)
        try:
            from hello_ray import registry

            for name in stages:
                plan = registry.plan(registry.by_name(name))
                self._measure(name, lambda: plan.rehearse(self, sample))
            if startup:
                torch.set_num_threads(threads)  # the workers and actors run their own processes
                self.startup_s = self.startup(stages)
            if startup:
                for r in self.results:
                    r.extra["startup_s"] = self.startup_s.get(r.stage, 0.0)
        finally:
            torch.set_num_threads(threads)
            try:
                self.store.remove_folder(self.scratch)
            except Exception as e:  # noqa: BLE001 - say where the scratch was left, keep the results
                log.warning("preflight: could not remove the scratch %s: %s", self.store.uri_for(self.scratch), e)
        return self.results


def _noop_loop(config: dict[str, Any]) -> None:
    """The Train loop of the start-up measurement: every worker starts and returns."""


class _NoopActor:
    """The actor of the start-up measurement: a process that has imported this module (torch)."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return batch


def _noop_pool(size: int, cpus: float) -> None:
    """One Ray Data pass through a fresh pool of ``size`` actors of ``cpus`` CPUs, as a stage starts."""
    import ray.data

    ray.data.range(size).map_batches(_NoopActor, batch_size=1, num_cpus=cpus,
                                     compute=ray.data.ActorPoolStrategy(size=size)).materialize()
