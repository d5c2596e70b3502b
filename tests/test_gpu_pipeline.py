"""benchmarks/gpu_pipeline.py at tiny shapes on the CPU: the same walk of the recipe a GPU run makes
(synthetic ImageNet-shaped JPEGs, every stage on Ray, recover after the report), so the script a
GPU machine is lent for has run before it gets there."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_pipeline.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_pipeline", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_pipeline_runs_every_stage_at_tiny_shapes(ray_local, tmp_path):
    bench = _module()
    out = tmp_path / "gpu_pipeline.json"
    assert bench.main(["--tiny", "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    result = json.loads(out.read_text())
    stages = [r["stage"] for r in result["stages"]]
    assert stages == ["teachers", "select", "transfer", "refine", "evaluate", "report", "recover"]
    for r in result["stages"]:
        assert r["wall_s"] > 0 and r["per_s"] > 0 and r["gpu_busy"] is None, r  # no GPU: no samples
        assert r["units"] == bench.UNITS[r["stage"]]
    assert result["gpu"] is None and result["tiny"] and result["date"] and result["cpu"]
    table = bench.format_table(result)
    assert all(f"\n{s:10s}" in table for s in stages) and "no GPU" in table
    store = tmp_path / "work" / "store"
    finished = {p.parent.name.split("-")[0] for p in store.rglob("manifest.json")}
    assert {"teachers", "select", "transfer", "refine", "evaluate", "recover"} <= finished
