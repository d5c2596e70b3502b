"""Every command the README and the ``jobs/*.py`` docstrings show, and what the tests do with it.

A documented command is either run by ``tests/test_pipeline.py::test_every_documented_command_runs``
(smoke-sized: the demo presets become ``--preset smoke``, the store is the test's), covered by a named
test that runs the same thing, or excepted with the reason (a real ImageNet in a user's bucket, a
cluster's Jobs API, the install and test commands CI itself runs). ``tests/test_documented_commands.py``
checks that every command found is one of the three, so a new line in the docs needs a decision here.
"""
from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ("python ", "hello-ray ", "ray job submit ", "pip ")

# What a run needs beyond the smoke preset, by command (whitespace-normalised as documented).
EXTRA_OVERRIDES: dict[str, list[str]] = {}

# Commands another test runs as they are (or through the same function): (pattern, test id).
COVERED: list[tuple[str, str]] = [
    (r"^pip wheel --no-deps -w dist \.$", "tests/test_packaging.py::test_wheel_carries_every_preset_and_the_console_script"),
    (r"^python jobs/sweep\.py --preset smoke$", "tests/test_pipeline.py::test_sweep_runs_its_grid_on_tune"),
    (r"^python jobs/distill\.py --preset smoke --store s3://bucket/runs$",
     "tests/test_pipeline.py::test_ray_job_submit_to_local_head_with_s3_store"),
    # the frontier preset's strategies, protocol, controls and scores at smoke size (frontier-smoke)
    (r"^python jobs/distill\.py --preset frontier(-smoke)?$", "tests/test_pipeline.py::test_smoke_runs_top_k_phases_and_fair_scores"),
    (r"^hello-ray scores ", "tests/test_pipeline.py::test_smoke_runs_top_k_phases_and_fair_scores"),
    (r"^hello-ray storage --classes 1000 --ipc 10$",
     "tests/test_light_labels.py::test_storage_prints_top_k_rows_beside_lpqlds_published_sizes"),
]

# Commands no test here can run, and why (first match wins).
EXCEPTED: list[tuple[str, str]] = [
    (r"^ray job submit ", "submits to a running cluster's Jobs API (one local submission runs in "
                          "tests/test_pipeline.py::test_ray_job_submit_to_local_head_with_s3_store)"),
    (r"s3://(my-bucket|MY-BUCKET|bucket/imagenet|\.\.\.)|--cluster ", "needs a real ImageNet in a user's bucket or "
                                                                     "a cloud cluster (preflight rehearses these "
                                                                     "shapes in tests/test_preflight.py)"),
    (r"^pip install", "the install itself: CI's first step runs it from a fresh clone"),
    (r"pytest", "the test command: CI runs it (the opt-in sets are documented beside it)"),
]


@dataclass(frozen=True)
class Documented:
    where: str      # README.md or jobs/<name>.py
    command: str    # one command, continuation lines joined, comment dropped

    def decision(self) -> tuple[str, str]:
        """("run", "") | ("covered", test id) | ("excepted", reason)."""
        for pattern, test in COVERED:
            if re.search(pattern, self.command):
                return "covered", test
        for pattern, reason in EXCEPTED:
            if re.search(pattern, self.command):
                return "excepted", reason
        return "run", ""


def _commands_in(lines: list[str]) -> list[str]:
    """Commands in ``lines``: continuation backslashes joined, ``#`` comments and ``&&`` chains split."""
    out, cur = [], ""
    for raw in lines:
        line = raw.strip()
        cur = f"{cur} {line}".strip() if cur else line
        if cur.endswith("\\"):
            cur = cur[:-1].rstrip()
            continue
        text, cur = cur, ""
        text = re.sub(r"\s+#.*$", "", text)
        for part in text.split("&&"):
            part = " ".join(part.split())
            if part.startswith(PROGRAMS) or re.match(r"^[A-Z_]+=\S+ python ", part):
                out.append(part)
    return out


def readme_commands(path: Path = REPO / "README.md") -> list[Documented]:
    text = path.read_text()
    found: list[str] = []
    in_block, block = False, []
    prose = []
    for line in text.splitlines():
        if line.startswith("```"):
            if in_block:
                found += _commands_in(block)
            in_block, block = not in_block, []
            continue
        (block if in_block else prose).append(line)
    # In prose, a span counts when it carries an option or an override: `hello-ray export` alone
    # names a command, `hello-ray distill --preset smoke --store /some/folder` shows one.
    for span in re.findall(r"`([^`\n]+)`", "\n".join(prose)):
        found += [c for c in _commands_in([span]) if re.search(r"\s(-\S|\S+=)", c)]
    return [Documented(path.name, c) for c in dict.fromkeys(found)]


def job_commands() -> list[Documented]:
    out = []
    for job in sorted((REPO / "jobs").glob("*.py")):
        doc = ast.get_docstring(ast.parse(job.read_text())) or ""
        for c in dict.fromkeys(_commands_in(doc.splitlines())):
            out.append(Documented(f"jobs/{job.name}", c))
    return out


def documented() -> list[Documented]:
    return readme_commands() + job_commands()


def smoke_argv(command: str, store: str, python: str, hello_ray: str) -> list[str]:
    """``command`` as the test runs it: the demo presets at smoke size, the test's store."""
    words = shlex.split(command)
    program = {"python": [python], "hello-ray": [hello_ray]}[words[0]]
    args = words[1:]
    out, i, has_preset = [], 0, False
    while i < len(args):
        a = args[i]
        if a == "--preset":
            out += ["--preset", "smoke" if args[i + 1] in ("demo", "demo-long") else args[i + 1]]
            has_preset, i = True, i + 2
            continue
        if a == "--store":            # the documented store (a bucket of the user's) becomes the test's
            i += 2
            continue
        out.append(a)
        i += 1
    if any(a.startswith("--help") for a in out):
        return program + out
    lead = [out[0]] if program == [python] else ([out[0]] if out and not out[0].startswith("-") else [])
    rest = out[len(lead):]
    preset = [] if has_preset else ["--preset", "smoke"]
    return program + lead + preset + rest + EXTRA_OVERRIDES.get(command, []) + [f"store={store}"]
