"""Fatal training failures: a non-finite loss, a full disk and a data error stop a stage at once,
named, without spending Ray Train's restarts (hello_ray/failures.py, hello_ray/retry_policy.py).

The loss checks of every training loop are tested on the plain-PyTorch compute (no Ray); the
no-retry policy on real teachers runs whose attempts are counted in a file each attempt appends to.
"""
from __future__ import annotations

import errno
import hashlib
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hello_ray.data.errors import CorruptImageError, DataError
from hello_ray.failures import DiskFull, NonFiniteLoss, fatal_cause, worker_fatal


# ---------------------------------------------------------------------------- every loop checks its loss

def _nan_linear(n_in: int, n_out: int) -> nn.Module:
    """A linear layer with one NaN weight: the first forward pass gives a NaN loss."""
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    return layer


class _MeanColour(nn.Module):
    """[N,3,H,W] -> [N,C] through the mean colour (a stand-in for a zoo model)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head(x.float().mean(dim=(2, 3)))


def _teachers_run():
    from hello_ray.stages import teachers_core

    batches = [{"image": torch.full((4, 8, 8, 3), 100, dtype=torch.uint8), "label": torch.tensor([0, 1, 0, 1])}]
    model = _MeanColour(_nan_linear(3, 2))
    teachers_core.train_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"),
                              epoch=7)


def _transfer_run():
    from hello_ray.stages.transfer_core import transfer_step

    class Window(nn.Module):  # two fixed "teachers": logits [T=2, N, C=2]
        def forward(self, x):
            return torch.stack([x.mean(dim=(2, 3))[:, :2], -x.mean(dim=(2, 3))[:, :2]])

    projector = _MeanColour(_nan_linear(3, 2))
    transfer_step(projector, Window(), torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]),
                  torch.optim.AdamW(projector.parameters(), lr=1e-3), ce_weight=0.1, epoch=2, step=5)


def _evaluate_run():
    from hello_ray.labels import HardLabels
    from hello_ray.stages.evaluate_core import TrainSettings, train_student

    model = _MeanColour(_nan_linear(3, 2))
    s = TrainSettings(epochs=1, batch_size=4, lr=1e-3, weight_decay=0.0, cutmix_alpha=0.0, loss="mse_ce",
                      ce_weight=0.025, temperature=4.0, image_size=8)
    train_student(model, torch.full((8, 3, 8, 8), 100, dtype=torch.uint8), torch.arange(8) % 2,
                  HardLabels(np.zeros(1), 2, 1), s, seed=0, device=torch.device("cpu"), row="distilled|x|hard|0")


def _refine_run():
    from hello_ray.stages.refine_core import refine_images

    head = _nan_linear(3, 4)
    refine_images(lambda x: head(x.mean(dim=(2, 3))), torch.rand(2, 3, 8, 8), steps=3, lr=0.01, factor=2)


@pytest.mark.parametrize("run,stage,where", [
    (_teachers_run, "teachers", "epoch 7, step 1"),
    (_transfer_run, "transfer", "epoch 2, step 5"),
    (_evaluate_run, "evaluate", "epoch 1, step 1"),
    (_refine_run, "refine", "step 1"),
], ids=["teachers", "transfer", "evaluate", "refine"])
def test_every_training_loop_stops_on_a_nan_loss_naming_stage_and_step(run, stage, where):
    with pytest.raises(NonFiniteLoss, match=f"^{stage}: the loss is nan at {where}") as info:
        run()
    assert info.value.stage == stage
    if stage == "evaluate":
        assert "row distilled|x|hard|0" in str(info.value)


# ---------------------------------------------------------------------------- classification

def test_fatal_cause_finds_fatal_errors_through_wrappers_and_text():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    # A real ENOSPC: /dev/full refuses every write with it.
    try:
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
    except OSError as e:
        enospc = e
    assert enospc.errno == errno.ENOSPC
    assert isinstance(fatal_cause(enospc), DiskFull)
    nan = NonFiniteLoss("teachers", 3, 9, float("nan"))
    wrapped = UserExceptionWithTraceback(nan, "Traceback ...")
    assert fatal_cause(wrapped) is nan
    try:  # a DataError that crossed a Ray Data task boundary comes back as text only
        raise RuntimeError("ray.exceptions.RayTaskError(UserCodeException): ...\n"
                           "hello_ray.data.errors.CorruptImageError: corrupt image /d/x.jpg: truncated")
    except RuntimeError as e:
        assert isinstance(fatal_cause(e), CorruptImageError)
    try:
        try:
            raise enospc
        except OSError as e:
            raise RuntimeError("checkpoint upload failed") from e
    except RuntimeError as e:
        assert isinstance(fatal_cause(e), DiskFull)
    assert fatal_cause(RuntimeError("fault drill: failing epoch 2")) is None
    # The readers gave up on a storage that stopped answering: a restart may find it back.
    assert fatal_cause(DataError("s3://b/train-0.parquet: the storage did not answer after 4 attempts "
                                 "(...): AWS Error NETWORK_CONNECTION during GetObject")) is None
    assert fatal_cause(ConnectionResetError("peer went away")) is None
    group = WorkerGroupError("2 workers failed", {1: UserExceptionWithTraceback(nan, "tb"),
                                                  0: UserExceptionWithTraceback(RuntimeError("gloo"), "tb")})
    assert worker_fatal(group) is nan
    assert worker_fatal(WorkerGroupError("x", {0: RuntimeError("lost node")})) is None


def test_fatal_errors_survive_pickling():
    """Ray sends worker errors to the controller and the driver as pickles."""
    import pickle

    for err in (NonFiniteLoss("transfer", 1, 2, float("inf"), "transfer.lr=5"), DiskFull("/x/y.pt", "ENOSPC")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)


def test_atomic_write_names_the_file_on_enospc(tmp_path):
    """The store's writes turn a bare ENOSPC (no file name in it) into DiskFull naming the path."""
    from hello_ray.store import atomic_write

    def fill(f):
        with open("/dev/full", "wb") as full:  # the write fails as a full disk fails it
            full.write(b"x" * 4096)
            full.flush()

    target = tmp_path / "epochs" / "epoch_001.pt"
    with pytest.raises(DiskFull, match=f"device holding {target}"):
        atomic_write(target, fill)
    assert list(target.parent.iterdir()) == []  # no temp file left behind


# ---------------------------------------------------------------------------- real Ray Train runs

def _attempt_log(store, key: str) -> Path:
    """Where the counting loops below append one line per attempt (workers share this machine)."""
    digest = hashlib.sha256(f"{store.uri}|{key}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "hello_ray_test_attempts" / digest


# ---------------------------------------------------------------------------- the teachers stage

def _teachers_cfg(store_uri: str, *extra: str):
    from hello_ray.config import load_config

    # The smallest real teachers run: one Train worker, ShuffleNet (1.5 MB per epoch file), 20
    # digits per class; compute.max_failures=2 so that a retry would have room to happen.
    return load_config("smoke", overrides=[f"store={store_uri}", "compute.num_workers=1",
                                           "compute.cpus_per_worker=0.5", "compute.max_failures=2",
                                           "teachers.model=shufflenet_v2_x0_5", "data.max_per_class=20",
                                           *extra])


def counting_teachers_loop(config: dict) -> None:
    """The real teachers loop, logging its attempt and any fatal error it raises to the attempt
    log (installed with monkeypatch). Tests count the fatal errors, not the attempts: an attempt
    Ray retries for its own reasons (a worker lost on this shared machine) is no fault of ours."""
    from hello_ray.stages.teachers import train_loop_per_worker  # the real one, in this worker

    path = _attempt_log(config["store"], config["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("attempt\n")
    try:
        train_loop_per_worker(config)
    except Exception as e:
        fatal = fatal_cause(e)  # as the policy will see it (Ray's own ENOSPC is a bare OSError)
        if fatal is not None:
            with open(path, "a") as f:
                f.write(f"fatal {type(fatal).__name__}\n")
        raise


def _events(store, key: str) -> list[str]:
    return _attempt_log(store, key).read_text().splitlines()


def _run_teachers(cfg, store) -> str:
    """The teachers stage as pipeline.run_stage runs it (under the key's lease, released however
    it ends); returns the key."""
    from hello_ray.pipeline import Run
    from hello_ray.stages import teachers

    run = Run(cfg, store)
    with run.writing(teachers, {}) as key:
        assert key, "the artifact is already finished"
        run.done(teachers, {}, teachers.run(cfg, store, key, {}))
    return run.keys["teachers"]


def test_teachers_stop_at_the_first_nan_loss_without_a_retry(ray_local, tmp_path, monkeypatch):
    """A learning rate of 1e12 makes the second step's loss NaN. The kill drill SIGKILLs the
    first attempt's worker after its first step, which Ray Train retries (so the attempt log sees
    restarts); the second attempt's NaN loss ends the stage at once, named, although
    compute.max_failures=2 leaves a restart (without the policy a third attempt meets the NaN
    again). Needs a real Ray Train run: the error has to cross the worker, the controller's
    policy and launcher.fit."""
    from faults import KillOnMarker

    from hello_ray import launcher
    from hello_ray.pipeline import Run
    from hello_ray.stages import teachers
    from hello_ray.store import open_store

    cfg = _teachers_cfg(str(tmp_path / "store"), "teachers.lr=1e12")
    store = open_store(cfg.store)
    monkeypatch.setattr(teachers, "train_loop_per_worker", counting_teachers_loop)
    drill = launcher.KillDrill(epoch=1, rank=0)
    run = Run(cfg, store)
    with run.writing(teachers, {}) as key:
        killer = KillOnMarker(store, key, drill)
        try:
            with pytest.raises(launcher.StageFailed, match=rf"^teachers {key}: the loss is nan at epoch 1, "
                               r"step 2; training stopped \(teachers.lr=1e\+12\).*\(not retried: ") as info:
                teachers.run(cfg, store, key, {}, drill=drill)
        finally:
            killer.stop()
    assert isinstance(info.value.__cause__, NonFiniteLoss)
    assert killer.pid is not None  # the first attempt's worker was killed ...
    events = _events(store, key)
    assert events.count("attempt") >= 2  # ... and retried
    assert events.count("fatal NonFiniteLoss") == 1 and events[-1] == "fatal NonFiniteLoss"
    assert not store.exists(key)
    _attempt_log(store, key).unlink()


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs mounted for the test (a real full disk); skipped where mount is not allowed."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves ``leave`` bytes free on ``disk``."""
    import os

    st = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_a_full_store_fails_named_without_retries_and_resumes_clean(ray_local, small_disk, monkeypatch):
    """The store on a small tmpfs. With 1 MB left the first 1.5 MB epoch file cannot be written;
    with 2.3 MB left it can, but Ray Train's 3 MB checkpoint of that epoch cannot (a half-copied
    checkpoint stays behind). Each time the stage fails with DiskFull naming where, after one
    attempt. With the space back, the re-run trains and finalizes: every file of the artifact is
    whole (sha256 as listed, loadable), no temp file is left, and the half-written checkpoint was
    not resumed from (the re-run starts at epoch 1). Needs real Ray Train runs and a real full disk."""
    from hello_ray import launcher
    from hello_ray.data.demo import ensure_demo_dataset
    from hello_ray.formats.trajectory import load_trajectory
    from hello_ray.stages import teachers
    from hello_ray.store import open_store

    cfg = _teachers_cfg(str(small_disk / "store"), "teachers.epochs=2", "transfer.teacher_window=1-2",
                        "transfer.n_teachers=2", "sweep.windows=[1-2]", "sweep.n_teachers=2")
    store = open_store(cfg.store)
    ensure_demo_dataset(store)  # the dataset lives in the store too: written before the disk fills
    monkeypatch.setattr(teachers, "train_loop_per_worker", counting_teachers_loop)
    root = small_disk / "store"
    for leave, where in ((1 << 20, rf"{root}/teachers-\w+/epochs/epoch_001.pt"),
                         (2_300_000, rf"{root}/_ray/teachers-\w+ \(Ray Train's checkpoints of this run\)")):
        filler = _fill(small_disk, leave)
        with pytest.raises(launcher.StageFailed, match=f"no space left on the device holding {where}.*"
                           r"\(not retried") as info:
            _run_teachers(cfg, store)
        assert isinstance(info.value.__cause__, DiskFull)
        filler.unlink()  # the space comes back
    key = str(info.value).split()[1].rstrip(":")
    assert _events(store, key).count("fatal DiskFull") == 2  # once per failed run: never retried
    (half,) = (root / "_ray" / key).rglob("state.pt")  # Ray's torn copy of the epoch-1 checkpoint
    with pytest.raises(Exception):
        torch.load(half, weights_only=True)

    assert _run_teachers(cfg, store) == key
    manifest = store.manifest(key)
    names = {f["name"] for f in manifest["files"]}
    assert {"epochs/epoch_001.pt", "epochs/epoch_002.pt", "trajectory.json"} <= names
    on_disk = {p.relative_to(root / key).as_posix() for p in (root / key).rglob("*") if p.is_file()}
    assert on_disk == names | {"manifest.json"}  # no .partial file survived the failures
    for f in manifest["files"]:
        assert hashlib.sha256(store.get_bytes(key, f["name"])).hexdigest() == f["sha256"]
    for e in load_trajectory(store, key)["epochs"]:
        torch.load(root / key / e["file"], weights_only=True)
    assert store.manifest(key)["summary"]["attempt_start_epochs"] == [1]
    assert _events(store, key).count("fatal DiskFull") == 2
    _attempt_log(store, key).unlink()
