"""The run report: markdown tables and PNG plots written into the store.

Inputs are plain data, never stage objects, so the report can be rebuilt from the files the
stages leave in the store (``collect_inputs``, through the format modules of hello_ray/formats/)
or from a notebook:

- ``results_rows``: the evaluate stage's rows (a list of dicts or a pandas DataFrame), in the one
  results schema of hello_ray/formats/results.py: ``student, strategy, seed, images,
  continual_steps, continual_step, top1`` (a fraction in [0, 1]), ``label_bytes`` and optionally
  ``step_s, wall_s, peak_mem_mb``. They are summarised over seeds per (images, student,
  strategy, continual step), so the floor and continual rows keep their own groups.
- ``trajectory``: the teachers' ``trajectory.json`` (``{"epochs": [{"epoch", "top1"}, ...]}``).
- ``fidelity``: the transfer stage's ``fidelity.json``: ``{"before": {...}, "after": {...}}``,
  each with ``agreement, kl`` and ``projector_top1`` (or ``top1``), optionally ``teacher_top1``;
  an optional top-level ``teacher_window`` shades the teacher curve.
- ``sweep_rows``: one dict per Tune trial with ``conv_rank, head_rank, window, top1``
  (``top1`` None for a trial a scheduler stopped early).
- ``storage``: storage accounting, a mapping (``hello-ray storage --json``) or a list of dicts.
- ``images``: an ``ImageGrid`` (hello_ray/plots/image_grid.py ``read_image_grid``): the distilled
  images evaluate trained on, per class, and for a refined set the same images before refine.
- ``data``: per stage that read the real data, its manifest summary's ``corrupt`` (undecodable
  images per split and class, hello_ray/data/corrupt.py) and ``dataset`` (the split fingerprints):
  ``{stage: {"corrupt": {split role: {...}}, "dataset": {split role: {...}}}}``.

``build_report`` returns ``(markdown, {png_name: png_bytes})``; ``write_report`` puts the PNGs,
then ``README.md`` (so a README never points at a missing plot), then the manifest. Plots are
drawn on ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot global state, safe inside
Ray workers and without a display.
"""
from __future__ import annotations

from hello_ray.report.plots import (  # noqa: F401 (re-exported)
    STAGE,
    SWEEP_KEYS,
    FIDELITY_METRICS,
    REPORT_FILE,
    GRID_PNGS,
    PNG_NAMES,
    _flatten,
    _storage_readable,
    storage_table,
    _window_bounds,
    sweep_summary,
    sweep_grid,
    _png,
    series_label,
    plot_accuracy_vs_bytes,
    plot_teacher_curve,
    _fid,
    plot_fidelity,
    plot_sweep_heatmap,
)
from hello_ray.report.build import (  # noqa: F401 (re-exported)
    _fidelity_section,
    images_section,
    data_section,
    build_report,
    preflight_section,
    report_key,
    image_source,
    label_image_source,
    collect_inputs,
    write_report,
)
