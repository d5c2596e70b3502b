"""Ray Tune over LoRA ranks and teacher windows (the published ablations).

The teachers and the RDED selection are computed once and shared; each trial is transfer,
refine (when ``refine.enabled``: the images adapt to *that trial's* projector) and evaluate
(projector labels), through the same recipe steps as ``pipeline.distill``. A trial is a plain
function that runs the steps, whose Ray Train stages build their own TorchTrainer through the
launcher (the Ray 2.5x pattern: Tune drives a function, never a trainer object). Trials write their artifacts
into the same store with keys derived from their config, so a re-run of the sweep finds
the finished trials and reports them without retraining.

ASHA (``sweep.scheduler=asha``) gets two rungs per trial: the projector's agreement with
the teacher ensemble after transfer, then the student's top-1; a trial whose projector
agrees badly is stopped before its student is trained.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any

from hello_ray.config import Config
from hello_ray.launcher import PG_CLEANER_ENV, keep_placement_group_cleaner
from hello_ray.recipe import make_report, run_evaluate, run_source_images, run_teachers, run_transfer
from hello_ray.registry import open_run_store
from hello_ray.runner import Run
from hello_ray.store import key_stage

log = logging.getLogger("hello_ray.sweep")


def trial_config(cfg: Config, conv_rank: int, window: str) -> Config:
    """The config of one trial: ranks and window changed, projector labels only."""
    t = copy.deepcopy(cfg)
    t.transfer.conv_rank = conv_rank
    t.transfer.head_rank = conv_rank * cfg.sweep.head_rank_per_conv_rank
    t.transfer.teacher_window = window
    t.transfer.n_teachers = cfg.sweep.n_teachers or cfg.transfer.n_teachers
    t.evaluate.strategies = ["projector"]
    t.evaluate.floor = False
    if cfg.sweep.scores:  # the rows DD-Ranking's LRS of the projector needs: hard labels, random images
        t.evaluate.strategies = ["hard", "projector"]
        t.evaluate.floor, t.evaluate.floor_strategies = True, ["projector"]
    t.evaluate.continual_steps = []
    return t.validate()


def trial_grid(cfg: Config) -> list[dict[str, Any]]:
    """Every trial of the sweep: each of ``sweep.conv_ranks`` with each of ``sweep.windows``, ranks
    outer. The grid is ours (one Tune ``grid_search`` over its points), so it is pinned by a test
    without starting Tune."""
    return [{"conv_rank": int(r), "window": str(w)} for r in cfg.sweep.conv_ranks for w in cfg.sweep.windows]


def trial_run(cfg: Config, keys: dict[str, str]) -> Run:
    """A Run of one trial's config that starts from the shared teachers and source images (the
    selection, or recover's images)."""
    return Run(cfg, open_run_store(cfg), dict(keys))


def run_trial(params: dict[str, Any]) -> None:
    """One Tune trial (runs in a Tune actor): transfer, report fidelity, refine + evaluate,
    report top-1."""
    from ray import tune

    os.environ[PG_CLEANER_ENV] = params["pg_cleaner"]  # the driver's answer: a trial cannot tell
    point = params["trial"]
    t = trial_config(params["cfg"], point["conv_rank"], point["window"])
    run = trial_run(t, params["keys"])
    store = run.store
    k_transfer = run_transfer(run)
    fidelity = store.manifest(k_transfer).get("summary", {}).get("fidelity_after", {})
    tune.report({"score": float(fidelity.get("agreement", 0.0)), "rung": "transfer",
                 "transfer_key": k_transfer})
    k_eval = run_evaluate(run)
    rows = _eval_rows(store, k_eval)
    top1 = sum(r["top1"] for r in rows) / max(len(rows), 1)
    metrics = {"score": top1, "top1": top1, "rung": "evaluate", "transfer_key": k_transfer,
               "evaluate_key": k_eval, "head_rank": t.transfer.head_rank,
               "agreement": float(fidelity.get("agreement", 0.0))}
    # DD-Ranking's LRS of the projector (sweep.scores), as the evaluate stage scored it
    scores = store.manifest(k_eval).get("summary", {}).get("scores", [])
    lrs = next((s["lrs_mean"] for s in scores if s["strategy"] == "projector"), None)
    if lrs is not None:
        metrics["lrs"] = lrs
    tune.report(metrics)


def _eval_rows(store, key: str) -> list[dict[str, Any]]:
    """The trial's projector rows on the distilled images, not continual (trials switch continual
    off, and the floor unless ``sweep.scores``)."""
    from hello_ray.formats.results import read_results

    return [r for r in read_results(store, key)
            if r.get("images", "distilled") == "distilled" and not r.get("continual_steps")
            and r.get("strategy", "projector") == "projector"]


def sweep(cfg: Config) -> dict[str, Any]:
    """Shared stages, then the grid conv_ranks x windows; returns the table and the best trial."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t0 = time.perf_counter()
    grid = trial_grid(cfg)
    for point in grid:  # fail before any compute, not in the middle of the grid
        trial_config(cfg, point["conv_rank"], point["window"])
    shared = Run.start(cfg)
    store = shared.store
    source = run_source_images(shared)  # select or recover, by images.source
    keys = {"teachers": run_teachers(shared), key_stage(source): source}

    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=2, grace_period=1,
                               reduction_factor=2)
                 if cfg.sweep.scheduler == "asha" else FIFOScheduler())
    storage_path, storage_fs = store.ray_storage()
    tuner = tune.Tuner(
        # The trial's own process does no compute: its Train workers and actors ask for theirs.
        tune.with_resources(run_trial, {"CPU": 0.01}),
        param_space={"cfg": cfg, "keys": keys, "trial": tune.grid_search(grid),
                     "pg_cleaner": "1" if keep_placement_group_cleaner() else "0"},
        tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler,
                                    max_concurrent_trials=cfg.sweep.max_concurrent),
        run_config=tune.RunConfig(name=f"sweep-{source}", storage_path=storage_path,
                                  storage_filesystem=storage_fs, verbose=1),
    )
    results = tuner.fit()
    rows = []
    for r in results:
        m = r.metrics or {}
        point = r.config["trial"]
        rows.append({"conv_rank": point["conv_rank"], "window": point["window"],
                     "head_rank": point["conv_rank"] * cfg.sweep.head_rank_per_conv_rank,
                     "top1": m.get("top1"), "agreement": m.get("agreement", m.get("score")),
                     "lrs": m.get("lrs"),
                     "stopped_early": m.get("rung") != "evaluate",
                     "error": str(r.error) if r.error else ""})
    failed = [row for row in rows if row["error"]]
    if failed:
        raise RuntimeError(f"{len(failed)} sweep trial(s) failed: " + "; ".join(
            f"rank {f['conv_rank']} window {f['window']}: {f['error'][:300]}" for f in failed))
    done = [row for row in rows if row["top1"] is not None]
    best = max(done, key=lambda row: row["top1"]) if done else None
    report = None
    if best is not None:
        best_cfg = trial_config(cfg, best["conv_rank"], best["window"])
        run = trial_run(best_cfg, keys)  # every stage of the best trial is finished: found, not rerun
        run_evaluate(run)
        report = make_report(best_cfg, store, run.keys, sweep_rows=rows)
    return {"rows": rows, "best": best, "report_uri": report.report_uri if report else "",
            "wall_s": time.perf_counter() - t0}


def format_sweep(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'conv_rank':>9} {'head_rank':>9} {'window':>8} {'agreement':>9} {'top1':>7}"]
    for r in sorted(rows, key=lambda r: (r["conv_rank"], r["window"])):
        top1 = f"{100 * r['top1']:6.2f}%" if r["top1"] is not None else "stopped"
        agr = f"{100 * r['agreement']:8.2f}%" if r["agreement"] is not None else "-"
        lines.append(f"{r['conv_rank']:>9} {r['head_rank']:>9} {r['window']:>8} {agr:>9} {top1:>7}")
    return "\n".join(lines)
