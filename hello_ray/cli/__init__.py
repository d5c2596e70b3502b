"""The ``hello-ray`` console script, ``hello-ray <command> ...``, and every entry point: one module
per command family (``distill`` and the ``jobs/<stage>.py`` scripts, ``preflight``, ``sweep``,
``storage``, ``scores``, ``synth-data``, ``export``, ``ls``/``rm``/``gc``, ``labels-*``). Nothing in
the package imports from here: the commands parse flags, call the library and print."""
from __future__ import annotations

import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    target: str   # "module:function", imported only when the command runs (torch and Ray are slow)
    help: str     # the one line ``hello-ray --help`` shows


COMMANDS: dict[str, Command] = {
    "distill": Command("hello_ray.cli.distill:main",
                       "the whole pipeline, teachers to report (same as jobs/distill.py)"),
    "preflight": Command("hello_ray.cli.preflight:main",
                         "checks, a rehearsal at the real shapes and the cost model, before paying for a run"),
    "synth-data": Command("hello_ray.cli.synth_data:main",
                          "write ImageNet-shaped synthetic data (a shape fixture for rehearsals and tests)"),
    "sweep": Command("hello_ray.cli.sweep:main",
                     "Ray Tune over LoRA ranks and teacher windows (same as jobs/sweep.py)"),
    "storage": Command("hello_ray.cli.storage:main",
                       "bytes each label strategy ships, from the real layer shapes (no compute)"),
    "scores": Command("hello_ray.cli.scores:main",
                      "DD-Ranking's fair scores (LRS, ARS) of a store's evaluate artifacts, ours or an external set's"),
    "ls": Command("hello_ray.cli.housekeeping:ls_main",
                  "list a store's artifacts, finished or not, with files, bytes and run state"),
    "rm": Command("hello_ray.cli.housekeeping:rm_main",
                  "remove an artifact with its Ray run state and local cache (re-runs start fresh)"),
    "gc": Command("hello_ray.cli.housekeeping:gc_main",
                  "collect unfinished leftovers, orphan Ray run state and stale download caches"),
    "export": Command("hello_ray.cli.export:main",
                      "a run's distilled set as a self-contained package (images, adapter, card, manifest)"),
    "labels-import": Command("hello_ray.cli.labels:import_main",
                             "SRe2L/LPLD relabel records (epoch_<e>/batch_<b>.tar) -> stored labels of an image set"),
    "labels-export": Command("hello_ray.cli.labels:export_main",
                             "an artifact's stored labels -> SRe2L/LPLD relabel records"),
}


def usage() -> str:
    """``hello-ray --help``: the commands, one line each."""
    width = max(map(len, COMMANDS))
    lines = ["usage: hello-ray <command> [args...]", "",
             "HeLlO dataset distillation with light labels, on Ray.", "", "commands:"]
    lines += [f"  {name:{width}s}  {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "'hello-ray <command> --help' lists a command's flags; "
              "'hello-ray distill --help-config' every config key."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"{usage()}\n\nhello-ray: error: {problem}", file=sys.stderr)
        return 2
    module, func = COMMANDS[argv[0]].target.split(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
