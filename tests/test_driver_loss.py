"""The driver lost mid-run: ``python jobs/distill.py`` SIGKILLed in the middle of the teachers' Ray Train
stage, then the same command started again at once.

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
TTL = 30.0  # compute.lease_ttl_s: longer than the second driver's start (Ray, preflight), so it meets a live lease


def _command(store: Path) -> list[str]:
    return [sys.executable, "jobs/distill.py", "--preset", "smoke", f"store={store}",
            f"compute.lease_ttl_s={TTL:g}", "teachers.epochs=4", "teachers.lr_step=3",
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


def test_a_driver_killed_mid_stage_is_taken_over_resumed_and_leaves_no_ray(tmp_path):
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)  # each driver starts (and owns) its local Ray
    first_log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_command(store), cwd=REPO, env=env, stdout=first_log, stderr=subprocess.STDOUT,
                             start_new_session=True)  # its own session: what it started is findable
    try:
        deadline = time.monotonic() + 400
        while not _epoch_files(store) and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert _epoch_files(store), (tmp_path / "first.log").read_text()[-3000:]
        os.kill(first.pid, signal.SIGKILL)      # the driver alone; its Ray is left to fend for itself
        killed_at = time.time()
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
        first_log.close()
    trained_before = {p.name for p in _epoch_files(store)}
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
    metrics = {p.name: json.loads(p.read_text()) for p in _epoch_files(store)}
    assert len(metrics) == 4
    resumed = [m for m in metrics.values() if m["resumed_from"] is not None]
    assert resumed and min(m["attempt_start_epoch"] for m in resumed) >= len(trained_before)
    assert {f"epoch_{e:03d}.json" for e in range(1, len(trained_before))} <= {
        n for n, m in metrics.items() if m["resumed_from"] is None}
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
    assert not _session_processes(first.pid)
    print(f"driver killed after {sorted(trained_before)}; the second driver met its lease with {waited:.1f} s "
          f"left (ttl {TTL:g} s), waited {hms[1] - hms[0]} s (log clock) and took it over; epochs trained after "
          f"the kill: "
          f"{sorted(set(metrics) - trained_before)}; finished in {time.time() - t0:.1f} s")
