"""The driver lost mid-run: ``python jobs/distill.py`` stopped in the middle of the teachers' Ray Train
stage, first with SIGTERM (what ``ray job stop`` and a pod's termination send: the driver stops as on an
error and releases its lease, so the next driver starts at once from the checkpoint), then with SIGKILL,
each time followed by the same command started again at once.

What is checked is what a user sees: the second driver names the dead driver's lease and waits for
it (a lease can only be known dead by its expiry: its writer may be on another host, or paused), no
longer than the lease's ttl after its last renewal plus a margin; it takes the lease over, resumes
the Ray Train run from the dead driver's last checkpoint in the store (no finished epoch trained
again), and finishes; every artifact verifies against its manifest; and nothing of the local Ray
the dead driver started outlives it. The drill is real: a real process, a real SIGKILL, the local
store, the smoke preset at its smallest (selection, transfer, refine and evaluate shrunk: the drill
is about the Train stage the driver died in).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
EPOCHS = 8
# compute.lease_ttl_s. A lease is renewed every ttl / 3, so the dead driver's has 2/3 ttl to 1 ttl left when
# the second driver starts; that must outlast the second driver's start (Ray, checks) for it to meet a
# live lease. At 30 s (20 s at worst) a loaded CI run once started it after the lease had expired.
TTL = 60.0


def _command(store: Path) -> list[str]:
    return [sys.executable, "jobs/distill.py", "--preset", "smoke", f"store={store}",
            f"compute.lease_ttl_s={TTL:g}", f"teachers.epochs={EPOCHS}", f"teachers.lr_step={EPOCHS - 1}",
            "transfer.teacher_window=2-4", "transfer.n_teachers=2", "evaluate.strategies=[hard]",
            "evaluate.epochs=1", "refine.enabled=false", "select.mipc=4"]


def _session_processes(sid: int) -> list[str]:
    """Live processes of session ``sid`` (the dead driver's: it and every child it started)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")[:120].decode(errors="replace")
                out.append(f"{d.name} {cmd}")
        except (OSError, ValueError, IndexError):
            continue
    return out


def _epoch_files(store: Path) -> list[Path]:
    return sorted(store.glob("teachers-*/epochs/epoch_*.json"))


def _start(store: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own descriptor
        # Its own session: what it started is findable afterwards.
        return subprocess.Popen(_command(store), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop_after(proc: subprocess.Popen, store: Path, epochs: int, sig: int,
                log: Path) -> tuple[float, set[str]]:
    """Send ``sig`` to the driver alone once ``epochs`` epoch files are in the store; when it was sent,
    and the epoch files there were then (its Ray's workers may write one more before they go down)."""
    try:
        deadline = time.monotonic() + 400
        while len(_epoch_files(store)) < epochs and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert len(_epoch_files(store)) >= epochs and proc.poll() is None, log.read_text()[-3000:]
        written = {p.name for p in _epoch_files(store)}
        os.kill(proc.pid, sig)      # the driver alone; its Ray is left to fend for itself
        sent = time.time()
        proc.wait(60)
        return sent, written
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_driver_killed_mid_stage_is_taken_over_resumed_and_leaves_no_ray(tmp_path):
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)  # each driver starts (and owns) its local Ray

    # `ray job stop` sends SIGTERM: the driver stops as on an error, releasing its lease, so the next
    # driver starts the stage at once (from the checkpoint) instead of waiting out the ttl.
    stopped = _start(store, env, tmp_path / "stopped.log")
    # After two epoch files: the first epoch's Ray checkpoint is then in the store (a rank writes its
    # epoch file, then reports the checkpoint, then trains the next epoch).
    sent, after_stop = _stop_after(stopped, store, 2, signal.SIGTERM, tmp_path / "stopped.log")
    assert stopped.returncode == 128 + signal.SIGTERM, (tmp_path / "stopped.log").read_text()[-3000:]
    assert not list(store.glob("_leases/teachers-*.json")), "SIGTERM left the lease behind"
    stop_s = time.time() - sent

    first = _start(store, env, tmp_path / "first.log")
    killed_at, trained_before = _stop_after(first, store, len(after_stop) + 2, signal.SIGKILL,
                                            tmp_path / "first.log")
    first_out = (tmp_path / "first.log").read_text()
    assert "is being written by" not in first_out and "taking over" not in first_out, first_out[-3000:]
    assert "resumed after epoch" in first_out, first_out[-3000:]
    lease_file = next(store.glob("_leases/teachers-*.json"))
    dead = json.loads(lease_file.read_text())
    assert dead["pid"] == first.pid and dead["expires"] > killed_at  # still held by the dead driver

    t0 = time.time()
    second = subprocess.run(_command(store), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    # It named the dead driver's lease, waited for it to expire, then took it over.
    met = re.search(rf"(\d\d:\d\d:\d\d) \S+ \[teachers\] \S+ is being written by host \S+ pid {first.pid} "
                    rf"\(teachers", out)
    assert met, out[-4000:]
    took = re.search(r"(\d\d:\d\d:\d\d) \S+ \[teachers\] (teachers-\w+): taking over the lease of host \S+ "
                     rf"pid {first.pid}", out)
    assert took, out[-4000:]
    waited = dead["expires"] - t0  # what the lease had left when the second driver started
    assert waited <= TTL + 1.0
    hms = [sum(int(x) * m for x, m in zip(g.split(":"), (3600, 60, 1))) for g in (met.group(1), took.group(1))]
    assert 0 <= hms[1] - hms[0] <= TTL + 2  # the wait itself: within the ttl (log clock, whole seconds)
    # The Ray Train run resumed from the dead driver's checkpoint: the epochs it finished were not trained
    # again (the one in flight when it died may be).
    key = took.group(2)
    # Three attempts, each from the one before's last checkpoint: a driver's epoch file may precede its
    # checkpoint, so at most the epoch in flight (or the one just written) is trained again.
    metrics = {p.name: json.loads(p.read_text()) for p in _epoch_files(store)}
    assert len(metrics) == EPOCHS
    starts = sorted({m["attempt_start_epoch"] for m in metrics.values()})
    assert len(starts) == 3, metrics
    _, b_start, c_start = starts
    assert b_start >= len(after_stop) and c_start >= len(trained_before), (starts, after_stop, trained_before)
    manifest = json.loads((store / key / "manifest.json").read_text())
    assert manifest["summary"]["writer"]["took_over"]["pid"] == first.pid
    # Every artifact verifies (size and sha256 of every file, as the store's reads check them).
    from hello_ray.store import open_store

    opened = open_store(str(store))
    finished = [a for a in opened.list_artifacts()]
    assert {a.split("-")[0] for a in finished} >= {"teachers", "select", "transfer", "evaluate"}
    for a in finished:
        for entry in opened.manifest(a)["files"]:
            opened.get_bytes(a, entry["name"])
    # Nothing the dead driver started outlives it (its raylet, GCS and workers follow it down).
    deadline = time.monotonic() + 30
    while _session_processes(first.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _session_processes(first.pid) and not _session_processes(stopped.pid)
    print(f"SIGTERM after {sorted(after_stop)}: exited in {stop_s:.1f} s, lease released; "
          f"driver killed after {sorted(trained_before)}; the second driver met its lease with {waited:.1f} s "
          f"left (ttl {TTL:g} s), waited {hms[1] - hms[0]} s (log clock) and took it over; epochs trained after "
          f"the kill: {c_start}-{EPOCHS}; finished in {time.time() - t0:.1f} s")
