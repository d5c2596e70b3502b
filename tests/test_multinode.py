"""Opt-in (HELLO_RAY_MULTINODE=1): the smoke preset on a real multi-node Ray cluster on this machine.

- ``test_smoke_runs_on_worker_nodes``: a head with no CPUs and two 1-CPU worker nodes, each its
  own ``ray start`` process tree (tests/local_cluster.py); this process is the driver, connected
  with ``compute.address``. Every stage's Train workers, Ray Data actors and tasks must run on the
  worker nodes: each manifest's ``summary["nodes"]`` names them, and never the head. The same
  cluster refuses a local store (two alive nodes) unless ``store_shared=true``.
- ``test_autoscaler_grows_from_zero_and_shrinks_back``: a head with no CPUs and Ray's fake
  multi-node autoscaler (cluster/fake-multinode.yaml): zero workers at the start, nodes launched for
  the stages' asks, removed when idle after the run. The alive worker count is sampled every 2 s
  and printed.
- ``test_a_worker_node_lost_mid_teachers_resumes_on_the_nodes_left``: three 1-CPU worker nodes; every
  process of the node holding a Train worker is SIGKILLed once the first epoch is in the store, and
  teachers resume on the nodes left from the last checkpoint (docs/store.md, the node-loss drills).
- ``test_a_worker_node_lost_mid_select_is_recovered_by_ray``: the same, mid-select, on the node of a
  scoring actor: Ray restarts the actor and retries its calls; every image is scored and counted once.
- ``test_autoscaler_replaces_a_node_lost_mid_teachers``: the fake autoscaler's cluster; the launched
  node holding a Train worker is killed, the autoscaler replaces it and teachers resume on it.

All start a moto S3 server in its own process (tests/faults.py): the store is S3, which every node
reaches. Minutes each on 2 cores (a smoke run plus node start-up), hence opt-in; run them one at a
time: ``HELLO_RAY_MULTINODE=1 python -m pytest -n 0 -s tests/test_multinode.py -k autoscaler``.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from faults import MotoProcess
from local_cluster import LocalRayCluster

from hello_ray.config import ConfigError, load_config

pytestmark = pytest.mark.skipif(not os.environ.get("HELLO_RAY_MULTINODE"),
                                reason="multi-node rehearsal: opt-in with HELLO_RAY_MULTINODE=1")

ROOT = Path(__file__).resolve().parent.parent
NODE_START_S = 240     # a node's raylet, agents and dashboard on a loaded 2-core machine
SHRINK_S = 180         # idle_timeout_minutes (6 s) + the autoscaler's termination on a loaded machine
TRAIN_STAGES = ("teachers", "transfer", "evaluate")
ACTORS = {"select": "ObserverScorer", "refine": "RefineBatch"}


@pytest.fixture
def s3_env(monkeypatch) -> dict[str, str]:
    """A moto server in its own process and a fresh bucket; the AWS variables for the driver (set
    here) and for the nodes (returned: their Ray workers inherit them from the raylet)."""
    import boto3

    moto = MotoProcess()
    env = {"AWS_ENDPOINT_URL_S3": moto.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bucket = f"hr-mn-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto.endpoint).create_bucket(Bucket=bucket)
    yield {**env, "HR_BUCKET": bucket}
    moto.stop()


@pytest.fixture
def cluster(s3_env):
    """A stopped-at-the-end cluster whose nodes import this checkout and reach the S3 server."""
    import ray

    if ray.is_initialized():
        pytest.skip("this process already holds a Ray connection; run this file on its own")
    env = {k: v for k, v in s3_env.items() if k != "HR_BUCKET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    for var in ("RAY_TRAIN_V2_ENABLED", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        env[var] = os.environ.setdefault(var, {"RAY_TRAIN_V2_ENABLED": "1"}.get(var, os.environ.get(var, "")))
    c = LocalRayCluster(env=env)
    yield c
    ray.shutdown()
    c.stop()
    assert c.stray_pids() == []
    shutil.rmtree(c.temp_dir, ignore_errors=True)  # a failure's node logs are in its message already


def connect(c: LocalRayCluster, cfg: Any, workers: int) -> dict[str, Any]:
    """Driver connection through the pipeline's own ``ensure_ray(compute)``; waits for the head and
    ``workers`` worker nodes. Returns the alive nodes by id."""
    import ray

    from hello_ray.runtime import ensure_ray

    deadline = time.monotonic() + NODE_START_S
    while True:
        try:
            ensure_ray(cfg.compute)
            break
        except ConnectionError:
            if time.monotonic() > deadline:
                raise AssertionError(f"no Ray head at {c.address}:\n{c.tail()}") from None
            time.sleep(2)
    while True:
        alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        if len(alive) == workers + 1:
            return alive
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(alive)} of {workers + 1} nodes up:\n{c.tail()}")
        time.sleep(2)


def head_id() -> str:
    import ray

    (head,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]]
    return head


def stage_nodes(cfg: Any, keys: dict[str, str]) -> dict[str, dict[str, list[str]]]:
    """Each stage's ``summary["nodes"]`` from its manifest in the store."""
    from hello_ray.pipeline import open_run_store

    store = open_run_store(cfg)
    return {stage: store.manifest(key)["summary"].get("nodes", {})
            for stage, key in keys.items() if stage != "images"}


def assert_on_workers(nodes: dict[str, dict[str, list[str]]], head: str) -> None:
    """Every stage recorded where it ran, with its own kind of worker, and never the head."""
    print("\nnode ids per stage (role: nodes):")
    for stage, roles in nodes.items():
        print(f"  {stage:9s} " + "; ".join(f"{r}: {', '.join(n[-8:] for n in ids)}" for r, ids in roles.items()))
    assert set(nodes) >= {*TRAIN_STAGES, *ACTORS}
    for stage, roles in nodes.items():
        assert roles, f"{stage} recorded no nodes"
        for role, ids in roles.items():
            assert ids and head not in ids, f"{stage} {role} ran on the head {head[-8:]}: {ids}"
    for stage in TRAIN_STAGES:
        assert nodes[stage].get("train_workers"), nodes[stage]
        assert nodes[stage].get("tasks"), nodes[stage]   # the decode tasks feeding the workers
    for stage, actor in ACTORS.items():
        assert nodes[stage].get(actor), nodes[stage]


def busy(address: str) -> str:
    """What keeps worker nodes up: alive actors by node, and each node's resource usage as the
    autoscaler sees it (its object store included)."""
    import json

    import ray
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get
    from ray.util.state import list_actors

    lines = [f"actor {a.class_name} on {a.node_id[-8:]}" for a in list_actors(address=address, filters=[("state", "=", "ALIVE")])]
    status = json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or b"{}")
    usage = (status.get("load_metrics_report") or {}).get("usage_by_node") or {}
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    lines += [f"node {n[-8:]} usage {u}" for n, u in usage.items() if n in alive]
    return "\n".join(lines)


def drill_index(node_id: str) -> int:
    """The 1-based add order of the worker node ``node_id`` (its ``drill_node_<i>`` resource)."""
    import ray

    (index,) = [int(r.rsplit("_", 1)[1]) for n in ray.nodes() if n["NodeID"] == node_id
                for r in n["Resources"] if r.startswith("drill_node_")]
    return index


def in_thread(step: Any, cfg: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """``step(Run.start(cfg))`` (a recipe step) in a started daemon thread; its key, or the exception
    it raised, lands in the returned dict as "key" or "error"."""
    from hello_ray.runner import Run

    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["key"] = step(Run.start(cfg))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            out["error"] = e

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def finished(thread: threading.Thread, out: dict[str, Any]) -> str:
    """The key the step's thread ended with (its error raised here)."""
    thread.join(5)
    assert "error" not in out, out.get("error")
    return out["key"]


def epoch_files(store: Any) -> set[str]:
    """The teachers' epoch metrics written so far (the artifact is not finished yet)."""
    return {n for key in store.folders() if key.startswith("teachers-")
            for n in store.list_files(key) if n.startswith("epochs/") and n.endswith(".json")}


def first_epoch_and_worker_node(c: LocalRayCluster, store: Any, thread: threading.Thread, out: dict[str, Any],
                                deadline: float) -> tuple[set[str], str]:
    """Wait until the teachers' first epoch is in the store; (its epoch files, a Train worker's node)."""
    from ray.util.state import list_actors

    seen: set[str] = set()
    while not seen and thread.is_alive() and time.monotonic() < deadline:
        seen = epoch_files(store)
        time.sleep(0.5)
    assert seen, out.get("error") or c.tail()
    workers = [a for a in list_actors(address=c.address, filters=[("state", "=", "ALIVE")])
               if a.class_name == "RayTrainWorker"]
    return seen, workers[0].node_id


def resumed_epochs(store: Any, key: str, epochs: int, trained_before: set[str]) -> list[dict[str, Any]]:
    """The teachers artifact after a loss: every epoch in it, some trained by a resumed attempt, none
    of the epochs finished before the loss trained again (only the one in flight may be), every file
    verified against the manifest (size and sha256). Returns the resumed epochs' metrics."""
    import json

    files = [f["name"] for f in store.manifest(key)["files"]]
    metrics = {n: json.loads(store.get_bytes(key, n)) for n in files if n.startswith("epochs/") and n.endswith(".json")}
    assert len(metrics) == epochs
    resumed = [m for m in metrics.values() if m["resumed_from"] is not None]
    assert resumed, metrics
    assert min(m["attempt_start_epoch"] for m in resumed) >= len(trained_before)
    for name in files:
        store.get_bytes(key, name)
    return resumed


def smoke(bucket: str, address: str, *extra: str) -> Any:
    return load_config("smoke", overrides=[f"store=s3://{bucket}/run", f"compute.address={address}", *extra])


def test_smoke_runs_on_worker_nodes(cluster, s3_env, tmp_path):
    from hello_ray import pipeline

    t0 = time.perf_counter()
    cluster.start_head(num_cpus=0)
    cluster.add_worker(num_cpus=1)
    cluster.add_worker(num_cpus=1)
    cfg = smoke(s3_env["HR_BUCKET"], cluster.address)
    alive = connect(cluster, cfg, workers=2)
    head = head_id()
    up = time.perf_counter() - t0

    # The shared-store rule, on this real 2-worker cluster, before any stage could run.
    local = load_config("smoke", overrides=[f"store={tmp_path / 'store'}", f"compute.address={cluster.address}"])
    with pytest.raises(ConfigError, match="3 alive nodes"):
        pipeline.check_resources(local)
    pipeline.check_resources(load_config("smoke", overrides=[
        f"store={tmp_path / 'store'}", "store_shared=true", f"compute.address={cluster.address}"]))

    t1 = time.perf_counter()
    result = pipeline.distill(cfg)
    run_s = time.perf_counter() - t1
    nodes = stage_nodes(cfg, result.keys)
    print(f"\ncluster up in {up:.1f} s; smoke run {run_s:.1f} s; head {head[-8:]}, workers "
          f"{', '.join(n[-8:] for n in alive if n != head)}")
    assert_on_workers(nodes, head)
    used = {n for roles in nodes.values() for ids in roles.values() for n in ids}
    assert used <= set(alive) - {head}
    assert result.rows  # the run finished with results


def test_autoscaler_grows_from_zero_and_shrinks_back(cluster, s3_env):
    import ray

    from hello_ray import pipeline, placement

    t0 = time.perf_counter()
    cluster.start_head(autoscaling_config=yaml.safe_load((ROOT / "cluster" / "fake-multinode.yaml").read_text()))
    cfg = smoke(s3_env["HR_BUCKET"], cluster.address)
    connect(cluster, cfg, workers=0)
    head = head_id()
    deadline = time.monotonic() + 60  # the monitor's first report follows the head's first load report
    while not placement.autoscaler_running() and time.monotonic() < deadline:
        time.sleep(1)
    assert placement.autoscaler_running()  # what makes a local store "multi-node" at one node

    series: list[tuple[float, int]] = []   # (seconds since the head was asked for, alive workers)

    def sample(stop: threading.Event) -> None:
        while not stop.is_set():
            series.append((round(time.perf_counter() - t0, 1), sum(n["Alive"] for n in ray.nodes()) - 1))
            stop.wait(2.0)

    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(stop,), daemon=True)
    sampler.start()
    try:
        while not series:
            time.sleep(0.1)
        t1 = time.perf_counter()
        result = pipeline.distill(cfg)
        run_s, ran_until = time.perf_counter() - t1, time.perf_counter() - t0
    finally:
        stop.set()
        sampler.join()
    nodes = stage_nodes(cfg, result.keys)
    # The run ends as a submitted job does: its driver disconnects, and the job's actors and objects
    # go with it. While connected, one worker stayed busy for good (seen: TrainController and
    # DatasetManager actors still alive, 0.6 MB held in that worker's object store). A fresh
    # connection (another job, holding nothing) watches the workers go.
    ray.shutdown()
    ray.init(address=cluster.address)
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(stop,), daemon=True)
    sampler.start()
    try:
        deadline = time.monotonic() + SHRINK_S
        while time.monotonic() < deadline and (series[-1][0] < ran_until or series[-1][1] > 0):
            time.sleep(2)
    finally:
        stop.set()
        sampler.join()
    print(f"\nsmoke run {run_s:.1f} s (ended at {ran_until:.1f} s); alive worker nodes over time (s, n):")
    print(" ".join(f"{t:g}:{n}" for t, n in series))
    assert series[0][1] == 0, "the cluster did not start from zero workers"
    assert max(n for _, n in series) >= 1, "the autoscaler never added a node"
    assert series[-1][1] == 0, f"idle workers were not removed within {SHRINK_S} s of the run:\n{busy(cluster.address)}"
    assert_on_workers(nodes, head)


def test_a_worker_node_lost_mid_teachers_resumes_on_the_nodes_left(cluster, s3_env):
    """A spot node reclaimed mid-teachers: every process of a worker node that holds a Train worker is
    SIGKILLed once the first epoch is in the store. Ray Train restarts the group on the two nodes left
    (compute.max_failures), from the last checkpoint; the finished epochs are not trained again, all
    epochs end in the artifact, and every file verifies against the manifest."""
    from hello_ray.pipeline import open_run_store, run_teachers

    cluster.start_head(num_cpus=0)
    for i in range(3):
        cluster.add_worker(num_cpus=1, resources={f"drill_node_{i + 1}": 1})
    epochs = 6
    cfg = smoke(s3_env["HR_BUCKET"], cluster.address, f"teachers.epochs={epochs}", f"teachers.lr_step={epochs - 1}")
    connect(cluster, cfg, workers=3)
    store = open_run_store(cfg)
    thread, out = in_thread(run_teachers, cfg)
    deadline = time.monotonic() + 600
    trained_before, node = first_epoch_and_worker_node(cluster, store, thread, out, deadline)
    index = drill_index(node)
    killed = cluster.kill_node(index)
    killed_at = time.time()
    resumed_at = None
    while thread.is_alive() and time.monotonic() < deadline:
        if resumed_at is None and epoch_files(store) - trained_before:
            resumed_at = time.time()
        time.sleep(0.5)
    resumed = resumed_epochs(store, finished(thread, out), epochs, trained_before)
    print(f"\nnode {index} ({node[-8:]}, {len(killed)} processes) killed after {sorted(trained_before)}; "
          f"the next epoch file came {(resumed_at or killed_at) - killed_at:.1f} s later; epochs trained after "
          f"the kill: {sorted(int(m['epoch']) for m in resumed)}")


def scorer_tasks(address: str) -> list[Any]:
    """Every attempt of the select stage's scoring calls so far (Ray's task events)."""
    from ray.util.state import list_tasks

    return [t for t in list_tasks(address=address, filters=[("type", "=", "ACTOR_TASK")], limit=10_000,
                                  raise_on_missing_output=False) if "ObserverScorer" in t.name]


def test_a_worker_node_lost_mid_select_is_recovered_by_ray(cluster, s3_env):
    """A spot node reclaimed mid-select: every process of a worker node holding a scoring actor is
    SIGKILLed once the first scoring call has finished and while others are in flight. Ray restarts the actor pool's lost actors and
    retries their calls (Ray Data's actor pools: max_restarts=-1, max_task_retries=-1) and rebuilds
    lost blocks from lineage; the driver's per-class heaps see every image exactly once, so the
    image set is complete and no image counts twice; every file verifies against the manifest.
    Select is made long enough to be hit mid-way: 30 images a class, 16 crops each, one image a batch."""
    from ray.util.state import list_actors

    from hello_ray.pipeline import open_run_store, run_select, run_teachers
    from hello_ray.runner import Run

    cluster.start_head(num_cpus=0)
    for i in range(3):
        cluster.add_worker(num_cpus=1, resources={f"drill_node_{i + 1}": 1})
    cfg = smoke(s3_env["HR_BUCKET"], cluster.address, "select.mipc=30", "select.num_crop=16",
                "select.batch_size=16", "select.num_actors=2")
    connect(cluster, cfg, workers=3)
    store = open_run_store(cfg)
    run_teachers(Run.start(cfg))   # the observer, undisturbed
    t0 = time.monotonic()
    thread, out = in_thread(run_select, cfg)
    deadline = t0 + 600
    done: list[Any] = []
    while not done and thread.is_alive() and time.monotonic() < deadline:
        done = [t for t in scorer_tasks(cluster.address) if t.state == "FINISHED"]
        time.sleep(0.5)
    assert done and thread.is_alive(), out.get("error") or "select ended before the drill could hit it"
    in_flight = sum(t.state == "RUNNING" for t in scorer_tasks(cluster.address))
    actors = [a for a in list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")])
              if "ObserverScorer" in a.class_name]
    node = actors[0].node_id
    index = drill_index(node)
    finished_before = len(done)
    killed = cluster.kill_node(index)
    killed_at = time.monotonic()
    redone_at = None   # when a retried call was first seen finished (polled every 0.5 s)
    while thread.is_alive() and time.monotonic() < deadline:
        if redone_at is None and any(t.attempt_number > 0 and t.state == "FINISHED"
                                     for t in scorer_tasks(cluster.address)):
            redone_at = time.monotonic()
        time.sleep(0.5)
    ended_at = time.monotonic()
    key = finished(thread, out)

    summary = store.manifest(key)["summary"]
    considered, read = summary["images_considered"], summary["images_read"]
    assert read == considered == 10 * 30, summary   # every image scored, none counted twice
    assert set(summary["per_class"].values()) == {30}, summary["per_class"]
    for entry in store.manifest(key)["files"]:
        store.get_bytes(key, entry["name"])   # size and sha256 against the manifest
    # Ray retries a call on the dead actor until a restarted one takes it: the attempts that found
    # the actor gone did no work, so the work redone is at most the retried calls' images.
    tasks = scorer_tasks(cluster.address)
    calls = {t.task_id for t in tasks}
    retried = {t.task_id for t in tasks if t.attempt_number > 0}
    print(f"\nnode {index} ({node[-8:]}, {len(killed)} processes, {sum(a.node_id == node for a in actors)} of "
          f"{len(actors)} scoring actors) killed after {finished_before} scoring calls, {in_flight} running; a retried call was seen "
          f"done {'-' if redone_at is None else f'{redone_at - killed_at:.1f}'} s after the kill, select ended "
          f"{ended_at - killed_at:.1f} s after it ({ended_at - t0:.1f} s in all); "
          f"{len(calls)} scoring calls for {considered} images ({len(tasks)} attempts); {len(retried)} call(s) "
          f"retried: at most {len(retried) * considered // max(len(calls), 1)} images "
          f"({len(retried) * considered // max(len(calls), 1) * cfg.select.num_crop} crops) scored again")


def test_autoscaler_replaces_a_node_lost_mid_teachers(cluster, s3_env):
    """A spot node reclaimed mid-teachers on an autoscaled cluster: every process of the launched node
    holding a Train worker is SIGKILLed once the first epoch is in the store. The autoscaler learns of
    the loss from the node's missing heartbeats (``AUTOSCALER_HEARTBEAT_TIMEOUT_S``, 30 s by default,
    10 s here), terminates it, and launches a replacement for the asks left waiting (at most two
    workers: the dead one must go before a new one may come); teachers resume from the last
    checkpoint, and the replacement node does the stage's work."""
    import ray

    from hello_ray import placement
    from hello_ray.pipeline import open_run_store, run_teachers

    t0 = time.monotonic()
    cluster.start_head(autoscaling_config=yaml.safe_load((ROOT / "cluster" / "fake-multinode.yaml").read_text()),
                       env={"AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10"})
    epochs = 8
    cfg = smoke(s3_env["HR_BUCKET"], cluster.address, f"teachers.epochs={epochs}", f"teachers.lr_step={epochs - 1}")
    connect(cluster, cfg, workers=0)
    head = head_id()
    deadline = time.monotonic() + 60
    while not placement.autoscaler_running() and time.monotonic() < deadline:
        time.sleep(1)
    store = open_run_store(cfg)

    def alive_workers() -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head}

    thread, out = in_thread(run_teachers, cfg)
    deadline = time.monotonic() + 900
    trained_before, node = first_epoch_and_worker_node(cluster, store, thread, out, deadline)
    before = alive_workers()
    killed = cluster.kill_launched_node(node)
    killed_at = time.monotonic()
    marked_dead = replaced = resumed = None
    new_nodes: set[str] = set()
    while thread.is_alive() and time.monotonic() < deadline:
        alive = alive_workers()
        if marked_dead is None and node not in alive:
            marked_dead = time.monotonic() - killed_at
        if alive - before and replaced is None:
            replaced = time.monotonic() - killed_at
        new_nodes |= alive - before
        if resumed is None and epoch_files(store) - trained_before:
            resumed = time.monotonic() - killed_at
        time.sleep(0.5)
    key = finished(thread, out)
    resumed_after = resumed_epochs(store, key, epochs, trained_before)
    manifest = store.manifest(key)
    used = {n for ids in manifest["summary"].get("nodes", {}).values() for n in ids}
    print(f"\nlaunched node {node[-8:]} ({len(killed)} processes) killed after {sorted(trained_before)} "
          f"({killed_at - t0:.1f} s after the head was asked for); Ray marked it dead after "
          f"{marked_dead if marked_dead is None else round(marked_dead, 1)} s; a new node was up after "
          f"{replaced if replaced is None else round(replaced, 1)} s; the next epoch file came after "
          f"{resumed if resumed is None else round(resumed, 1)} s; epochs trained after the kill: "
          f"{sorted(int(m['epoch']) for m in resumed_after)}; new nodes {sorted(n[-8:] for n in new_nodes)}")
    assert new_nodes, "the autoscaler launched no node after the loss"
    assert used & new_nodes, f"no stage work ran on the replacement: {manifest['summary'].get('nodes')}"
