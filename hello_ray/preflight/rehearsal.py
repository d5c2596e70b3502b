"""Rehearsal: every active stage takes a few real steps at the run's real shapes, timed.

Real shapes: the dataset's full class count in every head (teacher, projector, students), the
preset's image size, select's factor and crops, the configured CLIP architecture with LoRA on every
conv. Real data: a small sample of the training split read and decoded through Ray Data (the run's
reader). Real store: a teacher checkpoint and the adapter are written under a scratch helper key
``_preflight-<id>``, read back, and the key is removed. Compute: each stage's own compute module
(``stages/<name>_core.py``) called in this process, not the stage's Ray Train / actor wrapper: a few
steps through Ray Train would spend most of their time starting workers and placement groups, which
the cost model could not extrapolate from. Every stage says so in its ``path``.

Pretrained CLIP weights are used when they are already on this machine (the weights check found
them); otherwise the seeded ``random-init`` stand-in of the same architecture (said in the notes).
The projector head has every class's row, but only ``TEXT_CLASSES`` rows are text-encoded (timed,
then extrapolated to all classes); the others are random unit rows: 1000 classes x 7 prompts through
RN50's text tower is ~15 min of CPU that shape checking does not need.

Per stage: steps, mean step time (the first step, which pays allocations, is a warm-up), peak memory
of this process during the stage (``evaluate_core.PeakMemory``: peak RSS on CPU, max allocated on
GPU), and FLOPs per item counted by ``torch.utils.flop_counter.FlopCounterMode`` on the real modules.

Start-up (``Rehearsal.startup``): what a stage pays before its first step, which no per-item time
covers and which dominates small runs: one Ray Train launch that does nothing, with the run's own
workers (``launcher.fit``: placement group, worker processes, process group, the run's storage),
and one Ray Data actor pool that does nothing, with each actor stage's own pool size and CPUs.
Measured once per preflight on the live cluster; the cost model adds it to every stage of that kind.
"""
from __future__ import annotations

import copy
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from hello_ray.config import Config
from hello_ray.preflight.measure import (  # noqa: F401 (the rehearsal's names, as before)
    Clock, Sample, StageRehearsal, count_flops, read_sample, timed_steps)
from hello_ray.registry import ACTOR_STAGES, TRAIN_STAGES

log = logging.getLogger(__name__)

TEXT_CLASSES = 4  # class rows of the projector head text-encoded in the rehearsal (timed per class)
SAMPLE_IMAGES = 16  # training images read for the rehearsal (batches cycle through them)
# A rehearsal step runs the stage's own per-worker batch unless that exceeds this many FLOPs (then
# fewer images): ~1-2 s of a 2-core CPU, a few ms of a GPU. Per-item times come from these steps.
CPU_STEP_FLOPS = 3e10
GPU_STEP_FLOPS = 1e14


def _one_step(s: Any, batch_size: int) -> Any:
    """evaluate TrainSettings for one epoch of ``batch_size``-image steps."""
    s = copy.copy(s)
    s.epochs, s.batch_size = 1, batch_size
    return s


def _batch(sample: Sample, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [b,S,S,3] and labels [b], cycling the sample when it is smaller than b."""
    idx = torch.arange(b) % len(sample.labels)
    return sample.images[idx], sample.labels[idx]


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
        self._cpu = 0.0

    def _measure(self, stage: str, body: Callable[[], StageRehearsal]) -> StageRehearsal:
        from hello_ray.stages.evaluate_core import PeakMemory

        log.info("preflight: rehearsing %s", stage)
        with PeakMemory(self.device) as mem:
            r = body()
        r.peak_mem_bytes, r.peak_mem_kind = mem.peak_bytes, mem.kind
        r.cpu_step_s = self._cpu  # set by the stage's method next to its step_s
        self.results.append(r)
        log.info("preflight: %s: %d steps of %d, %.3f s/step, %.3g FLOP/item, peak %.0f MiB", stage, r.steps,
                 r.batch, r.step_s, r.flops_per_item, r.peak_mem_bytes / 2 ** 20)
        return r

    def batch(self, per_worker: int, flops_per_item: float) -> int:
        """The stage's own per-worker batch, capped so one step stays within the FLOP budget."""
        return int(max(1, min(per_worker, self.flop_budget // max(flops_per_item, 1.0))))

    # ------------------------------------------------------------------ stages
    def teachers(self, sample: Sample) -> StageRehearsal:
        from hello_ray.models.zoo import build_model
        from hello_ray.stages.teachers_core import make_optimizer, state_bytes, train_augment, train_epoch

        tc = self.cfg.teachers
        model = build_model(tc.model, self.C, self.S).to(self.device)
        opt, _ = make_optimizer(model, tc)
        x1, y1 = _batch(sample, 1)
        train_flops = count_flops(lambda: train_epoch(model, [{"image": x1, "label": y1}], opt, self.device))
        B = self.batch(tc.batch_size // self.cfg.compute.num_workers, train_flops)
        x, y = _batch(sample, B)

        def step(_: int) -> None:
            train_epoch(model, [{"image": x, "label": y}], opt, self.device,
                        augment=lambda im: train_augment(im, self.S))

        step_s, cpu_s = timed_steps(step, self.steps, self.device)
        model.eval()
        with torch.inference_mode():
            fwd_flops = count_flops(lambda: model(x1.permute(0, 3, 1, 2).float().div(255).to(self.device)))
            with Clock() as c:
                for _ in range(self.steps):
                    model(x.permute(0, 3, 1, 2).float().div(255).to(self.device))
            fwd_item_s, fwd_cpu_item_s = c.wall / (self.steps * B), c.cpu / (self.steps * B)
        # The epoch file through the store, as the run writes and later reads it.
        blob = state_bytes(model)
        t0 = time.perf_counter()
        self.store.put_bytes(self.scratch, "epochs/epoch_001.pt", blob)
        back = self.store.get_bytes(self.scratch, "epochs/epoch_001.pt")
        store_s = time.perf_counter() - t0
        if back != blob:
            raise RuntimeError(f"preflight: the teacher checkpoint read back from {self.store.uri} differs")
        self.teacher, self._cpu = model, cpu_s
        return StageRehearsal("teachers", "stages/teachers_core.train_epoch in the driver; checkpoint put/get "
                              "through the store", "train image x epoch", B, self.steps, step_s,
                              train_flops, 0, "",
                              extra={"checkpoint_bytes": len(blob), "checkpoint_store_s": store_s,
                                     "forward_flops_per_item": fwd_flops, "forward_item_s": fwd_item_s,
                                     "forward_cpu_item_s": fwd_cpu_item_s,
                                     "params": sum(p.numel() for p in model.parameters())})

    def external(self, sample: Sample) -> StageRehearsal:
        """A few of the external set's own images read, decoded and PNG-encoded as its stage does."""
        from hello_ray.data.images import encode_png
        from hello_ray.data.sources import _fs_for, read_all
        from hello_ray.stages import external
        from hello_ray.stages.external_core import decode_external

        plan = external.check_sources(self.cfg, self.store)
        fs, _ = _fs_for(self.cfg.images.path, self.store)
        files = [(p, f"{plan.listing.root}/{r}") for ps, rs in zip(plan.listing.files, plan.listing.rel)
                 for p, r in zip(ps, rs)][:max(1, self.steps)]
        png = 0
        with Clock() as c:
            for path, where in files:
                img, _ = decode_external(read_all(fs, path), where, self.S, self.cfg.images.resize)
                png += len(encode_png(img))
        n = len(files)
        self._cpu = c.cpu / n
        return StageRehearsal("external", "stages/external_core.decode_external in the driver (read, decode, "
                              "PNG), as the stage's read threads do", "external image", 1, n, c.wall / n,
                              0.0, 0, "", extra={"images": plan.listing.num_images,
                                                 "png_bytes_per_image": png / n})

    def select(self, sample: Sample) -> StageRehearsal:
        from hello_ray.data.images import decode_image, encode_png
        from hello_ray.stages.select_core import cap_side, make_crops, score_crops, stitch

        sel = self.cfg.select
        observer = self.teacher.eval()
        crop = self.S // sel.factor
        probe = torch.zeros(1, crop, crop, 3, dtype=torch.uint8)
        flops = count_flops(lambda: score_crops(observer, probe, torch.zeros(1, dtype=torch.long), self.S,
                                                sel.show, device=self.device))
        n = max(1, self.batch(sel.batch_size, flops) // sel.num_crop)  # images whose crops fill a batch
        k = len(sample.raw)
        imgs = [cap_side(np.array(decode_image(sample.raw[i % k], sample.ids[i % k])), sel.max_side)
                for i in range(n)]  # a writable copy: make_crops turns it into a tensor
        ids = [f"{sample.ids[i % len(sample.ids)]}#{i}" for i in range(n)]
        _, crops = make_crops(imgs, ids, sel.num_crop, crop, sel.seed)             # [n, K, c, c, 3]
        crops = crops.flatten(0, 1)                                                # [n*K, c, c, 3]
        labels = torch.zeros(len(crops), dtype=torch.long)
        step_s, cpu_s = timed_steps(lambda _: score_crops(observer, crops, labels, self.S, sel.show,
                                                   batch_size=len(crops), device=self.device),
                             self.steps, self.device)
        patches = crops[:1].expand(sel.factor ** 2, -1, -1, -1).contiguous()      # one image's tiles
        self._cpu = cpu_s
        png = encode_png(stitch(patches, sel.factor, sel.tile_order)[0].numpy())
        return StageRehearsal("select", "stages/select_core.make_crops + score_crops in the driver",
                              "crop scored", len(crops), self.steps, step_s, flops, 0, "",
                              extra={"png_bytes_per_image": len(png), "crop_size": crop})

    def recover(self, sample: Sample) -> StageRehearsal:
        from hello_ray.stages.recover_core import RecoverSettings, recover_unit, running_moments

        rc = self.cfg.recover
        observer = self.teacher.eval()
        for p in observer.parameters():
            p.requires_grad_(False)
        targets = running_moments(observer)

        def run(iterations: int, n: int) -> Any:
            s = RecoverSettings(iterations, rc.lr, rc.r_bn, rc.first_bn_multiplier, rc.jitter)
            labels = torch.arange(n) % self.C
            return recover_unit(observer, labels, targets, s, rc.seed, self.S, self.device, "preflight")

        flops = count_flops(lambda: run(1, 1))
        b = self.batch(min(rc.batch_size, self.cfg.select.ipc) if self.cfg.images.source == "lpld"
                       else rc.batch_size, flops)
        with Clock() as c:
            run(self.steps + 1, b)
        step_s, cpu_s = c.wall / (self.steps + 1), c.cpu / (self.steps + 1)
        self._cpu = cpu_s
        return StageRehearsal("recover", "stages/recover_core.recover_unit in the driver (sre2l targets)",
                              "image x iteration", b, self.steps + 1, step_s, flops, 0, "",
                              notes=["step time includes the warm-up iteration"])

    def _projector(self) -> tuple[Any, list[str], float]:
        """The projector at the real shapes; (projector, notes, text-init seconds per class)."""
        from hello_ray.models.clip import (RANDOM_INIT, clip_input_size, clip_normalisation,
                                           create_clip)
        from hello_ray.models.projector import DEFAULT_TEMPLATES, Projector, text_head_weight

        tc = self.cfg.transfer
        notes = []
        tag = RANDOM_INIT if self.clip_weights == RANDOM_INIT else tc.pretrained
        if tag == RANDOM_INIT and tc.pretrained != RANDOM_INIT:
            notes.append(f"CLIP {tc.clip_model}: random-init weights (pretrained {tc.pretrained!r} not on this machine)")
        model, tokenizer = create_clip(tc.clip_model, tag)
        model = model.to(self.device)
        k = min(TEXT_CLASSES, self.C)
        with Clock() as c:
            rows = text_head_weight(model, tokenizer, self.names[:k], list(DEFAULT_TEMPLATES))   # [k, D]
        text_s = (c.cpu if self.device.type == "cpu" else c.wall) / k
        if k < self.C:
            notes.append(f"head: {k} of {self.C} rows text-encoded ({text_s:.2f} s/class, extrapolated), "
                         "the rest random unit rows")
            g = torch.Generator().manual_seed(0)
            rest = F.normalize(torch.randn(self.C - k, rows.shape[1], generator=g), dim=-1).to(rows)
            rows = torch.cat([rows, rest])                                              # [C, D]
        mean, std = clip_normalisation(model)
        proj = Projector(model.visual, rows, model.logit_scale, clip_input_size(model), mean, std,
                         tc.clip_model, tag, self.names, DEFAULT_TEMPLATES)
        proj.add_lora(tc.conv_rank, tc.head_rank, style=tc.lora_style, alpha_ratio=tc.lora_alpha_ratio)
        return proj, notes, text_s

    def transfer(self, sample: Sample) -> StageRehearsal:
        from hello_ray.data.augment import to_float
        from hello_ray.models.ensemble import TeacherEnsemble
        from hello_ray.stages.transfer_core import lora_parameters, transfer_step

        tc = self.cfg.transfer
        proj, notes, text_s = self._projector()
        lora = proj.lora_state_dict()
        lora_params = sum(t.numel() for t in lora.values())
        ensemble = TeacherEnsemble([copy.deepcopy(self.teacher) for _ in range(tc.n_teachers)]).to(self.device)
        opt = torch.optim.AdamW(lora_parameters(proj), lr=tc.lr, weight_decay=tc.weight_decay)
        x1, y1 = _batch(sample, 1)
        x1, y1 = to_float(x1).to(self.device), y1.to(self.device)
        flops = count_flops(lambda: transfer_step(proj, ensemble, x1, y1, opt, tc.ce_weight, epoch=1, step=0))
        B = self.batch(tc.batch_size // self.cfg.compute.num_workers, flops)
        x, y = _batch(sample, B)
        xf, y = to_float(x).to(self.device), y.to(self.device)
        step_s, cpu_s = timed_steps(lambda i: transfer_step(proj, ensemble, xf, y, opt, tc.ce_weight, epoch=1, step=i + 1),
                             self.steps, self.device)
        with tempfile.TemporaryDirectory() as tmp:
            meta = proj.save_adapter(tmp, dtype=tc.adapter_dtype)
            adapter_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
            t0 = time.perf_counter()
            self.store.put_dir(self.scratch, tmp, prefix="adapter/")
            store_s = time.perf_counter() - t0
        self.projector, self._cpu = proj, cpu_s
        return StageRehearsal("transfer", "stages/transfer_core.transfer_step in the driver; adapter put "
                              "through the store", "train image x epoch", B, self.steps, step_s, flops, 0, "",
                              notes=notes, extra={"lora_params": lora_params, "lora_tensors": len(lora),
                                                  "adapter_bytes": adapter_bytes, "adapter_store_s": store_s,
                                                  "text_init_s_per_class": text_s, "weights_bytes": meta.get("weights_bytes")})

    def refine(self, sample: Sample) -> StageRehearsal:
        from hello_ray.data.augment import to_float
        from hello_ray.stages.refine_core import refine_images, refine_objective

        rf = self.cfg.refine
        proj = copy.deepcopy(self.projector).merge_lora(unload=True).eval()
        probe = to_float(_batch(sample, 1)[0]).to(self.device)

        def one() -> None:
            x1 = probe.clone().requires_grad_(True)
            refine_objective(proj.encode, x1, rf.factor, rf.target).mean().backward()

        flops = count_flops(one)
        b = self.batch(rf.batch_size, flops)
        x = to_float(_batch(sample, b)[0]).to(self.device)
        with Clock() as c:
            _, history = refine_images(proj.encode, x, self.steps + 1, rf.lr, rf.factor, rf.target)
        step_s, cpu_s = c.wall / (self.steps + 1), c.cpu / (self.steps + 1)
        self._cpu = cpu_s
        return StageRehearsal("refine", "stages/refine_core.refine_images on the merged projector in the driver",
                              "image x step", b, self.steps + 1, step_s, flops, 0, "",
                              notes=["step time includes the warm-up step"],
                              extra={"objective_first": history[0]})

    def evaluate(self, sample: Sample) -> StageRehearsal:
        from hello_ray.labels import HardLabels, ProjectorLabels, TeacherLabels
        from hello_ray.models.zoo import build_model
        from hello_ray.stages.evaluate import settings_for
        from hello_ray.stages.evaluate_core import train_student

        ev = self.cfg.evaluate
        x, y = _batch(sample, 1)
        probe = build_model(ev.students[0], self.C, self.S).to(self.device)
        flops1 = count_flops(lambda: train_student(probe, x.permute(0, 3, 1, 2).contiguous(), y,
                                                   HardLabels(y.numpy(), self.C, 0),
                                                   _one_step(settings_for(self.cfg, ev.students[0]), 1),
                                                   0, self.device))
        from hello_ray.stages.evaluate_queue import plan_parallel

        ddp = plan_parallel(self.cfg)[0] == "ddp"                  # evaluate.parallel=auto resolved
        per_worker = ev.batch_size // self.cfg.compute.num_workers if ddp else ev.batch_size
        B = self.batch(per_worker, 2 * flops1)  # room for a labeller beside the student
        x, y = _batch(sample, B * (self.steps + 1))
        images = x.permute(0, 3, 1, 2).contiguous()                                  # uint8 [M,3,S,S]
        labellers: dict[str, Any] = {"hard": HardLabels(y.numpy(), self.C, 0)}
        if self.teacher is not None:
            labellers["teacher"] = TeacherLabels(self.teacher, self.C, self.S)
        if self.projector is not None:
            merged = copy.deepcopy(self.projector).merge_lora(unload=True).eval()
            labellers["projector"] = ProjectorLabels(merged, self.C, self.S, 0)
        per_student: dict[str, dict[str, float]] = {}
        cpu_steps: dict[str, dict[str, float]] = {}
        flops: dict[str, dict[str, float]] = {}
        for student in ev.students:
            s = _one_step(settings_for(self.cfg, student), B)
            per_student[student], flops[student] = {}, {}
            for name, strategy in labellers.items():
                model = build_model(student, self.C, self.S).to(self.device)
                with Clock() as c:
                    out = train_student(model, images, y, strategy, s, 0, self.device)
                per_student[student][name] = out["step_s"]
                cpu_steps.setdefault(student, {})[name] = c.cpu / out["steps"]
                flops[student][name] = count_flops(
                    lambda: train_student(model, images[:1], y[:1], strategy, _one_step(s, 1), 0, self.device))
        first = ev.students[0]
        self._cpu = cpu_steps[first]["hard"]
        return StageRehearsal("evaluate", "stages/evaluate_core.train_student in the driver (hard, teacher, "
                              "projector labels)", "student view (image x epoch x row)", B, self.steps + 1,
                              per_student[first]["hard"], flops[first]["hard"], 0, "",
                              notes=["step time of hard labels; per labeller in extra"],
                              extra={"step_s": per_student, "cpu_step_s": cpu_steps, "flops_per_item": flops})

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
        nodes, modules = node_types_from_ray(), {m.STAGE: m for m in registry.STAGES}
        held = [s for s in stages if not fit_stage(s, stage_bundles(modules[s], self.cfg), nodes, "here")]
        for s in sorted(set(stages) - set(held)):
            log.info("preflight: %s start-up not measured: this machine's Ray cannot hold its ask", s)
        stages = held
        out: dict[str, float] = {}
        train = [s for s in stages if s in TRAIN_STAGES]
        if train:
            name = f"{self.scratch}-train"
            t0 = time.perf_counter()
            try:
                launcher.fit("preflight", self.cfg.compute, self.store, name, _noop_loop, {}, {})
            finally:
                self.store.remove_folder(f"{RAY_DIR}/{name}")
            out.update({s: time.perf_counter() - t0 for s in train})
        pools: dict[tuple[int, float], float] = {}  # stages with the same pool share one measurement
        for stage in (s for s in stages if s in ACTOR_STAGES):
            sec = getattr(self.cfg, stage)
            shape = (sec.num_actors, sec.actor_cpus)
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
            for name in stages:
                self._measure(name, lambda: getattr(self, name)(sample))
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
