"""The ``hello-ray`` console script: ``hello-ray <command> ...``."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "storage": "hello_ray.accounting:main",   # label storage of each strategy, from real shapes
        "distill": "hello_ray.pipeline:main",     # the whole pipeline (same as jobs/distill.py)
        "sweep": "hello_ray.sweep:main",          # Ray Tune over LoRA ranks and teacher windows
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: hello-ray {" + ",".join(commands) + "} [args...]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, func = commands[argv[0]].split(":")
    import importlib

    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
