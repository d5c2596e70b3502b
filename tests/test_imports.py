"""The package's import graph against the layer order of docs/ARCHITECTURE.md ("Import order"):
built from the source (ast), every `hello_ray` import, at module level or inside a function."""
from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "hello_ray"


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The known module an imported name lives in (``hello_ray.stages.teachers`` for
    ``from hello_ray.stages import teachers``; ``hello_ray.x`` for ``hello_ray.x.f``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def graph(known: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                if n.split(".")[0] == "hello_ray":
                    target = resolve(n, known)
                    if target and target != mod:
                        edges[mod].add(target)
    return edges


def layers() -> list[tuple[str, list[str]]]:
    """[(layer name, patterns)] in order, lowest first, from ARCHITECTURE.md."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## Import order", 1)[1].split("\n## ", 1)[0]
    out = []
    for m in re.finditer(r"^\d+\. ([^:]+): (.+)$", section, re.M):
        out.append((m.group(1), re.findall(r"`([^`]+)`", m.group(2))))
    return out


def layer_of(mod: str, order: list[tuple[str, list[str]]]) -> int:
    short = "hello_ray" if mod == "hello_ray" else mod.removeprefix("hello_ray.")
    for i, (_, patterns) in enumerate(order):
        if any(fnmatch.fnmatchcase(short, p) for p in patterns):
            return i
    raise AssertionError(f"{mod} is in no layer of docs/ARCHITECTURE.md's Import order")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_runs_down_the_documented_layers_without_a_cycle():
    known = modules()
    edges = graph(known)
    order = layers()
    assert [name for name, _ in order][:2] == ["foundation", "store"] and len(order) >= 8
    up = [f"{a} ({order[layer_of(a, order)][0]}) imports {b} ({order[layer_of(b, order)][0]})"
          for a, targets in edges.items() for b in sorted(targets) if layer_of(b, order) > layer_of(a, order)]
    assert not up, "upward imports:\n" + "\n".join(up)
    assert not cycles(edges), cycles(edges)


def test_no_stage_imports_another():
    edges = graph(modules())

    def stage(mod: str) -> str | None:
        m = re.fullmatch(r"hello_ray\.stages\.([a-z]+)(?:_[a-z]+)?", mod)  # evaluate, evaluate_core, ... = evaluate
        return m.group(1) if m else None

    crossing = [(a, b) for a, targets in edges.items() for b in targets
                if stage(a) and stage(b) and stage(a) != stage(b)]
    assert not crossing


@pytest.mark.parametrize("edges,expected", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_the_cycle_finder_finds_cycles(edges, expected):
    """The check can fail: a planted circle is found (the pipeline <-> preflight <-> report one was real)."""
    assert cycles(edges) == expected


def test_an_upward_import_is_named():
    order = [("low", ["store"]), ("high", ["pipeline"])]
    assert layer_of("hello_ray.store", order) == 0 and layer_of("hello_ray.pipeline", order) == 1
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("hello_ray.nowhere", order)


def imported_test_modules(source: str) -> set[str]:
    """The test modules (``test_*``, ``conftest``) that Python ``source`` imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        found |= {n.split(".")[0] for n in names if n.split(".")[0].startswith("test_") or n == "conftest"}
    return found



def test_no_test_file_imports_another():
    """Shared fakes live in tests/builders.py (written through the real formats); a test module that
    imports another runs that module's fixtures' imports and couples the two files' edits."""
    found = {p.name: imported_test_modules(p.read_text()) for p in sorted((REPO / "tests").glob("*.py"))}
    assert {name: mods for name, mods in found.items() if mods} == {}
    assert imported_test_modules("def f():\n    from test_select import helper\n") == {"test_select"}  # it can fail


def stage_names_in(source: str, stages: set[str]) -> list[str]:
    """Where ``source``'s code (not its comments or docstrings) names a stage: a string equal to a
    stage's name, a name or attribute spelled as one (``cfg.select``), or an import of a stage module."""
    tree = ast.parse(source)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in stages:
                found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Name) and node.id in stages:
            found.append(f"line {node.lineno}: name {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in stages:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for n in names:
                if any(part in stages or part.split("_")[0] in stages and part.endswith(("_core", "_plan"))
                       for part in n.split(".")):
                    found.append(f"line {node.lineno}: import {n}")
    return found


def test_no_stage_is_named_in_the_runner_the_preflight_or_the_cost_model():
    """They read the stage contract (hello_ray/stages/__init__.py) and each stage's plan, so removing
    a stage from the registry needs no other edit but its recipe step."""
    from hello_ray.registry import STAGES

    stages = {s.STAGE for s in STAGES}
    files = [PKG / "runner.py", *sorted((PKG / "preflight").glob("*.py"))]
    found = {str(p.relative_to(REPO)): hits for p in files if (hits := stage_names_in(p.read_text(), stages))}
    assert found == {}
    # It can fail: each way of naming a stage is found.
    planted = ('"""about select"""\nx = "select"\ny = cfg.teachers.epochs\nfrom hello_ray.stages import evaluate\n'
               'from hello_ray.stages.select_plan import work\n')
    assert len(stage_names_in(planted, stages)) == 4


def file_names_in(source: str) -> set[str]:
    """The file names ``source``'s code uses as values: a string constant that is a whole file name
    (``"adapter.json"``), or ends one in a path (``f"labels/{name}/meta.json"``); prose is not read."""
    tree = ast.parse(source)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    pattern = re.compile(r"(?:^|/)([\w\-]+\.(?:json|parquet|safetensors|npz|yaml))$")
    return {m.group(1) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
            and (m := pattern.search(n.value))}


def test_every_artifact_file_name_is_spelled_in_one_module():
    """A file name lives with its format (hello_ray/formats/, models/adapter.py, labels/stored.py,
    store/keys.py, data/classnames.py); every other module uses that module's name for it."""
    where: dict[str, set[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        for name in file_names_in(path.read_text()):
            where.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert {name: sorted(mods) for name, mods in where.items() if len(mods) > 1} == {}
    # It can fail: a name spelled as a value is found, in a path too; prose is not.
    assert file_names_in('x = "adapter.json"\ny = f"labels/{n}/meta.json"\nz = "see adapter.json"\n') == \
        {"adapter.json", "meta.json"}
