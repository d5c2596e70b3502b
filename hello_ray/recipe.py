"""The recipe: teachers -> select or recover | transfer -> refine -> evaluate -> report, read top to bottom.

Every stage reads artifacts by key and writes one artifact whose key is derived from its
config and its inputs' keys. ``run_stage`` skips a stage whose artifact is already finished,
so a re-run with the same config is a no-op, a crashed run resumes at the stage that died
(and, inside Ray Train stages, at its last checkpoint), and a second IPC reuses the teachers.
One writer per artifact: a stage runs under its key's lease (:mod:`hello_ray.lease`), so a second
driver on the same key waits and reuses the artifact (or, ``--no-wait``, refuses).

Every stage module has one shape, written down in ``hello_ray/stages/__init__.py`` (the stage
contract); :mod:`hello_ray.runner` runs one stage (keys, fingerprints, lease, manifest) and
:mod:`hello_ray.pipeline` is the command line (``python jobs/distill.py``, the stage jobs).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from hello_ray.config import Config, ConfigError
from hello_ray.registry import open_run_store
from hello_ray.runner import NotFinished, Run
from hello_ray.stages import evaluate, external, recover, refine, select, teachers, transfer

if TYPE_CHECKING:
    from hello_ray.store import Store

log = logging.getLogger("hello_ray.pipeline")  # the name its log lines always had


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
    t0 = time.perf_counter()
    walked = _walked_dry(cfg, recipe)
    if walked is None:
        return None
    log.info("every stage's artifact is finished: nothing to compute, no Ray started")
    return _result(walked[0], t0)


def finished_step(cfg: Config, step: Callable[[Run], str]) -> tuple["Store", str] | None:
    """A stage job's ``step`` (e.g. :func:`run_teachers`) whose artifact and every artifact before it
    are finished: the store and its key, found as :func:`finished_result` finds a run's (no Ray);
    None when anything is left to compute or cannot be known so."""
    walked = _walked_dry(cfg, step)
    if walked is None:
        return None
    log.info("every artifact this job needs is finished: nothing to compute, no Ray started")
    return walked[0].store, walked[1]


def _walked_dry(cfg: Config, walk: Callable[[Run], Any]) -> tuple[Run, Any] | None:
    """``walk`` on a dry Run (keys derived, nothing started or written): the Run and what ``walk``
    returned; None at the first stage not finished, or when anything on the way fails (a real run
    then reports it properly)."""
    from hello_ray.data.demo import demo_dataset_key

    try:
        store = open_run_store(cfg, check=False)
        if cfg.data.source == "demo" and not store.exists(demo_dataset_key(store)):
            return None  # a fresh store: the run writes the demo shards first
        run = Run(cfg, store, dry=True)
        out = walk(run)
    except NotFinished:
        return None
    except Exception as e:  # noqa: BLE001 - the full run's checks report it properly
        log.debug("finished-run check not taken: %s: %s", type(e).__name__, e)
        return None
    return run, out


def format_stage_times(stage_s: dict[str, float | None], total_s: float) -> str:
    """One line per stage (its wall seconds, or "cached") and the command's total."""
    lines = [f"{'stage':10s} {'wall s':>8s}"]
    lines += [f"{stage:10s} {('cached' if s is None else f'{s:.1f}'):>8s}" for stage, s in stage_s.items()]
    lines.append(f"{'total':10s} {total_s:8.1f}  (this command, start-up and checks included)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the report

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
