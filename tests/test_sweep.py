"""The sweep's grid and its trial configs, without Tune (the Tune run is in test_pipeline.py)."""
from __future__ import annotations

import pytest

from hello_ray.config import ConfigError, load_config
from hello_ray.sweep import format_sweep, trial_config, trial_grid


@pytest.mark.parametrize("ranks,windows,expected", [
    ("[2, 4]", "[1-2, 2-3]", [(2, "1-2"), (2, "2-3"), (4, "1-2"), (4, "2-3")]),  # the smoke preset's 2x2
    ("[8]", "[1-3, 1-2]", [(8, "1-3"), (8, "1-2")]),
    ("[1, 2, 3]", "[2-3]", [(1, "2-3"), (2, "2-3"), (3, "2-3")]),
])
def test_trial_grid_is_every_rank_with_every_window(ranks, windows, expected):
    cfg = load_config("smoke", overrides=[f"sweep.conv_ranks={ranks}", f"sweep.windows={windows}"])
    assert [(p["conv_rank"], p["window"]) for p in trial_grid(cfg)] == expected


def test_trial_config_sets_ranks_window_and_projector_labels_only():
    cfg = load_config("smoke")
    t = trial_config(cfg, 4, "2-3")
    assert (t.transfer.conv_rank, t.transfer.head_rank, t.transfer.teacher_window) == (4, 64, "2-3")
    assert t.transfer.n_teachers == cfg.sweep.n_teachers
    assert t.evaluate.strategies == ["projector"] and t.evaluate.floor is False and t.evaluate.continual_steps == []
    assert cfg.transfer.conv_rank == 4 and cfg.evaluate.strategies != ["projector"]  # a copy: cfg untouched


def test_scored_sweeps_add_the_rows_lrs_needs():
    """sweep.scores: the projector's LRS per trial needs its hard-label row and the random-image
    projector row (DD-Ranking's IOR and HLR); A(full) comes from evaluate.full_top1 / full_data."""
    cfg = load_config("smoke", overrides=["sweep.scores=true", "evaluate.full_top1=0.9"])
    t = trial_config(cfg, 4, "2-3")
    assert t.evaluate.strategies == ["hard", "projector"] and t.evaluate.floor is True
    assert t.evaluate.floor_strategies == ["projector"] and t.evaluate.full_top1 == 0.9


def test_a_window_past_the_trajectory_fails_in_the_trial_config():
    cfg = load_config("smoke")
    with pytest.raises(ConfigError, match="window"):
        trial_config(cfg, 2, "2-9")


def test_format_sweep_one_line_per_trial_sorted():
    rows = [{"conv_rank": 4, "head_rank": 64, "window": "1-2", "agreement": 0.5, "top1": 0.25},
            {"conv_rank": 2, "head_rank": 32, "window": "2-3", "agreement": None, "top1": None}]
    lines = format_sweep(rows).splitlines()
    assert len(lines) == 3 and lines[1].split()[0] == "2" and "stopped" in lines[1] and "25.00%" in lines[2]
