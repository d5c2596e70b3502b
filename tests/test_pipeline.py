"""The recipe end to end on the smoke preset, its cache, `ray job submit`, and the sweep."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hello_ray import pipeline, runner
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


def test_smoke_end_to_end_then_cached(ray_local, smoke_store, monkeypatch):
    file_store_uri = smoke_store
    cfg = load_config("smoke", overrides=[f"store={file_store_uri}"])
    first = distill(cfg)
    store = open_run_store(cfg)
    _check_run(first, store, cfg)
    # Each stage's wall time, as the manifest records it, for the table distill prints last.
    assert set(first.stage_s) == set(STAGES)
    for stage, wall in first.stage_s.items():
        assert round(wall, 2) == store.manifest(first.keys[stage])["summary"]["wall_s"]
    table = pipeline.format_stage_times(first.stage_s, 123.4)
    assert all(f"\n{s:10s}" in table for s in STAGES) and "total" in table and "123.4" in table
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
    assert again.stage_s == {s: None for s in STAGES}
    # A finished run is found from the store alone: the same keys and report, and no Ray call.
    def no_ray(*_a, **_k):
        raise AssertionError("a finished run started Ray")

    monkeypatch.setattr(runner, "ensure_ray", no_ray)  # Run.start is the one caller
    found = pipeline.finished_result(cfg)
    assert found is not None and found.keys == first.keys and found.stage_s == again.stage_s
    assert found.table == first.table and Path(found.report_uri.replace("file://", "")).exists()
    # One stage left to compute (another seed: evaluate's key changes): the full run is needed.
    assert pipeline.finished_result(load_config("smoke", overrides=[f"store={file_store_uri}",
                                                                    "evaluate.seeds=[1]"])) is None
    # A different IPC reuses the teachers and redoes selection onwards.
    cfg2 = load_config("smoke", overrides=[f"store={file_store_uri}", "select.ipc=1"])
    from hello_ray.pipeline import run_stage
    from hello_ray.stages import select, teachers

    assert run_stage(teachers, cfg2, store) == first.keys["teachers"]

    def select_key(c):  # the derivation the run uses: config slice, dataset fingerprints, inputs
        return store.artifact_key("select", pipeline.Run(c, store).stage_config(select),
                                  {"teachers": first.keys["teachers"]})

    assert select_key(cfg) == first.keys["select"]   # so the inequality below can fail
    assert select_key(cfg2) != first.keys["select"]


def test_a_finished_stage_job_answers_from_the_store_without_ray(smoke_store, tmp_path, monkeypatch):
    """A stage job (``jobs/<stage>.py``) whose stage and every stage before it are finished finds its key
    as distill's re-run does, from the store alone; one with work left starts Ray."""
    from hello_ray.cli.distill import stage_job
    from hello_ray.recipe import run_evaluate, run_teachers

    calls = []

    def no_ray(*_a, **_k):
        calls.append(1)
        raise AssertionError("the job started Ray")

    monkeypatch.setattr(runner, "ensure_ray", no_ray)  # Run.start is the one caller
    store = open_run_store(load_config("smoke", overrides=[f"store={smoke_store}"]))
    for step, stage in ((run_teachers, "teachers"), (run_evaluate, "evaluate")):
        _, found, key = stage_job(["--preset", "smoke", f"store={smoke_store}"], step, "test")
        assert key.startswith(f"{stage}-") and found.exists(key) and store.exists(key)
    assert not calls
    with pytest.raises(AssertionError, match="started Ray"):   # a fresh store: work to do
        stage_job(["--preset", "smoke", f"store={tmp_path / 'fresh'}"], run_teachers, "test")
    assert calls == [1]


# The smoke run with every way of lightening labels (preset frontier-smoke: reuses the run above's
# teachers, selection and projector, so only evaluate and the report run).
def test_smoke_runs_top_k_phases_and_fair_scores(ray_local, smoke_store):
    cfg = load_config("frontier-smoke", overrides=[f"store={smoke_store}"])
    assert cfg.evaluate.protocol == "lpqld" and cfg.teachers == load_config("smoke").teachers
    result = distill(cfg)
    store = open_run_store(cfg)
    key = result.keys["evaluate"]
    by = {(r["images"], r["strategy"]): r for r in result.rows}
    assert {s for i, s in by if i == "rded"} == set(cfg.evaluate.strategies)
    assert ("full", "hard") in by and by[("full", "hard")]["train_images"] > by[("rded", "hard")]["train_images"]
    # Top-k and int8 bytes are their files in the evaluate artifact; 5 of 10 classes, so top-5
    # stores the same number of values as stored/10 plus their ids
    files = store.list_files(key)
    for strategy, folder in (("stored/10@top5", "stored-10-top5"), ("stored@top3+phases", "stored-top3"),
                             ("projector@int8", "projector-int8")):
        mine = [f for f in files if f.startswith(f"labels/{folder}/")]
        assert mine and by[("rded", strategy)]["label_bytes"] == sum(len(store.get_bytes(key, f)) for f in mine)
    assert by[("rded", "projector@int8")]["label_bytes"] < by[("rded", "projector")]["label_bytes"]
    # The scores: LRS for every strategy with a floor row (A(full) measured), ARS where +noaug rows exist
    scores = {s["strategy"]: s for s in store.manifest(key)["summary"]["scores"]}
    assert set(scores) == {"hard", "stored", "projector"}
    assert all(s["lrs_mean"] is not None for s in scores.values())
    assert scores["projector"]["ars_mean"] is not None and scores["stored"]["ars_mean"] is None
    assert "fair scores (DD-Ranking" in result.table
    report = Path(result.report_uri.replace("file://", "")).read_text()
    assert "the frontier" in report and "| frontier |" in report and "### Fair scores (DD-Ranking)" in report
    proc = subprocess.run([sys.executable, "-m", "hello_ray.cli", "scores", "--store", smoke_store, "--key", key],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "projector" in proc.stdout and "LRS" in proc.stdout, proc.stderr


def _run_documented(store: str, cwd: Path, every_variant: bool) -> dict[tuple[str, ...], float]:
    """Run the documented commands (tests/documented.py decides which) as a user would from a shell,
    smoke-sized, against ``store``: the first of each job, or with ``every_variant`` every line."""
    import shutil

    from builders import write_external_set
    from documented import documented, smoke_argv

    (cwd / "jobs").symlink_to(REPO / "jobs")       # the documented paths are relative to the checkout
    write_external_set(cwd / "rded_out", "rded")    # jobs/external.py's ./rded_out
    hello = shutil.which("hello-ray", path=str(Path(sys.executable).parent))
    assert hello, "the hello-ray console script is not installed (pip install -e .)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    expect = {"jobs/train_teachers.py": "epoch  top1", "--help-config": "teachers.epochs", "--help": "commands:",
              "jobs/distill.py": "total"}
    ran: dict[tuple[str, ...], float] = {}
    programs: set[tuple[str, ...]] = set()
    for doc in documented():
        if doc.decision()[0] != "run":
            continue
        argv = smoke_argv(doc.command, store, sys.executable, hello)
        program = (argv[1], *(a for a in argv[2:] if a.startswith("--help")))  # the job or tool, or its help
        if tuple(argv) in ran or (not every_variant and program in programs):
            continue
        programs.add(program)
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        ran[tuple(argv)] = time.perf_counter() - t0
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{doc.where}: {doc.command}\n{out[-4000:]}"
        marker = next((m for k, m in expect.items() if k in argv), None)
        assert marker is None or marker in proc.stdout, f"{doc.where}: {doc.command}\n{proc.stdout[-2000:]}"
    print("\n".join(f"{t:6.1f} s  {' '.join(a[1:]).replace(store, '<store>')}" for a, t in ran.items()))
    return ran


def test_each_documented_job_runs(smoke_store, tmp_path):
    """Each documented job and tool, its first documented line, against this module's smoke store: what
    the end-to-end run above made is reused (the jobs' own overrides are in the slow test below)."""
    ran = _run_documented(smoke_store, tmp_path, every_variant=False)
    jobs = {a[1] for a in ran if a[1].startswith("jobs/")}
    assert jobs == {f"jobs/{j}.py" for j in ("distill", "evaluate", "external", "recover", "refine",
                                             "select_patches", "train_teachers", "transfer")}


@slow
def test_every_documented_command_runs(smoke_store, tmp_path):
    """Every documented line, overrides included: each variant computes only the stages it changes
    (about 400 s on 2 cores, hence opt-in)."""
    assert len(_run_documented(smoke_store, tmp_path, every_variant=True)) >= 17


def test_sweep_runs_its_grid_on_tune(ray_local, smoke_store):
    """Ray Tune on the smoke preset, 2 ranks x 1 window on the 2-CPU local Ray: every trial trains
    (transfer, refine, evaluate) and is scored, and the grid is in the report (table + heat map).
    The grid's product (every rank with every window) is our code, pinned without Tune in
    tests/test_sweep.py; here the second window would only repeat the same trial path."""
    from hello_ray.sweep import format_sweep, sweep

    # Two trials at a time, one Train worker each: trials are mostly start-up (trainers, actors),
    # which overlaps; the grid, the refine step and the report are the same.
    cfg = load_config("smoke", overrides=[f"store={smoke_store}", "sweep.max_concurrent=2",
                                          "sweep.windows=[1-2]", "compute.num_workers=1"])
    out = sweep(cfg)
    rows = out["rows"]
    assert {(r["conv_rank"], r["window"]) for r in rows} == {(2, "1-2"), (4, "1-2")}
    assert all(r["top1"] is not None and 0 <= r["top1"] <= 1 and not r["error"] for r in rows)
    assert {r["head_rank"] for r in rows} == {2 * 16, 4 * 16}
    assert out["best"]["top1"] == max(r["top1"] for r in rows)
    report = Path(out["report_uri"].replace("file://", ""))
    text = report.read_text()
    assert "sweep" in text.lower() and (report.parent / "sweep_heatmap.png").exists()
    assert len(format_sweep(rows).splitlines()) == 3


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


# A receiver's process: opens the package from S3, labels a fixed batch of views, then runs the
# README's training loop (examples/train_on_package.py) for one epoch. Ray must never be imported.
RECEIVER = r"""
import json, runpy, sys, torch, torchvision
import hello_ray.distilled
from hello_ray.views import view_batch
uri, out_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
pkg = hello_ray.distilled.open(uri)
_, views = view_batch(pkg.images, torch.arange(len(pkg)), pkg.image_size, 1.0,
                     torch.Generator().manual_seed(7))
torch.save({"views": views, "logits": pkg.labeller("projector")(views)}, out_path)
ray_after_labeller = "ray" in sys.modules
student = torchvision.models.resnet18(num_classes=len(pkg.class_names))
before = [p.detach().clone() for p in student.parameters()]
train = runpy.run_path("examples/train_on_package.py")["train"]
student, loss = train(uri, epochs=1, batch_size=10, student=student)
changed = sum(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
print(json.dumps({"ray": ray_after_labeller or "ray" in sys.modules, "loss": loss, "changed": changed,
                  "params": len(before)}))
"""


def test_export_round_trip_and_readme_loop(ray_local, smoke_store, s3_server, s3_bucket, tmp_path):
    """The smoke run (cached by the end-to-end test) exported to the S3 server with its stored labels.
    A fresh process with the run's store moved away opens the package: its projector labeller's
    logits on a fixed batch of views equal evaluate's (ProjectorLabels on the run's transfer
    artifact, the run's label precision) bit for bit, Ray is never imported, and the README's
    training loop trains a student for one epoch (finite loss, weights moved). Then a flipped byte
    in an image and in the adapter on S3 is reported by name."""
    import boto3
    import torch

    from hello_ray.data.imageset import load_image_set
    from hello_ray.distilled import open as open_package
    from hello_ray.distilled.export import export
    from hello_ray.labels import ProjectorLabels
    from hello_ray.store import IntegrityError
    from hello_ray.views import view_batch

    cfg = load_config("smoke", overrides=[f"store={smoke_store}"])
    keys = distill(cfg).keys      # cached: every stage is found in the store
    store = open_run_store(cfg)
    inputs = store.manifest(keys["evaluate"])["inputs"]
    to = s3_bucket.rsplit("/", 1)[0] + "/packages/smoke-ipc2"
    out = export(keys["evaluate"], store.uri, to, ["projector", "stored"])
    assert out["bytes"]["images"] > 0 and out["bytes"]["stored"] > 0 and out["bytes"]["grid"] > 0

    # evaluate's own labelling path, on the run's store
    image_set = load_image_set(store, inputs["images"])
    ref = ProjectorLabels.from_store(store, inputs["transfer"], len(image_set.class_names),
                                     cfg.data.image_size).to(torch.device("cpu")).with_precision(
        cfg.evaluate.label_precision)
    images = image_set.images.permute(0, 3, 1, 2)
    _, views = view_batch(images, torch.arange(len(images)), cfg.data.image_size, 1.0,
                         torch.Generator().manual_seed(7))
    expected = ref.logits(views)

    run_dir = Path(smoke_store.replace("file://", ""))
    moved = run_dir.with_name(run_dir.name + ".away")
    run_dir.rename(moved)            # the run's store is unreachable for the receiver
    try:
        got_path = tmp_path / "receiver.pt"
        res = subprocess.run([sys.executable, "-c", RECEIVER, to, str(got_path), str(torch.get_num_threads())],
                             capture_output=True, text=True, cwd=REPO, timeout=600)
    finally:
        moved.rename(run_dir)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    got = torch.load(got_path, weights_only=True)
    assert torch.equal(got["views"], views)                  # same pixels, same views
    assert got["logits"].shape == expected.shape and torch.equal(got["logits"], expected)
    assert report["ray"] is False
    assert torch.isfinite(torch.tensor(report["loss"])) and report["changed"] == report["params"]

    bucket, prefix = to[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    image = next(f["name"] for f in json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")[
        "Body"].read())["files"] if f["name"].startswith("images/"))
    for name in ("adapter/adapter.safetensors", image):
        obj = f"{prefix}/{name}"
        data = bytearray(s3.get_object(Bucket=bucket, Key=obj)["Body"].read())
        data[len(data) // 2] ^= 0x01
        s3.put_object(Bucket=bucket, Key=obj, Body=bytes(data))
        with pytest.raises(IntegrityError, match=f"file {name} does not match"):
            open_package(to).labeller()
