"""Packaging: the wheel carries the presets and the console script, and works outside the checkout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hello_ray.config import PRESET_DIR, preset_names

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline from a copy of the checkout (the build writes build/ and *.egg-info
    into its source folder, which must not land in the working tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "hello_ray", src / "hello_ray",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    out = tmp / "dist"
    # An absolute path: a bare folder name would be taken for a package name on the index.
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (whl,) = out.glob("hello_ray-*.whl")
    return whl


def test_presets_are_found_inside_the_package():
    assert PRESET_DIR.parent == REPO / "hello_ray"
    assert {"demo", "smoke", "imagenet100", "imagenet1k"} <= set(preset_names())


def test_wheel_carries_every_preset_and_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    presets = {f"hello_ray/presets/{p.name}" for p in PRESET_DIR.glob("*.yaml")}
    assert presets and presets <= names, presets - names
    assert "hello_ray/preflight/devices.yaml" in names  # the cost model's accelerator table
    assert "hello-ray = hello_ray.cli:main" in entry_points
    assert not any(n.startswith(("jobs/", "tests/")) for n in names)


def test_unpacked_wheel_loads_every_preset_away_from_the_checkout(wheel, tmp_path):
    """The installed layout, with the checkout off the path: presets resolve inside the package,
    ``extends:`` chains included, and the package knows it is not a source checkout."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    code = (
        "import json\n"
        "from hello_ray import config, runtime\n"
        "rows = {n: config.load_config(n, overrides=['data.source=s3://b/x']).name\n"
        "        for n in config.preset_names()}\n"
        "print(json.dumps({'dir': str(config.PRESET_DIR), 'rows': rows,\n"
        "                  'root': str(runtime.source_root())}))\n"
    )
    # cwd outside the checkout and PYTHONPATH = only the unpacked wheel: the wheel's own files
    # are imported (the editable install's finder comes after sys.path).
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dir"] == str(site / "hello_ray" / "presets")
    assert out["rows"] == {n: n for n in preset_names()}
    assert out["root"] == "None"



def test_the_tests_import_the_checkout():
    from hello_ray.runtime import source_root

    assert source_root() == REPO


# ---------------------------------------------------------------------------------------------
# the console script


def test_help_lists_every_command_with_its_line(capsys):
    from hello_ray import cli

    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out.splitlines()
    for name, cmd in cli.COMMANDS.items():
        assert any(line.split()[:1] == [name] and line.strip().endswith(cmd.help) for line in out), name
    assert set(cli.COMMANDS) == {"distill", "sweep", "storage", "ls", "rm", "gc", "export",
                                 "labels-import", "labels-export", "preflight", "synth-data", "scores"}


def test_every_command_is_a_main_of_the_cli_package_and_old_names_still_import():
    """Each command's target is a function in ``hello_ray/cli/`` (the top layer; tests/test_imports.py
    checks nothing below imports it), and the names scripts used from ``hello_ray.pipeline`` are the
    very objects of their new homes."""
    import importlib

    from hello_ray import cli, pipeline, recipe, registry, runner
    from hello_ray.cli import distill

    for name, cmd in cli.COMMANDS.items():
        module, func = cmd.target.split(":")
        assert module.startswith("hello_ray.cli."), name
        assert callable(getattr(importlib.import_module(module), func)), name
    for name in ("main", "stage_job", "parse_args", "build_parser"):
        assert getattr(pipeline, name) is getattr(distill, name)
    assert pipeline.distill is recipe.distill and pipeline.Run is runner.Run and pipeline.STAGES is registry.STAGES


@pytest.mark.parametrize("argv, problem", [([], "no command given"), (["distil"], "unknown command 'distil'")])
def test_no_or_unknown_command_exits_2_with_the_usage(argv, problem, capsys):
    from hello_ray import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "commands:" in err and err.rstrip().endswith(f"hello-ray: error: {problem}")


# ---------------------------------------------------------------------------------------------
# runtime: progress output, worker env, logging


@pytest.fixture
def data_context(monkeypatch):
    """The driver's DataContext with bars on and no user choice in the env (all restored after)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    for name in ("RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_COLOR_PREFIX", "RAY_DATA_LOG_LEVEL"):
        monkeypatch.setenv(name, "")  # recorded first, so what the code under test sets is undone
        monkeypatch.delenv(name)
    return ctx


def test_progress_bars_stay_on_a_terminal(data_context):
    from hello_ray.runtime import configure_progress

    assert configure_progress(interactive=True) == {"RAY_DATA_LOG_LEVEL": "WARNING"}  # no INFO chatter
    assert data_context.enable_progress_bars is True
    assert "RAY_COLOR_PREFIX" not in os.environ


def test_progress_bars_and_colours_go_off_a_terminal_here_and_in_workers(data_context):
    from hello_ray.runtime import configure_progress

    assert configure_progress(interactive=False) == {"RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                                                     "RAY_DATA_LOG_LEVEL": "WARNING"}
    assert data_context.enable_progress_bars is False
    assert os.environ["RAY_COLOR_PREFIX"] == "0"


def test_a_users_settings_are_kept(data_context, monkeypatch):
    from hello_ray.runtime import configure_progress

    monkeypatch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "INFO")
    assert configure_progress(interactive=False) == {"RAY_DATA_LOG_LEVEL": "INFO"}
    assert data_context.enable_progress_bars is True
    assert os.environ["RAY_COLOR_PREFIX"] == "1"


def test_installed_ray_reads_the_progress_variable(tmp_path):
    """The variable configure_progress hands to workers is the one this Ray's DataContext reads."""
    code = "import ray.data; print(ray.data.DataContext.get_current().enable_progress_bars)"
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_installed_ray_prints_worker_lines_without_colour_when_told(monkeypatch):
    """The driver-side switch configure_progress sets is the one this Ray's log printer reads."""
    import io

    from ray._private.worker import print_worker_logs  # the printer of forwarded worker lines

    line = {"pid": 123, "ip": "10.0.0.1", "localhost": "10.0.0.1", "lines": ["epoch 1"],
            "actor_name": "RayTrainWorker", "task_name": ""}
    printed = {}
    for value in ("1", "0"):
        monkeypatch.setenv("RAY_COLOR_PREFIX", value)
        buf = io.StringIO()
        print_worker_logs(line, buf)
        printed[value] = buf.getvalue()
    assert "\x1b[" in printed["1"]
    assert printed["0"] == "(RayTrainWorker pid=123) epoch 1\n"


@pytest.mark.parametrize("interactive, local, keys", [
    (True, True, {"PYTHONPATH", "RAY_DATA_LOG_LEVEL"}),                # a laptop: checkout only
    (False, True, {"PYTHONPATH", "RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_DATA_LOG_LEVEL"}),  # into a file
    (False, False, {"RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_DATA_LOG_LEVEL"}),  # job submit: Ray sets the path
    (True, False, {"RAY_DATA_LOG_LEVEL"}),
])
def test_worker_env(interactive, local, keys, data_context):
    from hello_ray.runtime import worker_env

    env = worker_env(interactive, local)
    assert set(env) == keys
    if "PYTHONPATH" in env:
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)


def test_setup_logging_shows_hello_ray_info_one_line_each(tmp_path):
    code = (
        "import logging\n"
        "from hello_ray.runtime import setup_logging\n"
        "setup_logging(); setup_logging()\n"
        "logging.getLogger('hello_ray.select').info('done in 1.0 s')\n"
        "logging.getLogger('botocore.credentials').info('noise')\n"
        "logging.getLogger('hello_ray.labels').debug('detail')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].endswith(" hello_ray.select done in 1.0 s"), lines


# ---------------------------------------------------------------------------------------------
# the README's set-up commands, as .ci/run reads them


def _readme_block(heading: str) -> str:
    """The block .ci/run runs for ``heading``, extracted by .ci/run's own function."""
    script = f'eval "$(sed -n \'/^readme_block()/,/^}}/p\' .ci/run)"; readme_block {heading}'
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_readme_blocks_install_then_test_without_the_demo():
    install, test = _readme_block("Install"), _readme_block("Test")
    assert install.startswith("pip install") and '-e ".[test]"' in install
    # The Test block stands alone on a fresh machine (its own install) and runs the suite;
    # CI runs Install then Test, so neither may start the 10-minute demo.
    assert test.startswith('pip install -q -e ".[test]" && ') and test.endswith("python -m pytest -q")
    assert "jobs/distill.py" not in install + test
