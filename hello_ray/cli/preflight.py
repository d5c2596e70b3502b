"""``hello-ray preflight`` (and ``jobs/preflight.py``): checks, rehearsal, cost model.

    hello-ray preflight --preset imagenet1k data.source=s3://bucket/imagenet store=s3://bucket/run
    hello-ray preflight --preset imagenet1k --cluster cluster/aws.yaml --no-rehearsal ...
    hello-ray preflight --preset imagenet1k --no-rehearsal --classes 1000 --device-profile gpu_check.json

On GPUs the evaluate grid's GPU-hours on the node (before and after the row queue, and the useful
work) are printed from a measured device profile (``preflight/schedule.py``; by default the H200's
``benchmarks/results/gpu_check_h200.json`` of a source checkout), whatever the checks say.

Exit status: 0 when every check passed and every stage took its rehearsal steps; 1 when a check or
a stage's rehearsal failed (each named); 2 on a bad flag or config value. A passing preflight keeps
its JSON in the store (``_preflight/<run name>.json``) for the run's report; a failing one leaves
nothing there. The work itself is :mod:`hello_ray.preflight.run`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from hello_ray.cli.common import format_checks
from hello_ray.config import ConfigError, load_config
from hello_ray.formats.preflight import PREFLIGHT_KEY, preflight_file
from hello_ray.preflight.checks import run_checks
from hello_ray.preflight.run import rehearse, stage_hours, stage_schedules


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hello-ray preflight", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo", help="preset name or YAML path (as for distill)")
    p.add_argument("--config", default=None, help="a YAML file applied over the preset")
    p.add_argument("--store", default=None, help="artifact store URI (as for distill)")
    p.add_argument("--cluster", default=None, help="a Ray autoscaler YAML (e.g. cluster/aws.yaml): check each "
                   "stage's ask against its available_node_types instead of the live Ray's nodes")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (logs go to stderr)")
    p.add_argument("--no-rehearsal", action="store_true", help="the checks only (no compute)")
    p.add_argument("--flop-budget", type=float, default=None, help="most FLOPs of one rehearsal step (default "
                   "3e10 on CPU, 1e14 on GPU): a stage runs its own per-worker batch, or fewer images to fit")
    p.add_argument("--steps", type=_at_least_one, default=2, help="rehearsal steps per stage after a warm-up (default 2)")
    p.add_argument("--devices", default=None, help="accelerator table YAML (default: the shipped devices.yaml)")
    p.add_argument("--sample-images", type=int, default=16, help="images decoded per split by the data check")
    p.add_argument("--no-network", action="store_true", help="do not probe the weights' download URL")
    p.add_argument("--device-profile", default=None, help="a benchmarks/gpu_check.py JSON measured on the run's "
                   "GPU, for the evaluate grid's GPU-hours (default: the H200's, in a source checkout)")
    p.add_argument("--classes", type=_at_least_one, default=None, help="class count for the evaluate grid's "
                   "GPU-hours when the data check cannot read the dataset from here")
    p.add_argument("--train-images", type=_at_least_one, default=None, help="training images, for the per-stage "
                   "GPU-hours when the data check cannot count them from here (ImageNet-1K: 1281167)")
    p.add_argument("--node-cpus", type=_at_least_one, default=None, help="CPUs of the GPU node (default: the "
                   "profile machine's CPUs per GPU x compute.num_workers)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def _at_least_one(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    from hello_ray.runtime import LOG_DATEFMT, LOG_FORMAT, setup_logging

    args = build_parser().parse_args(argv)
    if args.json:  # stdout carries the JSON alone; setup_logging keeps this handler
        logging.basicConfig(format=LOG_FORMAT, datefmt=LOG_DATEFMT, stream=sys.stderr)
    setup_logging()
    overrides = list(args.overrides) + ([f"store={args.store}"] if args.store else [])
    try:
        cfg = load_config(args.preset, args.config, overrides)
    except ConfigError as e:
        print(f"hello-ray preflight: error: {e}", file=sys.stderr)
        return 2
    import yaml

    from hello_ray.preflight.cost import load_devices

    try:  # a wrong --devices fails here, not after the rehearsal's minutes
        load_devices(args.devices)
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"hello-ray preflight: error: --devices {args.devices}: {e}", file=sys.stderr)
        return 2
    if args.device_profile:
        from hello_ray.preflight.schedule import load_profile

        try:
            load_profile(args.device_profile)
        except (OSError, ValueError) as e:
            print(f"hello-ray preflight: error: --device-profile {args.device_profile}: {e}", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    report, store = run_checks(cfg, args.cluster, args.sample_images, probe_network=not args.no_network)
    table = None
    # The rehearsal runs here whatever the cluster check says (it needs data, store and weights only):
    # a run meant for a GPU cluster is still rehearsed on a laptop, its resource failure still named.
    if not args.no_rehearsal and all(c.name == "resources" for c in report.failures()):
        table = rehearse(cfg, store, report, args.steps, args.flop_budget, args.devices)
    wall = time.perf_counter() - t0
    classes = args.classes or report.facts.get("classes")
    schedules = stage_schedules(cfg, classes, args.device_profile)
    hours = stage_hours(cfg, classes, args.train_images or report.facts.get("train_images"), args.device_profile,
                        args.node_cpus)
    out = {"preset": cfg.name, "store": cfg.store, "wall_s": round(wall, 1), **report.to_json(), "cost": table,
           **{f"{name}_schedule": block for name, (block, _) in schedules.items()}, "stage_gpu_hours": hours}
    if report.ok and store is not None:
        store.put_bytes(PREFLIGHT_KEY, preflight_file(cfg.name), json.dumps(out, default=str).encode())
    elif not report.ok:
        from hello_ray.preflight.checks import tidy_store

        tidy_store(cfg, report)
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print(f"\npreflight of {cfg.name} ({'passed' if report.ok else 'FAILED'}, {wall:.1f} s):")
        print(format_checks(report))
        if table is not None:
            from hello_ray.preflight.cost import format_cost

            print("\n" + format_cost(table))
            for s in table["stages"]:
                for note in s["notes"]:
                    print(f"  note ({s['stage']}): {note}")
            for s in table["stages"]:
                if "lora_params" in s:
                    print(f"  LoRA parameters: {s['lora_params']:,}")
            for s in table["stages"]:
                if "stored_soft_labels_bytes" in s:
                    print(f"  stored soft labels ({s['stored_labels_what']}): "
                          f"{s['stored_soft_labels_bytes']:,} B (hello-ray storage)")
        for block, text in schedules.values():
            if block is not None:
                print("\n" + text)
        if hours is not None:
            from hello_ray.preflight.schedule import format_stage_hours

            print("\n" + format_stage_hours(hours))
    return 0 if report.ok else 1
