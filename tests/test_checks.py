"""Every rule decidable from the config fails before any compute, naming its key, writing nothing.

One row per rule: the overrides that break it and the key the message must name. The run is
``pipeline.main`` exactly as ``python jobs/distill.py`` calls it, with the store in a fresh
folder that must still not exist afterwards.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hello_ray import pipeline
from hello_ray.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent

RULES = [
    # (overrides on the smoke preset, the key the error must name)
    (["data.image_size=30", "select.factor=4"], "select.factor"),             # patches must tile the image
    (["transfer.lr=-1"], "transfer.lr"),
    (["transfer.lr=.nan"], "transfer.lr"),                                     # inf/NaN never pass coercion
    (["teachers.lr=0"], "teachers.lr"),
    (["refine.lr=.inf"], "refine.lr"),
    (["evaluate.lr={resnet18: 0}"], "evaluate.lr.resnet18"),
    (["evaluate.strategies=[]"], "evaluate.strategies"),
    (["evaluate.temperature=0"], "evaluate.temperature"),
    (["evaluate.cutmix_alpha=-1"], "evaluate.cutmix_alpha"),
    (["transfer.teacher_window=1-99"], "transfer.teacher_window"),             # past the trajectory
    (["teachers.observer=epoch:99"], "teachers.observer"),
    (["compute.num_workers=4", "teachers.batch_size=3"], "teachers.batch_size"),   # fewer images than workers
    (["compute.num_workers=4", "transfer.batch_size=2"], "transfer.batch_size"),
    (["compute.num_workers=4", "evaluate.parallel=ddp", "evaluate.batch_size=3"], "evaluate.batch_size"),
    (["refine.factor=24"], "refine.factor"),                                   # a one-pixel low-pass
    (["data.class_names=[a, b]", "evaluate.continual_steps=[5]"], "evaluate.continual_steps"),
    (["select.nonsense=1"], "select.nonsense"),
    (["images.source=dalle"], "images.source"),
    (["images.source=lpld", "recover.jitter=24"], "recover.jitter"),                # a whole-side shift
    (["images.source=sre2l", "teachers.model=vgg11"], "teachers.model"),           # no BatchNorm to match
    (["images.source=sre2l", "recover.classes_per_step=2"], "recover.classes_per_step"),  # lpld's packing
]


@pytest.mark.parametrize("overrides,key", RULES, ids=[k for _, k in RULES])
def test_config_rule_fails_before_compute(overrides, key, tmp_path, capsys):
    store = tmp_path / "store"
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main(["--preset", "smoke", "--store", str(store), *overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"'{key}'" in err, err
    assert not store.exists()  # nothing written, not even the store's folder


def test_every_stage_is_checked_and_valid_presets_pass():
    """The pipeline runs every stage's check; the shipped presets pass all of them."""
    assert [s.STAGE for s in pipeline.STAGES] == ["teachers", "select", "recover", "external", "transfer", "refine",
                                                  "evaluate"]
    for s in pipeline.STAGES:
        assert callable(s.check) and callable(s.resources) and callable(s.run) and callable(s.stage_config)
        assert isinstance(s.INPUTS, tuple)
    for preset in ("smoke", "demo"):
        pipeline.check(load_config(preset))
    pipeline.check(load_config("imagenet1k", overrides=["data.source=/data/imagenet"]))
    # refine's rule only applies when refine runs
    pipeline.check(load_config("smoke", overrides=["refine.enabled=false", "refine.factor=24"]))
    # images.source picks the image stage: select for rded, recover for sre2l / lpld; their rules follow
    lpld = load_config("smoke", overrides=["images.source=lpld"])
    assert [s.STAGE for s in pipeline.active_stages(lpld)] == ["teachers", "recover", "transfer", "refine", "evaluate"]
    ext = load_config("smoke", overrides=["images.source=external", "images.path=/syn"])
    assert [s.STAGE for s in pipeline.active_stages(ext)] == ["teachers", "external", "transfer", "refine", "evaluate"]
    with pytest.raises(ConfigError, match="'images.path'"):
        load_config("smoke", overrides=["images.source=external"])
    pipeline.check(load_config("smoke", overrides=["recover.jitter=24"]))
    pipeline.check(load_config("smoke", overrides=["images.source=lpld", "data.image_size=30", "select.factor=4"]))


def test_stage_inputs_are_the_declared_roles(tmp_path):
    from hello_ray.stages import select

    cfg = load_config("smoke", overrides=[f"store={tmp_path / 'store'}"])
    with pytest.raises(ValueError, match=r"takes the inputs \['teachers'\]"):
        pipeline.run_stage(select, cfg, pipeline.open_run_store(cfg), {})


def test_a_stage_the_local_ray_cannot_hold_is_refused_before_the_store(ray_local, tmp_path):
    """4 half-CPU Train workers + a data task on the 2-CPU local Ray: would wait forever."""
    cfg = load_config("smoke", overrides=[f"store={tmp_path / 'store'}", "compute.num_workers=4"])
    with pytest.raises(ConfigError, match=r"stage 'teachers' asks for 2.5 CPU"):
        pipeline.Run.start(cfg)
    assert not (tmp_path / "store").exists()
    big_pool = load_config("smoke", overrides=[f"store={tmp_path / 'store'}", "select.num_actors=4"])
    with pytest.raises(ConfigError, match=r"stage 'select' asks for 2.5 CPU"):
        pipeline.Run.start(big_pool)


def test_the_job_script_exits_2_naming_the_key(tmp_path):
    """As a user runs it: a separate process, a non-zero exit, the key on stderr, no store."""
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "distill.py"), "--preset", "smoke",
                           "--store", str(store), "data.image_size=30", "select.factor=4"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "'select.factor'" in proc.stderr and "divisible" in proc.stderr
    assert not store.exists()
