"""Session-wide fixtures: a real local Ray and a real S3 HTTP server on 127.0.0.1.

Both are the real things users meet on a cluster: Ray with 2 CPUs, and moto's threaded
S3 server reached through boto3/pyarrow exactly as AWS or MinIO would be (via the standard
``AWS_ENDPOINT_URL_S3`` variable).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from builders import free_port

TESTS_DIR = Path(__file__).resolve().parent

# Ray Train's controller polls its workers every 2 s and a worker's ``ray.train.report`` waits
# for the previous report to be polled (a result queue of one): with the tests' sub-second
# epochs every report would wait for the poll. A short interval keeps the same protocol; the
# preemption watcher (one more actor per run) has no drain events to watch on a local node.
# Set before any Ray starts: the driver passes them on to controllers and workers.
for _var, _value in {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                     "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}.items():
    os.environ.setdefault(_var, _value)
# The two test processes' local Rays live for the whole suite, and each one's log monitor globs the
# logs folder (two files for every worker process it ever started) every 0.1 s until it holds 1,000
# files, then every 0.5 s. Threshold 0 takes the 0.5 s pace from the start; a new worker's lines still
# all come, at most 0.5 s later. With 284 files, idle: 0.69 CPU-s a minute instead of 1.46; in a
# fresh-clone suite each of the two monitors used about 36 CPU-s (docs/benchmarks.md).
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")

# pytest-xdist runs the suite in several processes on the same cores. Each torch would start one
# OpenMP thread per core, so the processes' threads outnumber the cores and their spin-waits burn
# each other's CPU: on 2 cores with 2 workers, 76 CPU-heavy tests took 46-47 s with torch's
# default and 31-33 s with one thread each. Each test process gets its share of the cores; the Ray
# it starts passes the setting on to its workers (Ray's own default is 1 for a one-CPU actor).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                     // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# Files whose tests start Ray Train runs or whole pipelines, heaviest first. pytest-xdist
# (``--dist loadfile``) hands whole files to the two workers in collection order, so starting
# with the longest files balances them (longest-processing-time-first scheduling). The order is
# by measured wall time, but the suite is CPU-bound: reordering by a later run's --durations
# (s3_faults second) took 720 s against 677-684 s for this order, within this machine's noise.
HEAVY_FILES = ("test_pipeline.py", "test_teachers.py", "test_s3_faults.py", "test_evaluate.py",
               "test_driver_loss.py", "test_gpu_pipeline.py", "test_transfer.py", "test_store.py",
               "test_lease.py", "test_select.py", "test_failures.py", "test_recover.py", "test_integrity.py",
               "test_refine.py", "test_external.py")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL and sets the standard AWS env."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (
        "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    })
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the moto server; returns an ``s3://bucket/prefix`` store URI."""
    import boto3

    name = f"hr-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}/artifacts"


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory, s3_server):
    """One local Ray for the whole session (2 CPUs, as on CI).

    After ``s3_server``: Ray workers inherit the driver's environment at ``ray.init`` and resolve
    S3 credentials from it themselves (no store or filesystem carries a key to them)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    # Workers must import the package and test helpers the same way this process does.
    paths = [str(TESTS_DIR.parent), str(TESTS_DIR)]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(
        num_cpus=2,
        # Two test processes (pytest-xdist) each run a local Ray: a small object store each keeps
        # the pair far below the machine's memory (the tests' data are a few MB).
        object_store_memory=1_000_000_000,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}},
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _same_random_state():
    """Every test starts from the same global random state, whatever ran before it in its process:
    a test's outcome must not depend on which tests share its worker (an int8 round-trip tolerance
    once held only for the LoRA initialisation the full suite's order happened to give)."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def file_store_uri(tmp_path) -> str:
    return (tmp_path / "store").as_uri()


def pytest_collection_modifyitems(config, items):
    """Heavy files first (a stable sort: the order inside a file is kept); `@pytest.mark.slow`
    tests are opt-in (HELLO_RAY_SLOW=1): CI's budget is 20 minutes."""
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if os.environ.get("HELLO_RAY_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow: opt-in with HELLO_RAY_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
