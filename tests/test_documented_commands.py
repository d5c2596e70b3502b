"""Every command the README and the jobs' docstrings show is run by a test, covered by a named one,
or excepted with its reason (tests/documented.py); the runs themselves are
``tests/test_pipeline.py::test_every_documented_command_runs``."""
from __future__ import annotations

import re

import pytest

from documented import REPO, Documented, documented, smoke_argv


def test_every_documented_command_is_run_covered_or_excepted_with_a_reason():
    found = documented()
    decided = {(d.where, d.command): d.decision() for d in found}
    assert len(decided) >= 30 and {w for w, _ in decided} >= {"README.md", "jobs/distill.py", "jobs/train_teachers.py"}
    runs = {c for (w, c), (kind, _) in decided.items() if kind == "run"}
    # The demo, every stage job's own line, and the README's overrides are run, not excepted.
    assert "python jobs/distill.py" in runs and "python jobs/distill.py --help-config" in runs
    for job in ("train_teachers", "select_patches", "recover", "external", "transfer", "refine", "evaluate"):
        assert any(c.startswith(f"python jobs/{job}.py") for c in runs), job
    for (where, command), (kind, why) in decided.items():
        if kind == "covered":   # the named test exists and runs this job or tool
            path, name = why.split("::")
            text = (REPO / path).read_text()
            assert re.search(rf"^def {name}\(", text, re.M), why
        elif kind == "excepted":
            assert why, (where, command)


@pytest.mark.parametrize("lines,want", [
    (["python jobs/a.py   # comment"], ["python jobs/a.py"]),
    (["python jobs/a.py x=1 \\", "    y=2"], ["python jobs/a.py x=1 y=2"]),
    (['pip install -q -e ".[test]" && python jobs/distill.py'], ['pip install -q -e ".[test]"', "python jobs/distill.py"]),
    (["Ray puts the working dir on the path itself."], []),
])
def test_commands_are_read_as_a_shell_reads_them(lines, want):
    from documented import _commands_in

    assert _commands_in(lines) == want


@pytest.mark.parametrize("command,want", [
    ("python jobs/distill.py", ["PY", "jobs/distill.py", "--preset", "smoke", "store=S"]),
    ("python jobs/distill.py --preset demo-long", ["PY", "jobs/distill.py", "--preset", "smoke", "store=S"]),
    ("python jobs/train_teachers.py --preset smoke --store s3://bucket/runs",
     ["PY", "jobs/train_teachers.py", "--preset", "smoke", "store=S"]),
    ("python jobs/evaluate.py evaluate.seeds=[0]", ["PY", "jobs/evaluate.py", "--preset", "smoke", "evaluate.seeds=[0]",
                                                    "store=S"]),
    ("hello-ray distill --preset smoke --store /some/folder", ["HR", "distill", "--preset", "smoke", "store=S"]),
    ("hello-ray --help", ["HR", "--help"]),
    ("python jobs/distill.py --help-config", ["PY", "jobs/distill.py", "--help-config"]),
])
def test_smoke_argv_swaps_the_demo_presets_and_the_store(command, want):
    assert smoke_argv(command, "S", "PY", "HR") == want
    assert Documented("x", command).decision()[0] == "run"
