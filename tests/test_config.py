"""Config: presets load, overrides are typed, bad keys and values fail naming the key."""
from __future__ import annotations

import re

import pytest

from hello_ray.config import PRESET_DIR, ConfigError, describe, load_config, parse_window
from hello_ray.pipeline import parse_args

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
NEEDS_SOURCE = {"imagenet1k", "imagenet100"}


def test_every_preset_is_known():
    assert {"smoke", "demo", "imagenet100", "imagenet1k"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads(preset):
    overrides = ["data.source=s3://bucket/imagenet"] if preset in NEEDS_SOURCE else []
    cfg = load_config(preset, overrides=overrides)
    assert cfg.name == preset
    lo, hi = parse_window(cfg.transfer.teacher_window)
    assert hi <= cfg.teachers.epochs


def test_published_settings():
    cfg = load_config("imagenet1k", overrides=["data.source=s3://b/x"])
    t, s, tr, ev = cfg.teachers, cfg.select, cfg.transfer, cfg.evaluate
    assert (t.epochs, t.lr, t.momentum, t.weight_decay, t.lr_step, t.batch_size) == (90, 0.1, 0.9, 1e-4, 30, 256)
    assert (s.mipc, s.num_crop, s.factor) == (300, 5, 2)
    assert (tr.clip_model, tr.pretrained, tr.conv_rank, tr.head_rank) == ("RN50", "openai", 8, 128)
    assert (tr.lr, tr.epochs, tr.ce_weight, tr.n_teachers) == (5e-4, 20, 0.1, 9)
    assert (ev.epochs, ev.batch_size, ev.ce_weight, ev.cutmix_alpha) == (300, 100, 0.025, 1.0)
    assert load_config("imagenet100", overrides=["data.source=s3://b/x"]).transfer.head_rank == 64
    assert (t.precision, load_config("demo").teachers.precision) == ("bf16", "fp32")  # GPUs only


def test_demo_presets_follow_rdeds_low_resolution_protocol():
    """RDED's CIFAR-10 script (LINs-lab/RDED @ 3f6453d scripts/cifar10_10ipc_conv3_to_conv3_cr5.sh): conv3
    observer and student, factor 1, 5 crops, mipc 300, ipc 10, 300 student epochs (demo-long)."""
    demo, smoke, long = (load_config(p) for p in ("demo", "smoke", "demo-long"))
    assert (demo.teachers.model, demo.evaluate.students) == ("conv3", ["conv3"])
    assert (demo.select.factor, demo.select.num_crop, demo.select.mipc, demo.select.ipc) == (1, 5, 300, 10)
    assert (smoke.teachers.model, smoke.evaluate.students) == ("conv3", ["conv3"])
    assert long.evaluate.epochs == 300 and long.evaluate.lr["conv3"] == 1e-3   # RDED's argument.py rate
    # demo-long differs from the demo in evaluate alone, so it reuses every earlier artifact of a demo run
    for section in ("data", "teachers", "select", "images", "transfer", "refine"):
        assert getattr(long, section) == getattr(demo, section), section
    assert set(demo.evaluate.strategies) <= set(long.evaluate.strategies)
    assert set(demo.evaluate.floor_strategies) <= set(long.evaluate.floor_strategies)


@pytest.mark.parametrize("overrides, value", [
    (["select.ipc=50"], ("select", "ipc", 50)),
    (["transfer.lr=1e-3"], ("transfer", "lr", 1e-3)),
    (["evaluate.seeds=[0, 1]"], ("evaluate", "seeds", [0, 1])),
    (["name=1.0"], (None, "name", "1.0")),
    (["compute.use_gpu=false"], ("compute", "use_gpu", False)),
    (["store=/mnt/nfs/run", "store_shared=true"], (None, "store_shared", True)),
    (["evaluate.lr.vgg11=0.002"], ("evaluate", "lr", None)),
    (["data.class_names=[cat, dog]"], ("data", "class_names", ["cat", "dog"])),
    (['data.class_names={"n02": "dog", "n01": "cat/kitten"}'],
     ("data", "class_names", {"n02": "dog", "n01": "cat/kitten"})),   # JSON: a mapping folder -> name
    (["data.class_names={0: tench, 1: goldfish}"], ("data", "class_names", {"0": "tench", "1": "goldfish"})),
])
def test_overrides_are_typed(overrides, value):
    cfg = load_config("smoke", overrides=overrides)
    section, key, expected = value
    obj = getattr(cfg, section) if section else cfg
    if expected is None:  # a table entry changes, the rest of the table stays
        assert obj.lr["vgg11"] == 0.002 and obj.lr["resnet18"] == 1e-3
    else:
        assert getattr(obj, key) == expected


@pytest.mark.parametrize("overrides, message", [
    (["select.ipcc=3"], "unknown config key 'select.ipcc'"),
    (["nosuch=1"], "unknown config key 'nosuch'"),
    (["select.ipc=ten"], "'select.ipc': expected an integer"),
    (["select.ipc=0"], "'select.ipc': must be >= 1"),
    (["compute.use_gpu=maybe"], "'compute.use_gpu': expected true/false"),
    (["transfer.teacher_window=1-30"], "ends after the last teacher epoch"),
    (["transfer.teacher_window=late"], "is not a window"),
    (["transfer.teacher_window=2-3"], "spans 2 epochs, fewer than the 3 distinct teachers"),
    (["sweep.windows=[1-3, 3-3]"], "'sweep.windows': window 3-3 spans 1 epochs"),
    (["evaluate.strategies=[soft]"], "unknown label strategy 'soft'"),
    (["evaluate.strategies=[hard/10]"], "only stored/N"),
    (["evaluate.lr.shufflenet_v2_x0_5=0"], "a zero rate trains nothing"),
    (["evaluate.students=[resnet50]"], "no learning rate for student 'resnet50'"),
    (["select"], "is not key=value"),
    (["select=3"], "is a section"),
    (["data.class_names=cat"], "'data.class_names': expected a list or a mapping, got 'cat'"),
    (["data.class_names=[cat, [dog]]"], "'data.class_names[1]': expected a string"),
    (["data.class_names={n01: 3}"], "'data.class_names.n01': expected a string"),
    (["data.class_names={n01: ' '}"], "'data.class_names': the name of 'n01' is empty"),
    (["teachers.precision=fp16"], "'teachers.precision': must be 'fp32' or 'bf16'"),
    (["data.train_crop=centre"], "'data.train_crop': must be one of whole, centre_square"),
    (["store_shared=sometimes"], "'store_shared': expected true/false"),
    (["store=s3://b/run", "store_shared=true"], "'store_shared': declares a local store shared"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("smoke", overrides=overrides)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="smoke"):
        load_config("nosuch")


def test_imagenet_without_source_fails_before_compute():
    with pytest.raises(ConfigError, match="data.source"):
        load_config("imagenet1k")


def test_yaml_file_layers_over_preset(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("select:\n  ipc: 7\nevaluate:\n  seeds: [3]\n")
    cfg = load_config("smoke", str(f), ["select.mipc=11"])
    assert (cfg.select.ipc, cfg.select.mipc, cfg.evaluate.seeds) == (7, 11, [3])
    f.write_text("select:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=f"select.bogus' \\(from {f}"):
        load_config("smoke", str(f))


def test_command_line(capsys):
    cfg = parse_args(["--preset", "smoke", "--store", "s3://b/p", "select.ipc=4"])
    assert (cfg.store, cfg.select.ipc) == ("s3://b/p", 4)
    with pytest.raises(SystemExit) as e:
        parse_args(["--preset", "smoke", "select.nope=1"])
    assert e.value.code == 2
    assert "select.nope" in capsys.readouterr().err


def test_every_key_has_help():
    rows = describe()
    assert len(rows) > 50
    assert all(text for _, _, text in rows), [k for k, _, t in rows if not t]


def test_preset_given_as_a_path_extends_a_bundled_one(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("extends: smoke\nname: mine\nselect:\n  ipc: 3\n")
    cfg = load_config(str(f))
    smoke = load_config("smoke")
    assert (cfg.name, cfg.select.ipc) == ("mine", 3)
    assert cfg.data.max_per_class == smoke.data.max_per_class  # from smoke, which extends demo
    assert cfg.data.source == "demo"


def test_missing_preset_file_names_the_path_and_the_bundled_presets(tmp_path):
    missing = tmp_path / "jobs" / "configs" / "smoke.yaml"
    with pytest.raises(ConfigError, match=f"preset file {missing} not found.*smoke"):
        load_config(str(missing))


def test_class_names_mapping_from_a_yaml_file(tmp_path):
    """A YAML mapping replaces the whole setting (no per-key merge with a preset's list or mapping)."""
    f = tmp_path / "names.yaml"
    f.write_text("data:\n  class_names:\n    n01440764: tench\n    n01443537: goldfish/carp\n")
    cfg = load_config("smoke", config_file=str(f), overrides=['data.class_names={"b": "B"}'])
    assert cfg.data.class_names == {"b": "B"}
    assert load_config("smoke", config_file=str(f)).data.class_names == {"n01440764": "tench",
                                                                         "n01443537": "goldfish/carp"}

# Every numeric key: a value just outside its range, and the words the message must hold. A new
# numeric key without a row fails test_every_numeric_key_has_a_range_rule.
OUT_OF_RANGE = {
    "data.image_size": ("7", "[8, 1024]"), "data.max_per_class": ("-1", ">= 0"),
    "data.cpus_per_task": ("0", "> 0"),
    "compute.num_workers": ("0", ">= 1"), "compute.cpus_per_worker": ("0", "> 0"),
    "compute.max_failures": ("-1", ">= 0"),
    "teachers.epochs": ("0", ">= 1"), "teachers.batch_size": ("0", ">= 1"), "teachers.lr": ("0", "> 0"),
    "teachers.momentum": ("1.0", "[0, 1)"), "teachers.weight_decay": ("-0.1", ">= 0"),
    "teachers.lr_step": ("0", ">= 1"), "teachers.lr_gamma": ("1.5", "(0, 1]"),
    "teachers.seed": ("-1", "[0, 2**32)"),
    "select.ipc": ("0", ">= 1"), "select.factor": ("0", ">= 1"), "select.mipc": ("0", ">= 1"),
    "select.num_crop": ("0", ">= 1"), "select.max_side": ("7", ">= 8"), "select.batch_size": ("0", ">= 1"),
    "select.num_actors": ("0", ">= 1"), "select.actor_cpus": ("0", "> 0"), "select.seed": ("4294967296", "2**32"),
    "transfer.conv_rank": ("0", ">= 1"), "transfer.head_rank": ("0", ">= 1"),
    "transfer.lora_alpha_ratio": ("0", "> 0"), "transfer.n_teachers": ("0", ">= 1"),
    "transfer.epochs": ("0", ">= 1"), "transfer.batch_size": ("0", ">= 1"), "transfer.lr": ("-1", "> 0"),
    "transfer.weight_decay": ("-1", ">= 0"), "transfer.ce_weight": ("-1", ">= 0"), "transfer.seed": ("-5", "2**32"),
    "refine.steps": ("0", ">= 1"), "refine.lr": ("0", "> 0"), "refine.factor": ("0", ">= 1"),
    "refine.batch_size": ("0", ">= 1"), "refine.num_actors": ("0", ">= 1"), "refine.actor_cpus": ("0", "> 0"),
    "evaluate.epochs": ("0", ">= 1"), "evaluate.loss_check_every": ("0", ">= 1"), "evaluate.gpus_per_row": ("1.5", "in [0, 1]"), "evaluate.batch_size": ("0", ">= 1"),
    "evaluate.lr": ("{resnet18: -1}", "> 0"), "evaluate.weight_decay": ("-1", ">= 0"),
    "evaluate.cutmix_alpha": ("-1", ">= 0"), "evaluate.ce_weight": ("-1", ">= 0"),
    "evaluate.temperature": ("0", "> 0"), "evaluate.student_temperature": ("-1", ">= 0"),
    "evaluate.label_smoothing": ("1", "[0, 1)"), "evaluate.full_top1": ("1.5", "[0, 1]"),
    "evaluate.score_weight": ("2", "[0, 1]"), "evaluate.seeds": ("[0, -1]", "2**32"),
    "evaluate.continual_steps": ("[1]", ">= 2"),
    "sweep.conv_ranks": ("[0]", ">= 1"), "sweep.head_rank_per_conv_rank": ("0", ">= 1"),
    "sweep.n_teachers": ("-1", ">= 0"), "sweep.max_concurrent": ("0", ">= 1"),
    "compute.lease_ttl_s": ("0.5", ">= 1"), "s3_timeout": ("0", "> 0"), "s3_max_attempts": ("0", ">= 1"),
    "recover.iterations": ("0", ">= 1"), "recover.lr": ("0", "> 0"), "recover.r_bn": ("-1", ">= 0"),
    "recover.first_bn_multiplier": ("-1", ">= 0"), "recover.jitter": ("-1", ">= 0"),
    "recover.batch_size": ("0", ">= 1"), "recover.seed": ("-1", "2**32"), "recover.num_actors": ("0", ">= 1"),
    "recover.actor_cpus": ("0", "> 0"), "recover.stats_batch_size": ("0", ">= 1"),
    "recover.classes_per_step": ("0", ">= 1"),
    "images.read_threads": ("0", ">= 1"),
}


def _numeric_keys() -> dict[str, str]:
    """dotted key -> 'int' | 'float' for every key whose values are numbers (also in lists/tables)."""
    import dataclasses
    import typing

    from hello_ray.config import Config

    out: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        for name, tp in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{name}.")
                continue
            inner = typing.get_args(tp)[-1] if typing.get_origin(tp) in (list, dict) else tp
            if inner in (int, float):
                out[f"{prefix}{name}"] = inner.__name__
    walk(Config, "")
    return out


def test_every_numeric_key_has_a_range_rule():
    assert set(OUT_OF_RANGE) == set(_numeric_keys())


# The defaults without a preset: no YAML to parse, so the ~200 loads below take a fraction of a second.
@pytest.mark.parametrize("key", sorted(OUT_OF_RANGE))
def test_numeric_keys_refuse_values_out_of_range(key):
    value, words = OUT_OF_RANGE[key]
    with pytest.raises(ConfigError, match=f"config key '{key}[.\\[\\w\\]]*': .*{re.escape(words)}"):
        load_config(None, overrides=[f"{key}={value}", "data.source=/data"])


_LISTS = {"evaluate.seeds", "evaluate.continual_steps", "sweep.conv_ranks"}


@pytest.mark.parametrize("key", sorted(_numeric_keys()))
def test_numeric_keys_refuse_inf_and_nan(key):
    kind = _numeric_keys()[key]
    for bad in (".inf", "-.inf", ".nan"):
        value = {"evaluate.lr": f"{{resnet18: {bad}}}"}.get(key, f"[{bad}]" if key in _LISTS else bad)
        with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}[^']*': expected "
                           + ("an integer" if kind == "int" else "a finite number")):
            load_config(None, overrides=[f"{key}={value}"])
