"""The recipe end to end on the smoke preset, its cache, `ray job submit`, and the sweep."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hello_ray.config import load_config
from hello_ray.pipeline import distill, open_run_store

REPO = Path(__file__).resolve().parent.parent
STAGES = ("teachers", "select", "transfer", "refine", "evaluate")
slow = pytest.mark.slow  # opt-in: HELLO_RAY_SLOW=1 (see conftest)


def _check_run(result, store, cfg):
    assert set(STAGES) <= set(result.keys) | {"refine"}
    for stage in ("teachers", "select", "transfer", "images", "evaluate"):
        m = store.manifest(result.keys[stage])
        assert m["files"], stage
    assert store.manifest(result.keys["images"])["stage"] == "refine"
    strategies = {r["strategy"] for r in result.rows}
    assert strategies >= {"hard", "teacher", "stored", "stored/10", "projector"}
    assert all(0.0 <= r["top1"] <= 1.0 for r in result.rows)
    assert "projector" in result.table and result.report_uri


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory) -> str:
    """One store for the module: the sweep reuses the end-to-end run's teachers and selection."""
    return (tmp_path_factory.mktemp("smoke") / "store").as_uri()


def test_smoke_end_to_end_then_cached(ray_local, smoke_store):
    file_store_uri = smoke_store
    cfg = load_config("smoke", overrides=[f"store={file_store_uri}"])
    first = distill(cfg)
    store = open_run_store(cfg)
    _check_run(first, store, cfg)
    report = Path(first.report_uri.replace("file://", ""))
    assert report.exists() and "accuracy" in report.read_text().lower()
    # Every stage that read the digits records what it read and the undecodable images it skipped.
    reads = {"teachers": {"train", "val"}, "select": {"train"}, "transfer": {"train", "val"}, "evaluate": {"val"}}
    for stage, splits in reads.items():
        summary = store.manifest(first.keys[stage])["summary"]
        assert set(summary["corrupt"]) == splits and all(c["corrupt"] == 0 for c in summary["corrupt"].values())
        assert summary["dataset"]["train"]["format"] == "parquet"
    assert "## Data" in report.read_text() and "| teachers | train (train) | 300 | 0 | - |" in report.read_text()

    # Same config: every stage is found in the store and skipped.
    t0 = time.perf_counter()
    again = distill(cfg)
    assert again.keys == first.keys
    assert time.perf_counter() - t0 < 60
    # A different IPC reuses the teachers and redoes selection onwards.
    cfg2 = load_config("smoke", overrides=[f"store={file_store_uri}", "select.ipc=1"])
    from hello_ray.pipeline import run_stage
    from hello_ray.stages import select, teachers

    assert run_stage(teachers, cfg2, store) == first.keys["teachers"]
    assert store.artifact_key("select", select.stage_config(cfg2), {"teachers": first.keys["teachers"]}) \
        != first.keys["select"]


def test_sweep_two_by_two(ray_local, smoke_store):
    """Ray Tune, 2 ranks x 2 windows on the smoke preset, on the 2-CPU local Ray: every trial
    trains and is scored, and the grid is in the report (table + heat map)."""
    from hello_ray.sweep import format_sweep, sweep

    # Two trials at a time, one Train worker each: trials are mostly start-up (trainers, actors),
    # which overlaps; the grid, the refine step and the report are the same.
    cfg = load_config("smoke", overrides=[f"store={smoke_store}", "sweep.max_concurrent=2",
                                          "compute.num_workers=1"])
    out = sweep(cfg)
    rows = out["rows"]
    assert {(r["conv_rank"], r["window"]) for r in rows} == {(2, "1-2"), (2, "2-3"), (4, "1-2"), (4, "2-3")}
    assert all(r["top1"] is not None and 0 <= r["top1"] <= 1 and not r["error"] for r in rows)
    assert {r["head_rank"] for r in rows} == {2 * 16, 4 * 16}
    assert out["best"]["top1"] == max(r["top1"] for r in rows)
    report = Path(out["report_uri"].replace("file://", ""))
    text = report.read_text()
    assert "sweep" in text.lower() and (report.parent / "sweep_heatmap.png").exists()
    assert len(format_sweep(rows).splitlines()) == 5


@slow
def test_ray_job_submit_to_local_head_with_s3_store(s3_bucket, s3_server, tmp_path):
    """`ray job submit` of the smoke preset against `ray start --head`, store on the S3 server."""
    # As in an activated virtualenv: the job's `python` entrypoint is this interpreter.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = 6390
    dash = 8275
    subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
    start = subprocess.run([ray_bin, "start", "--head", "--num-cpus=2", f"--port={port}",
                            "--include-dashboard=true", f"--dashboard-port={dash}",
                            "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        runtime_env = {"env_vars": {k: os.environ[k] for k in (
            "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}}
        submit = subprocess.run(
            [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(REPO),
             "--runtime-env-json", json.dumps(runtime_env), "--",
             "python", "jobs/distill.py", "--preset", "smoke", "--store", s3_bucket],
            env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
        assert "succeeded" in submit.stdout.lower()
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
    import boto3

    bucket, prefix = s3_bucket[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    names = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
             for o in page.get("Contents", [])]
    manifests = [n for n in names if n.endswith("/manifest.json")]
    stages = {json.loads(s3.get_object(Bucket=bucket, Key=n)["Body"].read())["stage"] for n in manifests}
    assert set(STAGES) <= stages, stages
