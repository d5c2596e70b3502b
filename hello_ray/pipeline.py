"""Names kept importable for scripts written against earlier versions (``pipeline.distill``,
``pipeline.Run``, ``pipeline.run_select``, ``pipeline.main``, ...). Nothing lives here: the recipe is
:mod:`hello_ray.recipe`, the runner :mod:`hello_ray.runner`, the stage registry
:mod:`hello_ray.registry`, and the command line :mod:`hello_ray.cli.distill`.
"""
from __future__ import annotations

from hello_ray.cli.distill import build_parser, main, parse_args, stage_job  # noqa: F401 (re-exported)
from hello_ray.recipe import (  # noqa: F401 (re-exported: the recipe's names)
    RunResult, check_recover_source, distill, finished_result, format_stage_times, make_report, read_preflight,
    recipe, run_evaluate, run_external, run_images, run_recover, run_refine, run_select, run_source_images,
    run_teachers, run_transfer)
from hello_ray.registry import STAGES, active_stages, check, check_resources, open_run_store  # noqa: F401 (re-exported)
from hello_ray.runner import NotFinished, Run, run_stage  # noqa: F401 (re-exported)
