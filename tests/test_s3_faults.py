"""A training stage against a misbehaving S3 server: paused (SIGSTOP) and throttled (503 SlowDown).

These need a real Ray Train run: the faults hit the three S3 clients of a stage at once (boto3
in the driver and the Train workers, pyarrow in Ray Train's checkpoint storage and in the Ray Data
readers), and what is tested is how the *stage* comes out: a bounded, named failure, then a
resume from the checkpoint in S3; or a run that completes. The teachers stage at its smallest
(one worker, ShuffleNet with 1.5 MB epoch files, 10 digits per class, 3 epochs) is the cheapest
stage with checkpoints; with small objects a 3 s request timeout is far above any healthy request's
time, even on a loaded machine. (The number of
restarts is bounded, not pinned. Ray Train's placement-group cleaner, which once restarted live
runs here, is not started on the tests' dashboard-less Ray: launcher.keep_placement_group_cleaner.)
The S3 server is moto in its own process (tests/faults.py), so it can really be paused.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Callable

import boto3
import pytest
from botocore.config import Config

from faults import MotoProcess, ThrottlingProxy
from hello_ray.config import load_config
from hello_ray.formats.trajectory import epoch_metrics_file
from hello_ray.launcher import StageFailed
from hello_ray.pipeline import Run, open_run_store
from hello_ray.stages import teachers

EPOCHS = 3


@pytest.fixture(scope="module")
def moto_proc():
    server = MotoProcess()
    yield server
    server.stop()


def _bucket(endpoint: str) -> str:
    name = f"hr-net-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def _cfg(bucket: str, endpoint: str, timeout: float, attempts: int):
    return load_config("smoke", overrides=[
        f"store=s3://{bucket}/artifacts", f"s3_endpoint={endpoint}", f"s3_timeout={timeout}",
        f"s3_max_attempts={attempts}", "compute.num_workers=1", "compute.cpus_per_worker=1",
        "compute.max_failures=1", "data.max_per_class=10", f"teachers.epochs={EPOCHS}",
        "teachers.model=shufflenet_v2_x0_5"])


def _objects(endpoint: str, bucket: str, prefix: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(connect_timeout=2, read_timeout=5))
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


def _when(ready: Callable[[], bool], action: Callable[[], None], timeout_s: float = 900) -> threading.Thread:
    """Run ``action`` once ``ready()`` holds (polled), in a thread; it records when it acted."""
    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                thread.acted_at = time.monotonic()
                action()
                return
            time.sleep(0.25)

    thread = threading.Thread(target=watch, daemon=True)
    thread.acted_at = None
    thread.start()
    return thread


def _epochs(store, key: str) -> dict[int, dict]:
    names = set(store.list_files(key))
    return {e: json.loads(store.get_bytes(key, epoch_metrics_file(e))) for e in range(1, EPOCHS + 1)
            if epoch_metrics_file(e) in names}


def test_paused_past_the_budget_fails_named_then_resumes_throttled_and_briefly_paused(ray_local, moto_proc):
    """One stage, two runs (each Ray Train launch costs 20-40 s here, so the faults share them):

    1. SIGSTOP once epoch 1's checkpoint is registered in S3, for longer than the retry budget
       (2 attempts x 3 s per request): the stage fails within a bounded time, naming the
       endpoint, after no more than compute.max_failures restarts.
    2. SIGCONT, and the same stage again, now through a proxy answering 503 SlowDown to every
       third request and with the server paused for 5 s once the last epoch is written (more
       than one 3 s request timeout, less than the 3-attempt budget): boto3 and pyarrow both
       retry, and the stage resumes from the checkpoint in S3 and completes.
    """
    bucket = _bucket(moto_proc.endpoint)
    cfg = _cfg(bucket, moto_proc.endpoint, timeout=3, attempts=2)
    store = open_run_store(cfg)
    run = Run(cfg, store)
    assert run.needs(teachers, {})
    key = run.keys["teachers"]
    snapshot = f"artifacts/_ray/{key}/checkpoint_manager_snapshot.json"
    pauser = _when(lambda: snapshot in _objects(moto_proc.endpoint, bucket, snapshot), moto_proc.pause)
    try:
        with pytest.raises(StageFailed) as err:
            teachers.run(cfg, store, key, {})
        failed_after = time.monotonic() - pauser.acted_at
    finally:
        moto_proc.resume()
    msg = str(err.value)
    print(f"failed {failed_after:.1f} s after the pause: {msg[:400]}")
    assert moto_proc.endpoint in msg and key in msg and "s3_timeout" in msg
    assert failed_after < 240  # 2 attempts (max_failures=1) x (worker start + a few 10 s budgets)
    last = f"artifacts/{key}/{epoch_metrics_file(EPOCHS)}"
    assert not _objects(moto_proc.endpoint, bucket, last)

    proxy = ThrottlingProxy(moto_proc.endpoint, every=3)
    try:
        cfg = _cfg(bucket, proxy.endpoint, timeout=3, attempts=3)
        store = open_run_store(cfg)

        def brief_pause() -> None:
            moto_proc.pause()
            time.sleep(5)
            moto_proc.resume()

        pauser = _when(lambda: last in _objects(moto_proc.endpoint, bucket, last), brief_pause)
        summary = teachers.run(cfg, store, key, {})
        run.done(teachers, {}, summary)
        pauser.join(30)
    finally:
        moto_proc.resume()
        proxy.stop()
    assert pauser.acted_at is not None
    m = _epochs(store, key)
    assert sorted(m) == list(range(1, EPOCHS + 1)) and summary["epochs"] == EPOCHS
    assert m[1]["attempt_start_epoch"] == 1  # trained before the long pause, kept
    assert m[EPOCHS]["resumed_from"] is not None and m[EPOCHS]["resumed_from"] >= 1  # resumed
    print(f"through the proxy: seen {dict(proxy.seen)}, throttled {dict(proxy.throttled)}, "
          f"retried {dict(proxy.retried)}")
    # Every throttled request is sent again, except one a worker had in backoff when Ray Train
    # tore that worker down (the brief pause can fail an attempt; max_failures bounds those).
    for client in ("boto3", "pyarrow"):
        abandoned = proxy.throttled[client] - proxy.retried[client]
        assert proxy.throttled[client] > 0 and proxy.retried[client] > 0, client
        assert 0 <= abandoned <= cfg.compute.max_failures, (client, sorted(proxy.pending()))
