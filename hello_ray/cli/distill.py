"""``python jobs/distill.py`` / ``hello-ray distill`` (:func:`main`) and every ``jobs/<stage>.py``
(:func:`stage_job`): flags to a checked Config, the preflight's checks, the recipe
(:mod:`hello_ray.recipe`), the results table and the report's location."""
from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from hello_ray import lease
from hello_ray.cli.common import format_checks, refused
from hello_ray.config import Config, ConfigError, describe, load_config
from hello_ray.recipe import RunResult, distill, finished_result, finished_step, format_stage_times
from hello_ray.registry import check
from hello_ray.runner import Run
from hello_ray.runtime import setup_logging, sigterm_exit

RECIPE_LINE = ("The recipe: teachers -> select or recover | transfer -> refine -> evaluate -> report, "
               "from the command line.")

if TYPE_CHECKING:
    from hello_ray.store import Store


def build_parser(prog: str = "distill", description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description or RECIPE_LINE)
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


def stage_job(argv: list[str], step: "Any", description: str,
              check_job: "Any" = None) -> tuple[Config, "Store", str]:
    """What every ``jobs/<stage>.py`` does: parse flags, run ``step`` (e.g. :func:`run_select`)
    after exactly the steps it needs. ``check_job(cfg)`` is a rule of that job alone (recover needs
    a recover ``images.source``): its ConfigError exits 2 before Ray starts, like every check.
    A stage whose artifact is finished, with every one before it, is found without Ray.
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
    found = finished_step(cfg, step)  # a finished stage: its key from the store alone, as distill's re-run
    if found is not None:
        return cfg, found[0], found[1]
    with sigterm_exit(prog):  # `ray job stop`: the leases are released, the next driver need not wait
        run = Run.start(cfg)
        try:
            return cfg, run.store, step(run)
        except lease.LeaseHeld as e:  # --no-wait and another driver is writing: refused, not failed
            raise SystemExit(refused(prog, e)) from None


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
            if refuse_failing_run(cfg):  # a failing check named on stderr; nothing run, nothing written
                return 2
        try:
            result = distill(cfg)
        except ConfigError as e:  # a stage that could never be scheduled here: refused before compute
            print(f"distill: error: {e}", file=sys.stderr)
            return 2
        except lease.LeaseHeld as e:  # --no-wait and another driver is writing an artifact we need
            return refused("distill", e)
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


def refuse_failing_run(cfg: Config, prog: str = "distill") -> int:
    """The check part (no rehearsal) before a run: 0 to go on, 2 with the failing checks named."""
    from hello_ray.preflight.checks import run_checks

    report, _ = run_checks(cfg, probe_network=False)
    if report.ok:
        return 0
    names = ", ".join(c.name for c in report.failures())
    print(f"{prog}: refused by the preflight checks ({names}); nothing was run:\n{format_checks(report)}\n"
          f"(--skip-preflight runs anyway; hello-ray preflight rehearses the stages)", file=sys.stderr)
    return 2

