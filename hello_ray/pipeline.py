"""The recipe: teachers -> select -> transfer -> refine -> evaluate -> report.

Every stage reads artifacts by key and writes one artifact whose key is derived from its
config and its inputs' keys. ``run_stage`` skips a stage whose artifact is already finished,
so a re-run with the same config is a no-op, a crashed run resumes at the stage that died
(and, inside Ray Train stages, at its last checkpoint), and a second IPC reuses the teachers.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from hello_ray.config import Config, ConfigError, describe, load_config
from hello_ray.runtime import ensure_ray

if TYPE_CHECKING:
    from hello_ray.store import Store

log = logging.getLogger("hello_ray")


# ---------------------------------------------------------------------------- command line

def build_parser(prog: str = "distill", description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description or __doc__.splitlines()[0])
    p.add_argument("--preset", default="demo", help="preset name in jobs/configs (smoke, demo, "
                   "imagenet100, imagenet1k) or a YAML path; default: demo")
    p.add_argument("--config", default=None, help="a YAML file applied over the preset")
    p.add_argument("--store", default=None, help="artifact store URI (local path, file://, s3://bucket/prefix)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its help")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. select.ipc=50 compute.use_gpu=false")
    return p


def parse_args(argv: list[str] | None = None, prog: str = "distill",
               description: str = "") -> Config:
    """argv -> validated Config (exits with status 2 and the key at fault on a bad value)."""
    parser = build_parser(prog, description)
    args = parser.parse_args(argv)
    if args.help_config:
        for key, default, text in describe():
            print(f"{key:38s} {default:24s} {text}")
        raise SystemExit(0)
    overrides = list(args.overrides)
    if args.store:
        overrides.append(f"store={args.store}")
    try:
        return load_config(args.preset, args.config, overrides)
    except ConfigError as e:
        parser.exit(2, f"{prog}: error: {e}\n")
    raise AssertionError("unreachable")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=False)


# ---------------------------------------------------------------------------- stage runner

def open_run_store(cfg: Config) -> "Store":
    from hello_ray.store import open_store

    return open_store(cfg.store, cfg.s3_endpoint or None)


def run_stage(stage: ModuleType, cfg: Config, store: "Store", inputs: dict[str, str] | None = None) -> str:
    """Run one stage unless its artifact exists; returns the artifact key.

    The stage writes its data files; the manifest is written here, last, so a stage that
    dies half-way leaves nothing that readers would take for a finished artifact.
    """
    inputs = dict(inputs or {})
    config = stage.stage_config(cfg)
    key = store.artifact_key(stage.STAGE, config, inputs)
    if store.exists(key):
        log.info("[%s] cached: %s", stage.STAGE, store.uri_for(key))
        return key
    log.info("[%s] running -> %s", stage.STAGE, store.uri_for(key))
    t0 = time.perf_counter()
    summary = stage.run(cfg, store, key, inputs) or {}
    summary = {**summary, "wall_s": round(time.perf_counter() - t0, 2)}
    store.finalize(key, stage.STAGE, config, inputs, summary)
    log.info("[%s] done in %.1f s: %s", stage.STAGE, summary["wall_s"], store.uri_for(key))
    return key


@dataclass
class RunResult:
    """What a pipeline run produced: artifact keys by stage, the results table, the report."""
    keys: dict[str, str] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    report_uri: str = ""
    table: str = ""
    wall_s: float = 0.0


# The recipe as data: each stage's inputs (role -> the stage that makes it). "images" is the
# refined set, or the selection itself when refine is off.
RECIPE: dict[str, dict[str, str]] = {
    "teachers": {},
    "select": {"teachers": "teachers"},
    "transfer": {"teachers": "teachers"},
    "refine": {"select": "select", "transfer": "transfer"},
    "evaluate": {"images": "images", "teachers": "teachers", "transfer": "transfer"},
}


def stage_job(argv: list[str], stage: str, description: str) -> tuple[Config, "Store", str]:
    """What every ``jobs/<stage>.py`` does: parse flags, run ``stage`` after its inputs.

    Returns the config, the store and the stage's artifact key (the job prints its own summary).
    """
    setup_logging()
    prog = os.path.splitext(os.path.basename(sys.argv[0]))[0] or stage  # the job's own name in --help
    cfg = parse_args(argv, prog=prog, description=description)
    store, keys = run_through(cfg, stage)
    return cfg, store, keys[stage]


def run_through(cfg: Config, target: str, store: "Store | None" = None,
                keys: dict[str, str] | None = None) -> tuple["Store", dict[str, str]]:
    """Run ``target`` after exactly the stages it needs (each skipped when finished).

    Returns the store and the artifact keys by stage (plus "images"). The stage jobs call
    this, so a job never re-spells the wiring; ``transfer`` never triggers ``select``.
    """
    from hello_ray import stages

    if store is None:
        store = open_run_store(cfg)
        ensure_ray(cfg.compute)
    keys = {} if keys is None else keys
    if target == "images":
        target = "refine" if cfg.refine.enabled else "select"
        run_through(cfg, target, store, keys)
        keys["images"] = keys[target]
        return store, keys
    if target not in keys:
        inputs = {role: run_through(cfg, source, store, keys)[1][source]
                  for role, source in RECIPE[target].items()}
        module = importlib.import_module(f"{stages.__name__}.{target}")
        keys[target] = run_stage(module, cfg, store, inputs)
    return store, keys


def distill(cfg: Config) -> RunResult:
    """The whole recipe: teachers -> select -> transfer -> refine -> evaluate, then the report."""
    t0 = time.perf_counter()
    store, keys = run_through(cfg, "evaluate")
    result = make_report(cfg, store, keys)
    result.wall_s = time.perf_counter() - t0
    return result


def make_report(cfg: Config, store: "Store", keys: dict[str, str],
                sweep_rows: list[dict[str, Any]] | None = None) -> RunResult:
    """Collect the finished artifacts' numbers and write the report next to them."""
    from hello_ray import report
    from hello_ray.accounting import storage_report

    inputs = report.collect_inputs(store, keys)
    storage = storage_report(
        classes=len(inputs["class_names"]), ipc=cfg.select.ipc, epochs=cfg.evaluate.epochs,
        conv_rank=cfg.transfer.conv_rank, head_rank=cfg.transfer.head_rank,
        clip_model=cfg.transfer.clip_model, lora_style=cfg.transfer.lora_style,
        teacher=cfg.teachers.model, image_size=cfg.data.image_size)
    name = f"report-{cfg.name}-{keys['evaluate'].rsplit('-', 1)[-1]}"
    uri = report.write_report(store, name, results_rows=inputs["rows"],
                              trajectory=inputs["trajectory"], fidelity=inputs["fidelity"],
                              sweep_rows=sweep_rows, storage=storage, inputs=keys,
                              teacher_window=cfg.transfer.teacher_window,
                              meta={"preset": cfg.name, "store": store.uri})
    return RunResult(keys=dict(keys), rows=inputs["rows"], report_uri=uri,
                     table=report.format_table(inputs["rows"]))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cfg = parse_args(argv, prog="distill", description="HeLlO dataset distillation, end to end")
    result = distill(cfg)
    print()
    print(result.table)
    print(f"\nartifacts: " + ", ".join(f"{s}={k}" for s, k in result.keys.items()))
    print(f"report:    {result.report_uri}")
    print(f"wall time: {result.wall_s:.1f} s")
    return 0
