"""The recipe: teachers -> select or recover | transfer -> refine -> evaluate -> report, read top to bottom.

Every stage reads artifacts by key and writes one artifact whose key is derived from its
config and its inputs' keys. ``run_stage`` skips a stage whose artifact is already finished,
so a re-run with the same config is a no-op, a crashed run resumes at the stage that died
(and, inside Ray Train stages, at its last checkpoint), and a second IPC reuses the teachers.
One writer per artifact: a stage runs under its key's lease (:mod:`hello_ray.lease`), so a second
driver on the same key waits and reuses the artifact (or, ``--no-wait``, refuses).

Every stage module has one shape (``hello_ray/stages/<name>.py``, the Ray wrapper; its compute in
``<name>_core.py`` beside it): ``STAGE``, ``INPUTS`` (its input roles), ``stage_config(cfg)``
(what keys its artifact), ``check(cfg)`` (pure rules, run for every stage before any starts),
``resources(cfg)`` (what it holds at once) and ``run(cfg, store, key, inputs)``. A stage that
reads the real data also names the splits it reads (``DATA_SPLITS``: "train", "val"): their
fingerprints (hello_ray/data/fingerprint.py) join its key, so an edited dataset is never
mistaken for the one an artifact was made from.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hello_ray import lease
from hello_ray.config import Config, ConfigError, describe, load_config
from hello_ray.registry import STAGES, active_stages, check, check_resources, open_run_store  # noqa: F401 (re-exported)
from hello_ray.runner import NotFinished, Run, run_stage  # noqa: F401 (re-exported)
from hello_ray.runtime import setup_logging, sigterm_exit
from hello_ray.stages import evaluate, external, recover, refine, select, teachers, transfer

if TYPE_CHECKING:
    from hello_ray.store import Store

log = logging.getLogger("hello_ray.pipeline")



# ---------------------------------------------------------------------------- command line

def build_parser(prog: str = "distill", description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description or __doc__.splitlines()[0])
    p.add_argument("--preset", default="demo", help="preset bundled in hello_ray/presets (smoke, demo, "
                   "imagenet100, imagenet1k) or a YAML path; default: demo")
    p.add_argument("--config", default=None, help="a YAML file applied over the preset")
    p.add_argument("--store", default=None, help="artifact store URI (local path, file://, s3://bucket/prefix)")
    p.add_argument("--no-wait", action="store_true", help="refuse (exit 3) instead of waiting when another "
                   "driver is writing an artifact this run needs (compute.lease_wait=false)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its help")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. select.ipc=50 compute.use_gpu=false")
    return p


def parse_args(argv: list[str] | None = None, prog: str = "distill",
               description: str = "") -> Config:
    """argv -> a Config that passed every stage's check (exits with status 2 naming the key at
    fault on a bad value, before Ray starts or the store is touched)."""
    parser = build_parser(prog, description)
    args = parser.parse_args(argv)
    if args.help_config:
        for key, default, text in describe():
            print(f"{key:38s} {default:24s} {text}")
        raise SystemExit(0)
    overrides = list(args.overrides)
    if args.no_wait:
        overrides.append("compute.lease_wait=false")
    if args.store:
        overrides.append(f"store={args.store}")
    try:
        cfg = load_config(args.preset, args.config, overrides)
        check(cfg)
        return cfg
    except ConfigError as e:
        parser.exit(2, f"{prog}: error: {e}\n")
    raise AssertionError("unreachable")



# ---------------------------------------------------------------------------- the recipe's steps
# Each step runs its stage after the steps it needs, and only when its artifact is not finished,
# so a per-stage job or a sweep trial calls exactly the step it wants; ``run.writing`` holds the
# key's lease while the stage runs. Every stage's ``run`` is called by name here: reading this
# file leads into every stage.

def run_teachers(run: Run) -> str:
    """Stage 1: the teacher trajectory (the observer and the multi-weak teachers)."""
    inputs: dict[str, str] = {}
    with run.writing(teachers, inputs) as key:
        if key:
            run.done(teachers, inputs, teachers.run(run.cfg, run.store, key, inputs))
    return run.keys["teachers"]


def run_select(run: Run) -> str:
    """Stage 2: RDED patch selection with the observer."""
    inputs = {"teachers": run_teachers(run)}
    with run.writing(select, inputs) as key:
        if key:
            run.done(select, inputs, select.run(run.cfg, run.store, key, inputs))
    return run.keys["select"]


def check_recover_source(cfg: Config) -> None:
    """``images.source`` must name a recover variant for the recover step to run."""
    if cfg.images.source not in recover.SOURCES:
        raise ConfigError(f"config key 'images.source': recover makes {' or '.join(recover.SOURCES)} images, "
                          f"not {cfg.images.source!r}; set images.source=lpld (or sre2l)")


def run_recover(run: Run) -> str:
    """Stage 2 (images.source sre2l | lpld): images synthesised against the observer's BatchNorm
    statistics (lpld: each class's own, from a pass over the training set)."""
    check_recover_source(run.cfg)  # before the teachers: nothing to synthesise
    inputs = {"teachers": run_teachers(run)}
    with run.writing(recover, inputs) as key:
        if key:
            run.done(recover, inputs, recover.run(run.cfg, run.store, key, inputs))
    return run.keys["recover"]


def run_external(run: Run) -> str:
    """Stage 2 (images.source external): a distilled set made elsewhere (RDED / SRe2L / LPLD layouts,
    any class folders), its folders mapped explicitly onto the training classes."""
    inputs: dict[str, str] = {}
    with run.writing(external, inputs) as key:
        if key:
            run.done(external, inputs, external.run(run.cfg, run.store, key, inputs))
    return run.keys["external"]


def run_source_images(run: Run) -> str:
    """The image source ``images.source`` names: RDED's selection, SRe2L / LPLD recover, or an
    external set."""
    if run.cfg.images.source == "external":
        return run_external(run)
    return run_select(run) if run.cfg.images.source == "rded" else run_recover(run)


def run_transfer(run: Run) -> str:
    """Stage 3: the LoRA projector fitted to the teacher window (needs no images)."""
    inputs = {"teachers": run_teachers(run)}
    with run.writing(transfer, inputs) as key:
        if key:
            run.done(transfer, inputs, transfer.run(run.cfg, run.store, key, inputs))
    return run.keys["transfer"]


def run_refine(run: Run) -> str:
    """Stage 4: the image update of the source images (selected or recovered) on the projector."""
    inputs = {"select": run_source_images(run), "transfer": run_transfer(run)}
    with run.writing(refine, inputs) as key:
        if key:
            run.done(refine, inputs, refine.run(run.cfg, run.store, key, inputs))
    return run.keys["refine"]


def run_images(run: Run) -> str:
    """The distilled images evaluate trains on: refined when refine is on, else the source's."""
    run.keys["images"] = run_refine(run) if run.cfg.refine.enabled else run_source_images(run)
    return run.keys["images"]


def run_evaluate(run: Run) -> str:
    """Stage 5/6: students on the distilled images with every label strategy."""
    inputs = {"images": run_images(run), "teachers": run_teachers(run), "transfer": run_transfer(run)}
    with run.writing(evaluate, inputs) as key:
        if key:
            run.done(evaluate, inputs, evaluate.run(run.cfg, run.store, key, inputs))
    return run.keys["evaluate"]


@dataclass
class RunResult:
    """What a pipeline run produced: artifact keys by stage, the results table, the report."""
    keys: dict[str, str] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    report_uri: str = ""
    table: str = ""
    wall_s: float = 0.0
    stage_s: dict[str, float | None] = field(default_factory=dict)  # None: found finished


def recipe(run: Run) -> None:
    """The whole recipe, in order."""
    run_teachers(run)
    # the image source and transfer each need only the teachers: neither reads the other's artifact.
    run_source_images(run)  # select (rded) or recover (sre2l, lpld), by images.source
    run_transfer(run)
    run_images(run)        # refine (when enabled) adapts the selected images to the projector
    run_evaluate(run)


def distill(cfg: Config) -> RunResult:
    """The whole recipe, in order; then the report."""
    t0 = time.perf_counter()
    run = Run.start(cfg)
    recipe(run)
    return _result(run, t0)


def _result(run: Run, t0: float) -> RunResult:
    """The report of a run whose recipe has been walked, its wall time since ``t0`` and stage times."""
    result = make_report(run.cfg, run.store, run.keys)
    result.wall_s = time.perf_counter() - t0
    result.stage_s = dict(run.stage_s)
    return result


def finished_result(cfg: Config) -> RunResult | None:
    """The report of a run whose every artifact is already finished, found without starting Ray
    (keys come from the config, the store's listings and the data's fingerprints; nothing is written
    before every stage is known finished); None when some stage still has work, or when anything on
    the way fails: the full run then starts, and its preflight names what is wrong."""
    from hello_ray.data.demo import demo_dataset_key

    t0 = time.perf_counter()
    try:
        store = open_run_store(cfg, check=False)
        if cfg.data.source == "demo" and not store.exists(demo_dataset_key(store)):
            return None  # a fresh store: the run writes the demo shards first
        run = Run(cfg, store, dry=True)
        recipe(run)
    except NotFinished:
        return None
    except Exception as e:  # noqa: BLE001 - the full run's checks report it properly
        log.debug("finished-run check not taken: %s: %s", type(e).__name__, e)
        return None
    log.info("every stage's artifact is finished: nothing to compute, no Ray started")
    return _result(run, t0)


def format_stage_times(stage_s: dict[str, float | None], total_s: float) -> str:
    """One line per stage (its wall seconds, or "cached") and the command's total."""
    lines = [f"{'stage':10s} {'wall s':>8s}"]
    lines += [f"{stage:10s} {('cached' if s is None else f'{s:.1f}'):>8s}" for stage, s in stage_s.items()]
    lines.append(f"{'total':10s} {total_s:8.1f}  (this command, start-up and checks included)")
    return "\n".join(lines)


def stage_job(argv: list[str], step: "Any", description: str,
              check_job: "Any" = None) -> tuple[Config, "Store", str]:
    """What every ``jobs/<stage>.py`` does: parse flags, run ``step`` (e.g. :func:`run_select`)
    after exactly the steps it needs. ``check_job(cfg)`` is a rule of that job alone (recover needs
    a recover ``images.source``): its ConfigError exits 2 before Ray starts, like every check.
    Returns the config, the store and the stage's key."""
    import os

    setup_logging()
    prog = os.path.splitext(os.path.basename(sys.argv[0]))[0] or step.__name__
    cfg = parse_args(argv, prog=prog, description=description)
    if check_job is not None:
        try:
            check_job(cfg)
        except ConfigError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    with sigterm_exit(prog):  # `ray job stop`: the leases are released, the next driver need not wait
        run = Run.start(cfg)
        try:
            return cfg, run.store, step(run)
        except lease.LeaseHeld as e:  # --no-wait and another driver is writing: refused, not failed
            print(f"{prog}: refused: {e}", file=sys.stderr)
            raise SystemExit(3) from None


def make_report(cfg: Config, store: "Store", keys: dict[str, str],
                sweep_rows: list[dict[str, Any]] | None = None) -> RunResult:
    """Collect the finished artifacts' numbers and write the report next to them."""
    from hello_ray import report
    from hello_ray.accounting import storage_report
    from hello_ray.formats.results import format_table
    from hello_ray.scores import fair_scores, format_scores

    inputs = report.collect_inputs(store, keys)
    ev = cfg.evaluate
    scores = fair_scores(inputs["rows"], ev.full_top1, ev.score_scale, ev.score_weight) if inputs["rows"] else []
    ipc = cfg.select.ipc
    if cfg.images.source == "external" and inputs["images"] is not None:  # the set's own size, not select's
        ipc = max(1, round(inputs["images"].num_images / max(1, inputs["images"].num_classes)))
    storage = storage_report(
        classes=len(inputs["class_names"]), ipc=ipc, epochs=cfg.evaluate.epochs,
        conv_rank=cfg.transfer.conv_rank, head_rank=cfg.transfer.head_rank,
        clip_model=cfg.transfer.clip_model, lora_style=cfg.transfer.lora_style,
        teacher=cfg.teachers.model, image_size=cfg.data.image_size, batch_size=cfg.evaluate.batch_size)
    name = f"report-{cfg.name}-{keys['evaluate'].rsplit('-', 1)[-1]}"
    uri = report.write_report(store, name, results_rows=inputs["rows"],
                              trajectory=inputs["trajectory"], fidelity=inputs["fidelity"],
                              sweep_rows=sweep_rows, storage=storage, inputs=keys,
                              teacher_window=cfg.transfer.teacher_window, images=inputs["images"],
                              data=inputs["data"], preflight=read_preflight(store, cfg),
                              meta={"preset": cfg.name, "store": store.uri,
                                    "images": f"{cfg.images.source} ({keys.get('images', '-')})"},
                              scores=scores)
    table = format_table(inputs["rows"])
    if scores:
        table += "\n\n" + format_scores(scores)
    return RunResult(keys=dict(keys), rows=inputs["rows"], report_uri=uri, table=table)


def read_preflight(store: "Store", cfg: Config) -> dict[str, Any] | None:
    """The JSON of the last passing ``hello-ray preflight`` of this run name, if the store has one."""
    import json

    from hello_ray.formats.preflight import PREFLIGHT_KEY, preflight_file
    from hello_ray.store import StoreError

    try:
        return json.loads(store.get_bytes(PREFLIGHT_KEY, preflight_file(cfg.name)))
    except (StoreError, OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    """``python jobs/distill.py`` / ``hello-ray distill``: the recipe, then the results table and
    the report's location as the last lines of the output. The preflight's checks (not its
    rehearsal) run first; ``--skip-preflight`` skips them."""
    t0 = time.perf_counter()
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    skip_preflight = "--skip-preflight" in argv
    cfg = parse_args([a for a in argv if a != "--skip-preflight"], prog="distill",
                     description="HeLlO dataset distillation, end to end (--skip-preflight: start without "
                                 "the preflight checks of store, data, weights and resources)")
    # A re-run of a finished run computes nothing: its report without Ray or the preflight's reads.
    result = finished_result(cfg)
    if result is not None:
        return _print_result(result, t0)
    with sigterm_exit("distill"):  # `ray job stop`: the leases are released, the next driver need not wait
        if not skip_preflight:
            from hello_ray.preflight.cli import refuse_failing_run

            if refuse_failing_run(cfg):  # a failing check named on stderr; nothing run, nothing written
                return 2
        try:
            result = distill(cfg)
        except ConfigError as e:  # a stage that could never be scheduled here: refused before compute
            print(f"distill: error: {e}", file=sys.stderr)
            return 2
        except lease.LeaseHeld as e:  # --no-wait and another driver is writing an artifact we need
            print(f"distill: refused: {e}", file=sys.stderr)
            return 3
    import ray

    ray.shutdown()  # drains the workers' forwarded log lines, so the table below is the last thing
    return _print_result(result, t0)


def _print_result(result: RunResult, t0: float) -> int:
    """The artifacts, the per-stage times and the results table: the output's last lines."""
    print("\nartifacts: " + ", ".join(f"{s}={k}" for s, k in result.keys.items()))
    print(f"wall time: {result.wall_s:.1f} s\n")
    print(format_stage_times(result.stage_s, time.perf_counter() - t0) + "\n")
    print(result.table)
    print(f"\nreport:    {result.report_uri}")
    return 0
