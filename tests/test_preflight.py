"""``hello-ray preflight``: each failure caught before compute, named, leaving nothing in the store;
the rehearsal at smoke shapes; the cost model's label bytes against ``hello-ray storage``; the
synthetic ImageNet-shaped fixture; ``distill`` refusing a failing run.

Real parts throughout: the moto S3 server (tests/conftest.py), a real local Ray reading the data
through Ray Data, real files on disk. The data is the synthetic fixture (3 ImageNet classes, tiny
JPEGs), so every Ray Data read is a handful of small files.
"""
from __future__ import annotations

import shutil
import socket
from pathlib import Path

import boto3
import pytest
from PIL import Image

from hello_ray.config import load_config
from hello_ray.data.classnames import imagenet_wnids
from hello_ray.data.synthetic import write_synthetic
from hello_ray.preflight import checks
from hello_ray.preflight.checks import CheckReport
from hello_ray.stages import transfer_plan

WNIDS = list(imagenet_wnids())


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    """3 classes x (2 train, 2 val) tiny JPEGs as ImageFolder; tests copy it before breaking it."""
    root = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic(str(root), 3, 2, 2, layout="imagefolder", min_side=24, max_side=40)
    return root


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(src, dst)
    return dst


def _cfg(data: Path | str, store: str, *extra: str):
    return load_config("smoke", None, [f"data.source={data}", f"store={store}", "s3_max_attempts=1",
                                       "s3_timeout=5", *extra])


def _bucket_keys(uri: str, endpoint: str) -> list[str]:
    bucket = uri.split("/")[2]
    resp = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in resp.get("Contents", [])]


# ------------------------------------------------------------------------------ synthetic data

def test_synthetic_fixture_imagenet_shaped(tmp_path):
    """Real synset folders, varied sizes and aspect ratios, greyscale and CMYK JPEGs, a notice."""
    meta = write_synthetic(str(tmp_path / "d"), 4, 6, 2, layout="imagefolder", min_side=24, max_side=64)
    train = tmp_path / "d" / "train"
    assert sorted(p.name for p in train.iterdir()) == WNIDS[:4]
    images = [Image.open(p) for p in sorted(train.rglob("*.JPEG"))]
    assert len(images) == 24 and {im.format for im in images} == {"JPEG"}
    assert {im.mode for im in images} == {"RGB", "L", "CMYK"}
    assert len({im.size for im in images}) > 10                      # sizes and aspect ratios vary
    assert min(min(im.size) for im in images) >= 24
    assert "never a dataset to report accuracy on" in (tmp_path / "d" / "README.md").read_text()
    assert meta["splits"]["val"]["images"] == 8


def test_synthetic_webdataset_on_s3_reads_back(ray_local, s3_bucket, s3_server):
    """Webdataset shards on S3 in the layout sources.py reads: classes from classes.json, wnids named."""
    from hello_ray.data.sources import load_train_val

    root = s3_bucket.replace("/artifacts", "/synth")
    write_synthetic(root, 5, 3, 1, layout="webdataset", min_side=16, max_side=24, shard_size=4)
    cfg = _cfg(root, s3_bucket)
    train, val = load_train_val(cfg.data)
    assert train.format == "webdataset" and train.class_keys == WNIDS[:5]
    assert train.class_names[0] == "tench"
    assert len(train.ds.take_all()) == 15 and len(val.ds.take_all()) == 5


# ------------------------------------------------------------------------------ each failure

@pytest.mark.parametrize("case", ["unreachable endpoint", "missing bucket", "no credentials"])
def test_store_failures_named_and_leave_nothing(case, s3_server, s3_bucket, monkeypatch):
    store, extra = s3_bucket, []
    if case == "unreachable endpoint":  # a port nothing listens on: connection refused
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        extra = [f"s3_endpoint=http://127.0.0.1:{port}"]
    if case == "missing bucket":
        store = "s3://hr-no-such-bucket-here/run"
    if case == "no credentials":
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    report = CheckReport()
    assert checks.check_store(_cfg("unused", store, *extra), report) is None
    (failure,) = report.failures()
    assert failure.name == "store"
    assert {"missing bucket": "hr-no-such-bucket-here", "no credentials": "credentials",
            "unreachable endpoint": "endpoint"}[case] in failure.detail
    if case != "missing bucket":
        monkeypatch.undo()
        assert _bucket_keys(s3_bucket, s3_server) == []


@pytest.fixture
def s3_store(s3_bucket):
    return s3_bucket


def _data_failure(cfg) -> CheckReport:
    report = CheckReport()
    store = checks.check_store(cfg, report)
    checks.check_data(cfg, store, report)
    return report


def test_missing_split_named(ray_local, synth_root, tmp_path, s3_store, s3_server):
    data = _copy(synth_root, tmp_path)
    shutil.rmtree(data / "val")
    report = _data_failure(_cfg(data, s3_store))
    (failure,) = report.failures()
    assert failure.name == "data.val" and "split 'val'" in failure.detail
    assert _bucket_keys(s3_store, s3_server) == []


def test_class_mismatch_named(ray_local, synth_root, tmp_path, s3_store, s3_server):
    data = _copy(synth_root, tmp_path)
    shutil.copytree(data / "train" / WNIDS[0], data / "train" / WNIDS[7])  # a 4th class in train only
    report = _data_failure(_cfg(data, s3_store))
    (failure,) = report.failures()
    assert failure.name == "data.classes"
    assert "train has 4 classes, val 3" in failure.detail and WNIDS[7] in failure.detail
    assert _bucket_keys(s3_store, s3_server) == []


def test_corrupt_sample_named(ray_local, synth_root, tmp_path, s3_store, s3_server):
    data = _copy(synth_root, tmp_path)
    bad = sorted((data / "train" / WNIDS[1]).iterdir())[0]
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    report = _data_failure(_cfg(data, s3_store, "data.on_corrupt=skip"))
    (failure,) = report.failures()
    assert failure.name == "data.train" and bad.name in failure.detail and "do not decode" in failure.detail
    assert _bucket_keys(s3_store, s3_server) == []


def test_ask_beyond_every_node_type_names_the_stage(tmp_path):
    """A GPU Train worker on a CPU-only cluster (autoscaler YAML node types): teachers would wait forever."""
    yaml_path = tmp_path / "cpu-only.yaml"
    yaml_path.write_text("cluster_name: c\nmax_workers: 4\nhead_node_type: head\navailable_node_types:\n"
                         "  head: {resources: {CPU: 4}, node_config: {}}\n"
                         "  cpu_worker: {min_workers: 0, max_workers: 4, resources: {CPU: 8}, node_config: {}}\n")
    report = CheckReport()
    checks.check_resources(_cfg("unused", "s3://b/run", "compute.use_gpu=true"), report, str(yaml_path))
    (failure,) = report.failures()
    assert failure.name == "resources" and "stage 'teachers'" in failure.detail
    assert "GPU" in failure.detail and "wait forever" in failure.detail
    report = CheckReport()  # the same run without GPUs fits
    checks.check_resources(_cfg("unused", "s3://b/run"), report, str(yaml_path))
    assert report.ok, report.checks
    # A local store on those several machines: refused unless declared shared (placement's rule).
    report = CheckReport()
    checks.check_resources(_cfg("unused", str(tmp_path / "store")), report, str(yaml_path))
    (failure,) = report.failures()
    assert failure.name == "store.shared" and "worker node types" in failure.detail and "store_shared" in failure.detail
    report = CheckReport()
    checks.check_resources(_cfg("unused", str(tmp_path / "store"), "store_shared=true"), report, str(yaml_path))
    assert report.ok, report.checks


def test_shipped_aws_cluster_holds_imagenet1k():
    """cluster/aws.yaml's node types hold every stage of the imagenet1k preset (8 GPU workers), with
    the S3 store the preset's header names (its default ./artifacts is refused on several machines)."""
    report = CheckReport()
    cfg = load_config("imagenet1k", None, ["data.source=unused", "store=s3://my-bucket/hello_ray"])
    checks.check_resources(cfg, report, str(Path(__file__).resolve().parent.parent / "cluster" / "aws.yaml"))
    assert report.ok, report.checks


def test_unknown_clip_model_named():
    report = CheckReport()
    transfer_plan.check(_cfg("unused", "unused", "transfer.clip_model=RN5O"), None, report, probe_network=False)
    (failure,) = report.failures()
    assert failure.name == "weights.clip" and "'RN5O'" in failure.detail and "transfer.clip_model" in failure.detail


def test_preflight_cli_exit_and_empty_local_store(ray_local, synth_root, tmp_path, capsys):
    """The command: a failing check exits 1 naming it, and a local store it had to create is gone."""
    from hello_ray.cli.preflight import main

    data = _copy(synth_root, tmp_path)
    shutil.rmtree(data / "val")
    store = tmp_path / "store"
    assert main(["--preset", "smoke", "--no-network", f"data.source={data}", f"store={store}"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "[FAIL] data.val" in out
    assert not store.exists()


def test_distill_refuses_a_failing_run(ray_local, synth_root, tmp_path, capsys):
    """jobs/distill.py (pipeline.main) runs the checks first: refused with status 2, check named."""
    from hello_ray import pipeline

    data = _copy(synth_root, tmp_path)
    shutil.rmtree(data / "val")
    store = tmp_path / "store"
    assert pipeline.main(["--preset", "smoke", "--store", str(store), f"data.source={data}"]) == 2
    err = capsys.readouterr().err
    assert "refused by the preflight checks (data.val)" in err
    assert not store.exists()


# ------------------------------------------------------------------------------ rehearsal + cost

def test_rehearsal_at_smoke_shapes(ray_local, synth_root, tmp_path):
    """Every smoke stage takes real steps (3 classes in every head), FLOPs counted, the scratch key
    removed; the LoRA count and the stored-label bytes agree with hello-ray storage."""
    from hello_ray import pipeline
    from hello_ray.accounting import projector_lora_counts, stored_soft_label_bytes
    from hello_ray.preflight.cost import cost_table, format_cost, load_devices
    from hello_ray.preflight.rehearsal import Rehearsal
    from hello_ray.store import open_store

    cfg = _cfg(synth_root, str(tmp_path / "store"))
    report, store = checks.run_checks(cfg, probe_network=False)
    assert report.ok, report.failures()
    stages = [s.STAGE for s in pipeline.active_stages(cfg)]
    reh = Rehearsal(cfg, store, report.facts["classes"], report.facts["class_names"], "random-init", steps=1,
                    flop_budget=2e9)  # a few images per step: cheap, still every stage's code
    results = reh.run(stages)
    assert [r.stage for r in results] == stages
    for r in results:
        assert r.step_s > 0 and r.flops_per_item > 0 and r.peak_mem_bytes > 0, r
    transfer = next(r for r in results if r.stage == "transfer")
    tc = cfg.transfer
    assert transfer.extra["lora_params"] == projector_lora_counts(3, tc.conv_rank, tc.head_rank, tc.clip_model,
                                                                 tc.lora_style)["params"]
    assert not [f for f in open_store(cfg.store).folders() if f.startswith("_preflight")]  # scratch removed
    # start-up measured on the live Ray: a no-op Train run (its run state removed), a no-op actor pool
    assert all(r.extra["startup_s"] > 0 for r in results), [(r.stage, r.extra.get("startup_s")) for r in results]
    assert not [f for f in open_store(cfg.store).folders("_ray") if f.startswith("_preflight")]
    table = cost_table(cfg, report.facts, results, load_devices())
    for s in table["stages"]:
        assert s["startup_s"] > 0 and s["seconds_here"] > s["startup_s"], s["stage"]
    ev = next(s for s in table["stages"] if s["stage"] == "evaluate")
    assert ev["stored_soft_labels_bytes"] == stored_soft_label_bytes(3, cfg.select.ipc, cfg.evaluate.epochs)
    teachers = next(s for s in table["stages"] if s["stage"] == "teachers")
    assert teachers["items"] == report.facts["train_images"] * cfg.teachers.epochs
    assert "teachers" in format_cost(table) and "| evaluate |" in format_cost(table, markdown=True)


def test_report_shows_the_preflight_table():
    """A preflight JSON in the run's store becomes the report's "Preflight" section."""
    from hello_ray.report import build_report

    stage = {"stage": "teachers", "steps": 2, "batch": 4, "step_s": 0.5, "peak_mem_bytes": 2 ** 30,
             "flops_per_item": 1.1e9, "work": "10 train x 2 epochs", "flops": 2.2e10, "bytes": 2048,
             "bytes_what": "2 checkpoints", "seconds_here": 2.5, "seconds_on": {"H200": 0.01}, "units": 2}
    cost = {"stages": [stage], "devices": {"H200": {}},
            "total": {"seconds_here": 2.5, "flops": 2.2e10, "bytes": 2048, "seconds_on": {"H200": 0.01}}}
    rows = [{"student": "resnet18", "strategy": "hard", "seed": 0, "images": "distilled", "continual_steps": 0,
             "continual_step": 0, "top1": 0.5, "label_bytes": 10}]
    md, _ = build_report(rows, preflight={"wall_s": 12.0, "cost": cost})
    assert "## Preflight" in md and "| teachers | 2 x 4 | 0.500 |" in md and "2 checkpoints" in md
    assert "## Preflight" not in build_report(rows)[0]


def test_rehearsal_of_lpld_recover(ray_local, synth_root, tmp_path):
    """images.source=lpld makes recover an active stage: it takes its iterations at smoke shapes."""
    from hello_ray import pipeline
    from hello_ray.preflight.rehearsal import Rehearsal
    from hello_ray.store import open_store

    cfg = _cfg(synth_root, str(tmp_path / "store"), "images.source=lpld")
    assert "recover" in [s.STAGE for s in pipeline.active_stages(cfg)]
    store = open_store(cfg.store)
    reh = Rehearsal(cfg, store, 3, [], "random-init", steps=1, flop_budget=1e9)
    teachers, recover = reh.run(["teachers", "recover"], startup=False)  # start-up: the smoke test
    assert recover.stage == "recover" and recover.step_s > 0 and recover.flops_per_item > teachers.extra[
        "forward_flops_per_item"]  # an iteration is a forward and a backward to the pixels
    assert recover.batch <= cfg.select.ipc


def test_startup_skips_an_ask_this_ray_cannot_hold(ray_local, tmp_path):
    """A run rehearsed on a machine that cannot hold its workers (a GPU cluster's preset checked with
    --cluster on a laptop; here 64 Train workers on a 2-CPU Ray) gets no start-up measurement: a
    Ray Train launch would wait forever for them. The actor stage that fits is still measured."""
    import threading

    from hello_ray.preflight.rehearsal import Rehearsal
    from hello_ray.store import open_store

    cfg = _cfg("unused", str(tmp_path / "store"), "compute.num_workers=64")
    reh = Rehearsal(cfg, open_store(cfg.store), 3, [], "random-init")
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(reh.startup(["teachers", "select", "evaluate"])),
                              daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "the start-up measurement waited for workers this Ray cannot hold"
    assert set(out) == {"select"} and out["select"] > 0
