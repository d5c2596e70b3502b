"""``ray job stop`` in the middle of the teachers' Ray Train stage, then the same ``ray job submit`` again:
the drill behind the README's "``ray job stop`` releases the lease at once".

Ray's job supervisor sends the entrypoint SIGTERM and, ``RAY_JOB_STOP_WAIT_TIME_S`` (3 s) later,
SIGKILL. The driver's SIGTERM handler (``runtime.stop_on_sigterm``) must release its writer lease
within that window, or the next submission waits out the lease's ttl. Checked as a user sees it: the
stop's wall time, the job STOPPED, no lease left, and the re-submission starts the stage without
meeting a lease, resumes the Train run from the stopped job's last checkpoint (no finished epoch
trained again) and succeeds, every artifact verifying. Opt-in (``HELLO_RAY_SLOW=1``): it starts its
own head (``ray start --head``), as the job-submit test does, and takes about three minutes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 8
TTL = 60.0  # long enough that a lease left behind would show as a wait in the re-submission


def _entrypoint(store: Path) -> list[str]:
    return ["python", "jobs/distill.py", "--preset", "smoke", f"store={store}", f"compute.lease_ttl_s={TTL:g}",
            f"teachers.epochs={EPOCHS}", f"teachers.lr_step={EPOCHS - 1}", "transfer.teacher_window=2-4",
            "transfer.n_teachers=2", "evaluate.strategies=[hard]", "evaluate.epochs=1", "refine.enabled=false",
            "select.mipc=4"]


def _epoch_files(store: Path) -> list[Path]:
    return sorted(store.glob("teachers-*/epochs/epoch_*.json"))


@pytest.mark.slow
def test_ray_job_stop_releases_the_lease_and_a_resubmission_resumes(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    port, dash = 6391, 8276
    address = f"--address=http://127.0.0.1:{dash}"
    store = tmp_path / "store"
    start = subprocess.run([ray_bin, "start", "--head", "--num-cpus=2", f"--port={port}", "--include-dashboard=true",
                            f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        submit = subprocess.run([ray_bin, "job", "submit", address, "--no-wait", "--working-dir", str(REPO), "--",
                                 *_entrypoint(store)], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        job = re.search(r"(raysubmit_\w+)", submit.stdout + submit.stderr).group(1)
        deadline = time.monotonic() + 400
        while len(_epoch_files(store)) < 2 and time.monotonic() < deadline:  # epoch 1's checkpoint is in
            time.sleep(0.2)
        assert len(_epoch_files(store)) >= 2, subprocess.run([ray_bin, "job", "logs", address, job], env=env,
                                                             capture_output=True, text=True).stdout[-4000:]
        trained = {p.name for p in _epoch_files(store)}
        t0 = time.monotonic()
        stop = subprocess.run([ray_bin, "job", "stop", address, job], env=env, capture_output=True, text=True,
                              timeout=120)
        stop_s = time.monotonic() - t0
        assert stop.returncode == 0, stop.stdout + stop.stderr
        status = subprocess.run([ray_bin, "job", "status", address, job], env=env, capture_output=True, text=True)
        assert "stopped" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr
        logs = subprocess.run([ray_bin, "job", "logs", address, job], env=env, capture_output=True, text=True).stdout
        by_stopped = {p.name for p in _epoch_files(store)}   # its workers may finish an epoch or two more
        left = list(store.glob("_leases/teachers-*.json"))
        assert not left, f"the stopped job left its lease: {left}\n{logs[-3000:]}"

        t1 = time.monotonic()
        again = subprocess.run([ray_bin, "job", "submit", address, "--working-dir", str(REPO), "--",
                                *_entrypoint(store)], env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
        again_s = time.monotonic() - t1
        out = again.stdout + again.stderr
        assert again.returncode == 0 and "succeeded" in out.lower(), out[-4000:]
        assert "is being written by" not in out and "taking over" not in out, out[-4000:]
        assert "resumed after epoch" in out, out[-4000:]
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
    metrics = {p.name: json.loads(p.read_text()) for p in _epoch_files(store)}
    assert len(metrics) == EPOCHS
    starts = sorted({m["attempt_start_epoch"] for m in metrics.values()})
    # Resumed from the stopped job's last checkpoint: at most its last epoch (written, perhaps not yet
    # checkpointed when SIGKILL followed) is trained again.
    assert len(starts) == 2 and starts[1] >= len(by_stopped) - 1, (starts, sorted(trained), sorted(by_stopped))
    from hello_ray.store import open_store

    opened = open_store(str(store))
    finished = opened.list_artifacts()
    assert {a.split("-")[0] for a in finished} >= {"teachers", "select", "transfer", "evaluate"}
    for a in finished:
        for entry in opened.manifest(a)["files"]:
            opened.get_bytes(a, entry["name"])
    print(f"ray job stop after {len(trained)} epoch files: stopped in {stop_s:.1f} s with {len(by_stopped)} "
          f"epochs written, no lease left; the re-submission resumed at epoch {starts[1] + 1} of {EPOCHS} and "
          f"succeeded in {again_s:.1f} s")
