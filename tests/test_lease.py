"""One writer per artifact (hello_ray/lease.py): the lease on a local folder and on the moto S3
server, the fence that stops a writer whose lease was taken over, the recipe's wait / reuse /
refuse / take-over, and two real driver processes started on one key a few seconds apart."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hello_ray import lease
from hello_ray.lease import Lease, LeaseHeld, LeaseLost, read_lease
from hello_ray.store import open_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["file", "s3"])
def store(request):
    """The same tests on a local folder and on the moto S3 server."""
    return open_store(request.getfixturevalue("file_store_uri" if request.param == "file" else "s3_bucket"))


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _wait_for(cond, timeout: float, what: str, step: float = 0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        out = cond()
        if out:
            return out
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ---------------------------------------------------------------------------- the lease itself

def test_exactly_one_of_racing_writers_gets_the_lease(store):
    """Eight threads try at once: one holds the lease, seven see that holder; after its release
    the next one gets it. The object has the documented fields."""
    key = "teachers-race0000001"
    leases = [Lease(store, key, "teachers", ttl=30) for _ in range(8)]
    barrier = threading.Barrier(len(leases))
    out: dict[int, object] = {}

    def go(i: int) -> None:
        barrier.wait()
        out[i] = leases[i].try_acquire()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in out.items() if r is None]
    assert len(winners) == 1, out
    owner = leases[winners[0]]
    assert all(r.owner == owner.owner for r in out.values() if r is not None)
    info = read_lease(store, key)
    assert (info.owner, info.pid, info.stage) == (owner.owner, os.getpid(), "teachers")
    assert time.time() + 25 < info.expires <= time.time() + 30
    assert set(json.loads(lease._backend(store).read(key)[0])) == {"owner", "host", "pid", "expires", "stage"}
    assert lease.lease_active(store, key)

    owner.release()
    assert read_lease(store, key) is None and not lease.lease_active(store, key)
    other = leases[(winners[0] + 1) % len(leases)]
    assert other.try_acquire() is None and read_lease(store, key).owner == other.owner
    other.release()


def test_the_owner_renews_and_a_released_lease_is_free(store):
    key = "select-renew0000001"
    held = Lease(store, key, "select", ttl=2)
    assert held.try_acquire() is None
    first = read_lease(store, key).expires
    # Renewed every ttl/3: past the first expiry it is still held, and ours.
    time.sleep(2.5)
    now = read_lease(store, key)
    assert now.owner == held.owner and now.expires > first and not now.expired()
    assert held.held and held.lost is None
    held.check()
    assert Lease(store, key, "select", ttl=2).try_acquire().owner == held.owner
    held.release()
    held.release()  # idempotent
    assert read_lease(store, key) is None


def test_a_renewal_that_landed_unanswered_leaves_the_lease_ours(store):
    """A renewal whose answer was lost (a timeout while the store was paused) may still have been
    written: the next renewal's conditional write is then refused, and finds our owner with an older
    expiry. The lease is still ours and is renewed over that version; a stranger's version is not."""
    key = "select-unanswered01"
    held = Lease(store, key, "select", ttl=30)
    assert held.try_acquire() is None
    try:
        # The landed renewal: written as renew writes it, its new token never seen by the writer.
        assert held._backend.replace(key, held._payload(), held._token) is not None
        landed = read_lease(store, key)
        assert landed.owner == held.owner
        held.check()  # renews: refused on the old token, then written over our landed version
        now = read_lease(store, key)
        assert now.owner == held.owner and now.expires > landed.expires and held.held
        # A stranger's version (the lease taken over) is not ours, whatever its expiry.
        other = Lease(store, key, "select", ttl=30)
        other_data = json.loads(other._payload())
        assert held._backend.replace(key, json.dumps({**other_data, "expires": now.expires},
                                                     sort_keys=True).encode(), held._token) is not None
        with pytest.raises(LeaseLost, match="taken over by"):
            held.check()
    finally:
        held.release()


# A writer in its own process: takes the lease, registers the fence like Run.needs, then writes
# a beat file every 0.1 s until a write is refused (exit 17) or 20 s pass (exit 0).
HOLDER = r"""
import sys, time
from hello_ray.lease import Lease, LeaseLost
from hello_ray.store import open_store
store = open_store(sys.argv[1])
key, ttl = sys.argv[2], float(sys.argv[3])
held = Lease(store, key, "teachers", ttl=ttl)
assert held.try_acquire() is None
store.fences = {key: held.fence()}
print("acquired", held.owner, flush=True)
t0 = time.time()
while time.time() - t0 < 20:
    try:
        store.put_bytes(key, "beat.txt", held.owner.encode())
    except LeaseLost as e:
        print("lost:", e, flush=True)
        sys.exit(17)
    print("beat", flush=True)
    time.sleep(0.1)
"""


def _holder(store_uri: str, key: str, ttl: float) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, store_uri, key, str(ttl)], env=_child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True).start()
    got = _wait_for(lambda: next((x for x in lines if x.startswith("acquired")), None), 30, "the holder's lease")
    _wait_for(lambda: any(x.startswith("beat") for x in lines), 10, "the holder's first write")
    return proc, got.split()[1], lines


def test_a_killed_owners_lease_expires_and_is_taken_over(store):
    """SIGKILL the owning process: its lease blocks others until it expires (ttl), then one
    taker gets it and knows whose it took."""
    key = "teachers-crash000001"
    ttl = 2.5  # renewed every 0.8 s: a loaded machine does not miss a renewal by accident
    proc, dead_owner, _ = _holder(store.uri, key, ttl=ttl)
    proc.kill()
    proc.wait()
    t_kill = time.time()
    taker = Lease(store, key, "teachers", ttl=10)
    holder = taker.try_acquire()
    assert holder is not None and holder.owner == dead_owner and not holder.expired()
    _wait_for(lambda: taker.try_acquire() is None, 5, "the takeover")
    waited = time.time() - t_kill
    # Its last renewal was at most ttl/3 before the kill: blocked for at least 2/3 ttl, at most ttl.
    assert 2 * ttl / 3 - 0.2 <= waited <= ttl + 1.0, waited
    assert taker.took_over.owner == dead_owner and read_lease(store, key).owner == taker.owner
    taker.release()


def test_a_stolen_lease_stops_its_old_owner(store):
    """SIGSTOP the owner longer than its ttl, take the lease over, SIGCONT it: its renewal fails
    the If-Match / compare-and-swap, and its next write is refused (LeaseLost, exit 17) instead of
    landing in the new owner's artifact."""
    key = "teachers-stolen00001"
    proc, old_owner, lines = _holder(store.uri, key, ttl=2.5)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        _wait_for(lambda: read_lease(store, key).expired(), 5, "the paused owner's lease to expire")
        thief = Lease(store, key, "teachers", ttl=30)
        assert thief.try_acquire() is None and thief.took_over.owner == old_owner
        store.put_bytes(key, "beat.txt", thief.owner.encode())
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=20) == 17, lines[-5:]
    lost = next(x for x in lines if x.startswith("lost:"))
    assert f"pid {os.getpid()}" in lost and "taken over" in lost
    assert store.get_bytes(key, "beat.txt") == thief.owner.encode()   # nothing of the old owner's landed
    assert read_lease(store, key).owner == thief.owner
    thief.release()


# ---------------------------------------------------------------------------- the recipe

def _select_run(store_uri: str, *overrides: str):
    from hello_ray.config import load_config
    from hello_ray.pipeline import Run

    cfg = load_config("smoke", overrides=[f"store={store_uri}", *overrides])
    return Run(cfg, open_store(cfg.store))


def test_recipe_refuses_waits_and_reuses(store, caplog):
    """A key leased by another writer: ``compute.lease_wait=false`` refuses naming the holder;
    a waiting Run logs the holder once and reuses what the holder finishes (no stage run)."""
    from hello_ray.stages import select

    inputs = {"teachers": "teachers-000000000000"}
    refusing = _select_run(store.uri, "compute.lease_wait=false")
    key = store.artifact_key("select", refusing.stage_config(select), inputs)
    holder = Lease(store, key, "select", ttl=30)
    assert holder.try_acquire() is None
    with pytest.raises(LeaseHeld, match=rf"select.*being written by host .* pid {os.getpid()}.*--no-wait"):
        refusing.needs(select, inputs)

    waiting = _select_run(store.uri, "compute.lease_ttl_s=2")
    result: dict[str, bool] = {}
    with caplog.at_level("INFO", logger="hello_ray"):
        t = threading.Thread(target=lambda: result.update(todo=waiting.needs(select, inputs)))
        t.start()
        _wait_for(lambda: "being written by" in caplog.text, 10, "the waiting line")
        store.put_bytes(key, "images.txt", b"the holder's work")
        store.finalize(key, "select", {}, inputs, {})
        holder.release()
        t.join(timeout=10)
    assert result == {"todo": False}
    assert caplog.text.count("being written by") == 1
    assert "[select] reused, finished by another driver" in caplog.text
    assert "running" not in caplog.text


def test_a_waiter_runs_the_stage_when_the_writer_gives_up(store, caplog):
    """The writer fails and releases its lease without finishing: the waiting Run takes the
    key and runs the stage itself (saying so), instead of reusing nothing."""
    from hello_ray.stages import select

    inputs = {"teachers": "teachers-000000000000"}
    waiting = _select_run(store.uri, "compute.lease_ttl_s=2")
    key = store.artifact_key("select", waiting.stage_config(select), inputs)
    writer = Lease(store, key, "select", ttl=30)
    assert writer.try_acquire() is None
    result: dict[str, bool] = {}
    with caplog.at_level("INFO", logger="hello_ray"):
        t = threading.Thread(target=lambda: result.update(todo=waiting.needs(select, inputs)))
        t.start()
        _wait_for(lambda: "being written by" in caplog.text, 10, "the waiting line")
        writer.release()
        t.join(timeout=10)
    assert result == {"todo": True} and "stopped without finishing it" in caplog.text
    assert read_lease(store, key).owner == waiting._leases["select"].owner
    waiting.release(select)


def test_takeover_clears_an_unfinished_attempt_unless_its_ray_run_resumes(store):
    """A dead driver's expired lease and its leftovers: without Ray run state the new writer
    starts clean (data files and temp files gone); with ``_ray/<key>`` (or for a stage that resumes
    from its own files) it keeps them for the resume. Finalize then lists exactly the files present, and records who wrote them."""
    from hello_ray.stages import select, teachers

    inputs = {"teachers": "teachers-000000000000"}
    run = _select_run(store.uri)
    key = store.artifact_key("select", run.stage_config(select), inputs)
    dead = {"owner": "f" * 32, "host": "gone", "pid": 1, "expires": time.time() - 5, "stage": "select"}
    assert lease._backend(store).create(key, json.dumps(dead).encode())
    store.put_bytes(key, "images/000.png", b"old attempt")
    store.put_bytes(key, "index.parquet", b"old attempt")
    if hasattr(store, "root"):
        (store.root / key / "images" / ".001.png.1234abcd.partial").write_bytes(b"torn")
    assert run.needs(select, inputs)
    assert store.list_files(key) == [] and read_lease(store, key).owner != dead["owner"]
    if hasattr(store, "root"):
        assert not list((store.root / key).rglob("*.partial"))
    store.put_bytes(key, "images/000.png", b"new attempt")
    run.done(select, inputs, {})
    m = store.manifest(key)
    assert [f["name"] for f in m["files"]] == ["images/000.png"]
    assert m["summary"]["writer"]["took_over"]["owner"] == dead["owner"]
    assert m["summary"]["writer"]["pid"] == os.getpid() and read_lease(store, key) is None

    # A Ray Train stage whose run got going: its files are what the run resumes from.
    run = _select_run(store.uri, "teachers.epochs=4")
    tkey = store.artifact_key("teachers", run.stage_config(teachers), {})
    store.put_bytes(tkey, "epochs/epoch_001.pt", b"epoch 1")
    if hasattr(store, "root"):
        (store.root / "_ray" / tkey).mkdir(parents=True)
        (store.root / "_ray" / tkey / "checkpoint_manager_snapshot.json").write_text("{}")
    else:
        store._client.put_object(Bucket=store.bucket, Key=store._obj(f"_ray/{tkey}/snapshot.json"), Body=b"{}")
    assert run.needs(teachers, {})
    assert store.list_files(tkey) == ["epochs/epoch_001.pt"]
    run.release(teachers)
    assert read_lease(store, tkey) is None

    # A stage that resumes from its own files (recover's marked batches) keeps them too.
    from hello_ray.stages import recover

    run = _select_run(store.uri, "images.source=lpld")
    rkey = store.artifact_key("recover", run.stage_config(recover), inputs)
    store.put_bytes(rkey, "images/000.png", b"class 0")
    store.put_bytes(rkey, "done/unit_00000.json", b"{}")
    assert run.needs(recover, inputs)
    assert store.list_files(rkey) == ["done/unit_00000.json", "images/000.png"]
    run.release(recover)


def test_finalize_is_refused_after_the_lease_was_taken_over(store):
    from hello_ray.stages import select

    inputs = {"teachers": "teachers-000000000000"}
    run = _select_run(store.uri, "compute.lease_ttl_s=30")
    assert run.needs(select, inputs)
    key = run.keys["select"]
    store.put_bytes(key, "images/000.png", b"x")
    # Another driver writes its lease over ours (what a takeover after expiry does).
    mine = read_lease(store, key)
    thief = {"owner": "e" * 32, "host": "elsewhere", "pid": 2, "expires": time.time() + 60, "stage": "select"}
    assert lease._backend(store).replace(key, json.dumps(thief).encode(), mine.token)
    with pytest.raises(LeaseLost, match="taken over by host elsewhere pid 2"):
        run.done(select, inputs, {})
    assert not store.exists(key)
    assert read_lease(store, key).owner == thief["owner"]  # our release left the thief's lease alone


def test_no_wait_flag_and_ttl_key():
    from hello_ray.config import ConfigError, load_config
    from hello_ray.pipeline import parse_args

    assert parse_args(["--preset", "smoke", "--no-wait"]).compute.lease_wait is False
    assert parse_args(["--preset", "smoke"]).compute.lease_wait is True
    with pytest.raises(ConfigError, match="compute.lease_ttl_s"):
        load_config("smoke", overrides=["compute.lease_ttl_s=0.1"])


def test_distill_no_wait_exits_3_naming_the_holder(ray_local, tmp_path, capsys):
    """``distill --no-wait`` while another driver writes the teachers: status 3, the holder named,
    nothing computed (the Run starts on the session's Ray, then meets the lease)."""
    from hello_ray.config import load_config
    from hello_ray.pipeline import Run, main
    from hello_ray.stages import teachers

    uri = str(tmp_path / "store")
    store = open_store(uri)
    run = Run(load_config("smoke", overrides=[f"store={uri}"]), store)
    key = store.artifact_key("teachers", run.stage_config(teachers), {})  # as Run.needs derives it
    holder = Lease(store, key, "teachers", ttl=30)
    assert holder.try_acquire() is None
    try:
        assert main(["--preset", "smoke", "--store", uri, "--no-wait"]) == 3
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert f"distill: refused: artifact {key} (teachers) is being written by host" in err
    # Only the demo dataset, which deriving the keys writes (its fingerprint is in them)
    assert f"pid {os.getpid()}" in err and [a.split("-")[0] for a in store.list_artifacts()] == ["dataset"]


# ---------------------------------------------------------------------------- two real drivers

DRIVER = r"""
import sys, time
from hello_ray.config import load_config
from hello_ray.pipeline import run_stage
from hello_ray.runtime import ensure_ray, setup_logging
from hello_ray.stages import select
from hello_ray.store import open_store
setup_logging()
cfg = load_config("demo", overrides=sys.argv[2:])
ensure_ray(cfg.compute)            # joins the test session's Ray: compute.address is set
t0 = time.time()
key = run_stage(select, cfg, open_store(cfg.store), {"teachers": sys.argv[1]})
print("KEY", key, "stage_s", round(time.time() - t0, 2), flush=True)
"""


def test_two_drivers_on_one_key_make_one_artifact(ray_local, s3_bucket, tmp_path):
    """Done-when of issue 15: two driver processes run the same select stage on one S3 key, the
    second started a few seconds after the first. One artifact results, whose files are exactly
    those its manifest lists (sizes and sha256 of the stored bytes), all written by the first
    driver before its manifest; the second waited for it (one line naming its host and pid) and
    reused the artifact without running the stage.

    Needs real processes and a real Ray (each driver its own Ray client of the session's
    cluster): the lease has to hold across processes. Select is the cheapest real stage (a
    two-class folder, a stored tiny observer). The first driver is paused (SIGSTOP) once it holds
    the lease, until the second reports waiting, so the second always arrives while the first is
    writing, however fast the machine is; the ttl (120 s) is far longer than that pause, so the
    first keeps its lease."""
    import boto3
    import ray

    from builders import write_image_folder, write_observer

    root = write_image_folder(tmp_path / "data", {"a": [f"img_{i}.png" for i in range(6)],
                                             "b": [f"img_{i}.png" for i in range(6)]})
    store = open_store(s3_bucket)
    tkey = write_observer(store, ["a", "b"])
    overrides = [f"store={s3_bucket}", f"data.source={root}", "data.format=imagefolder", "data.image_size=32",
                 "data.cpus_per_task=0.5", "compute.use_gpu=false", "compute.lease_ttl_s=120",
                 f"compute.address={ray.get_runtime_context().gcs_address}", "select.ipc=2", "select.factor=1",
                 "select.mipc=6", "select.num_crop=2", "select.batch_size=8", "select.actor_cpus=0.5"]

    def start() -> tuple[subprocess.Popen, list[str]]:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, tkey, *overrides], env=_child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        threading.Thread(target=lambda: [lines.append(x.rstrip()) for x in proc.stdout], daemon=True).start()
        return proc, lines

    procs: list[subprocess.Popen] = []
    t0 = time.monotonic()
    try:
        first, out1 = start()
        procs.append(first)
        _wait_for(lambda: any("[select] running" in x for x in out1), 90, "the first driver to take the lease")
        t_lease = time.monotonic()
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second, out2 = start()
            procs.append(second)
            _wait_for(lambda: any("being written by" in x for x in out2), 90, "the second driver to wait")
            t_wait = time.monotonic()
        finally:
            os.kill(first.pid, signal.SIGCONT)
        rc1, rc2 = first.wait(timeout=180), second.wait(timeout=180)
    finally:
        for p in procs:  # a failed wait above must not leave drivers holding the session's Ray
            if p.poll() is None:
                p.kill()
                p.wait()
    t_end = time.monotonic()
    print(f"\nfirst driver holds the lease after {t_lease - t0:.1f} s; second started then and was "
          f"waiting {t_wait - t_lease:.1f} s later; both done after {t_end - t0:.1f} s")
    print("\n".join(x for x in out2 if "hello_ray.pipeline" in x or x.startswith("KEY")))
    assert rc1 == 0 and rc2 == 0, "\n".join(out1[-20:] + ["----"] + out2[-20:])
    key = next(x.split()[1] for x in out1 if x.startswith("KEY"))
    assert next(x.split()[1] for x in out2 if x.startswith("KEY")) == key

    waiting = [x for x in out2 if "being written by" in x]
    assert len(waiting) == 1 and f"pid {first.pid}" in waiting[0], waiting
    assert any("[select] reused, finished by another driver" in x for x in out2)
    assert not any("[select] running" in x or "[select] done" in x for x in out2), out2

    m = store.manifest(key)
    names = [f["name"] for f in m["files"]]
    assert names == store.list_files(key) and len(names) == 2 * 2 + 2   # 4 images + index + meta
    bucket, prefix = s3_bucket[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    manifest_time = s3.head_object(Bucket=bucket, Key=f"{prefix}/{key}/manifest.json")["LastModified"]
    for f in m["files"]:
        obj = s3.get_object(Bucket=bucket, Key=f"{prefix}/{key}/{f['name']}")
        data = obj["Body"].read()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (f["size"], f["sha256"]), f["name"]
        assert obj["LastModified"] <= manifest_time, f["name"]
    writer = m["summary"]["writer"]
    assert writer["pid"] == first.pid and writer["took_over"] is None
    assert read_lease(store, key) is None   # released after finalize
