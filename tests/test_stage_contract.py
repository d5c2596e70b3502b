"""The stage contract (hello_ray/stages/__init__.py) and the small shared readers the runner and the
preflight rely on: a stage module lacking a declaration is named at import of the registry, an
optional one reads its default, every registered stage has a plan with what the preflight calls."""
from __future__ import annotations

import types

import pytest

from hello_ray import registry
from hello_ray.data.errors import CorruptImageError, DataError, exception_chain, find_data_error
from hello_ray.stages import OPTIONAL, declared, validate
from hello_ray.store import artifact_key, key_stage


def _stage(**attrs) -> types.ModuleType:
    m = types.ModuleType("hello_ray.stages.fake")
    base = {"STAGE": "fake", "KIND": "train", "INPUTS": (), "stage_config": id, "check": id,
            "resources": id, "run": id}
    for k, v in {**base, **attrs}.items():
        if v is not None:
            setattr(m, k, v)
    return m


@pytest.mark.parametrize("attrs,error", [
    ({}, None),
    ({"run": None}, r"lacks \['run'\]"),
    ({"KIND": "batch"}, r"KIND='batch'; one of \('train', 'actors', 'driver'\)"),
    ({"KIND": "actors"}, r"must declare pool\(cfg\) and pool_reads_data\(cfg\)"),
    ({"KIND": "actors", "pool": id, "pool_reads_data": id}, None),
])
def test_a_stage_lacking_a_declaration_is_named(attrs, error):
    stage = _stage(**attrs)
    if error is None:
        validate(stage)
    else:
        with pytest.raises(TypeError, match=error):
            validate(stage)


def test_optional_declarations_read_their_defaults():
    stage = _stage(DATA_SPLITS=("train",))
    assert declared(stage, "DATA_SPLITS") == ("train",)
    assert {name: declared(stage, name) for name in OPTIONAL if name != "DATA_SPLITS"} == \
        {name: default for name, default in OPTIONAL.items() if name != "DATA_SPLITS"}
    with pytest.raises(KeyError, match="not an optional stage declaration"):
        declared(stage, "STAGE")


def test_every_registered_stage_has_a_plan_the_preflight_can_call():
    for stage in registry.STAGES:
        validate(stage)
        plan = registry.plan(stage)
        assert callable(plan.rehearse) and callable(plan.work), stage.STAGE
    assert registry.by_name("select").STAGE == "select"
    with pytest.raises(KeyError, match="no stage 'nope'"):
        registry.by_name("nope")


@pytest.mark.parametrize("stage", ["teachers", "frontier-smoke", "stored_labels", "a.b"])
def test_key_stage_reads_back_the_stage_of_a_key(stage):
    assert key_stage(artifact_key(stage, {"x": 1})) == stage


def test_the_exception_chain_walks_wrappers_causes_and_contexts_once():
    leaf = CorruptImageError("img.png", "truncated")
    wrapped = RuntimeError("ray task failed")
    wrapped.cause = leaf                      # a Ray error's ``cause``
    outer = ValueError("outer")
    outer.__cause__ = wrapped
    outer.__context__ = outer.__cause__       # the same error twice: visited once
    chain = list(exception_chain(outer))
    assert chain == [outer, wrapped, leaf]
    assert find_data_error(outer) is leaf and isinstance(find_data_error(outer), DataError)
    assert find_data_error(ValueError("nothing here")) is None
