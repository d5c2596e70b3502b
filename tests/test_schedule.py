"""The evaluate grid's GPU-hours from a device profile: the LPT schedule and the before/after model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hello_ray.config import load_config
from hello_ray.preflight.schedule import format_stage_hours, load_profile, stage_gpu_hours
from hello_ray.stages.evaluate_plan import evaluate_gpu_hours, format_schedule, lpt_makespan

H200 = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "gpu_check_h200.json"


@pytest.mark.parametrize("times,slots,makespan", [
    ([5, 4, 3, 3, 3], 2, 10),         # 5+3 | 4+3+3: LPT, not the optimum (5+4 | 3+3+3 = 9)
    ([1, 1, 1, 1], 4, 1),
    ([7], 3, 7),
    ([2, 2, 2], 1, 6),
    ([6, 5, 4, 3, 2, 1], 3, 7),
])
def test_longest_first_makespan(times, slots, makespan):
    assert lpt_makespan(times, slots) == makespan


def test_the_imagenet_grid_on_an_h200_node(tmp_path):
    """21 rows x 30,000 steps on 8 H200s: the queue holds the node within 2x of the useful work; the
    old DDP path (views drawn on the CPU for the whole batch on every rank) held it for over a day."""
    cfg = load_config("imagenet1k", overrides=["data.source=/data"])
    s = evaluate_gpu_hours(cfg, 1000, load_profile(H200))
    assert s["rows"] == 21 and s["gpus"] == 8 and s["device"] == "NVIDIA H200"
    assert 2.5 < s["useful_gpu_h"] < 4.5
    assert s["after"]["gpu_h"] <= 2 * s["useful_gpu_h"]
    assert s["before"]["wall_h"] > 24 and s["before"]["gpu_h"] > 40 * s["after"]["gpu_h"]
    assert "GPU-h held" in format_schedule(s)
    # A heavier student at the same shape costs proportionally more.
    big = evaluate_gpu_hours(load_config("imagenet1k", overrides=["data.source=/data", "evaluate.students=[vgg11]",
                                                                   "evaluate.lr={vgg11: 0.001}"]),
                             1000, load_profile(H200))
    assert big["useful_gpu_h"] > 1.5 * s["useful_gpu_h"]


def test_a_file_that_is_not_a_profile_is_named(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"sections": {}}))
    with pytest.raises(ValueError, match=f"device profile {bad}: not a benchmarks/gpu_check.py result"):
        load_profile(bad)


def test_preflight_prints_the_grid_gpu_hours_even_without_the_dataset(ray_local, tmp_path, capsys):
    from hello_ray.cli.preflight import main

    rc = main(["--preset", "imagenet1k", "--no-rehearsal", "--no-network", "--classes", "1000",
               "--store", str(tmp_path / "store"), f"data.source={tmp_path / 'absent'}"])
    out = capsys.readouterr().out
    assert rc == 1 and "[FAIL] data.train" in out           # no ImageNet here: the checks fail, named
    assert "evaluate grid, 21 rows on 8 x NVIDIA H200" in out and "GPU-h held" in out


def test_a_bad_device_profile_is_refused_before_anything_runs(tmp_path, capsys):
    from hello_ray.cli.preflight import main

    bad = tmp_path / "profile.json"
    bad.write_text("{}")
    assert main(["--preset", "imagenet1k", "--device-profile", str(bad), "data.source=/data"]) == 2
    assert f"--device-profile {bad}: device profile {bad}: not a benchmarks/gpu_check.py result" in \
        capsys.readouterr().err


STAGES = ("teachers", "select", "transfer", "refine", "recover", "evaluate")


@pytest.mark.parametrize("node_cpus,decode,fed", [
    (128, 549.0, True),     # 16 CPUs per H200 decode faster than the GPUs train: nothing to gain
    (16, 549.0, False),     # 2 per GPU: the CPU decode held the node; the GPUs' own decode frees it
    (None, None, None),     # no decode rate measured: before is not measured
])
def test_per_stage_gpu_hours_on_an_h200_node(node_cpus, decode, fed):
    """Each stage's before/after from the profile's own steps: refine's hours shrink by its actor
    count, the teachers' before by how far the node's CPUs could feed them, recover's before is not
    measured (one class per step was never run on a GPU), evaluate's is the grid's."""
    cfg = load_config("imagenet1k", overrides=["data.source=/data", "images.source=lpld"])
    profile = load_profile(H200)
    s = stage_gpu_hours(cfg, 1000, 1_281_167, profile, decode, node_cpus, STAGES)
    by = {r["stage"]: r for r in s["stages"]}
    assert list(by) == ["teachers", "select", "transfer", "refine", "recover", "evaluate"]
    teachers = by["teachers"]
    # 1.28 M images x 90 epochs at the profile's 5,023 images/s on each of 8 GPUs, the node held for it
    assert teachers["after_gpu_h"] == pytest.approx(1_281_167 * 90 / 5023.0 / 3600, rel=1e-6)
    if fed is None:
        assert teachers["before_gpu_h"] is None
    else:
        assert (teachers["before_gpu_h"] == pytest.approx(teachers["after_gpu_h"])) is fed
        if not fed:
            assert teachers["before_gpu_h"] == pytest.approx(8 * 1_281_167 * 90 / (decode * 16) / 3600)
    assert by["refine"]["before_gpu_h"] == pytest.approx(8 * by["refine"]["after_gpu_h"])
    assert by["recover"]["before_gpu_h"] is None and by["recover"]["after_gpu_h"] > 0
    assert by["select"]["before_gpu_h"] == by["select"]["after_gpu_h"]
    ev = evaluate_gpu_hours(cfg, 1000, profile)
    assert (by["evaluate"]["before_gpu_h"], by["evaluate"]["after_gpu_h"]) == (ev["before"]["gpu_h"], ev["after"]["gpu_h"])
    text = format_stage_hours(s)
    assert "n/m" in text and all(f"\n  {st:10s}" in text for st in by)
    assert stage_gpu_hours(cfg, 1000, 1_281_167, profile, decode, node_cpus, ("select",))["stages"][0]["stage"] == "select"
