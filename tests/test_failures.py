"""Fatal training failures: a non-finite loss, a full disk and a data error stop a stage at once,
named, without spending Ray Train's restarts (hello_ray/failures.py, hello_ray/retry_policy.py).

The loss checks of every training loop are tested on the plain-PyTorch compute (no Ray); the
no-retry policy on real Ray Train runs whose attempts are counted in a file each attempt appends to.
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


def counting_loop(config: dict) -> None:
    """A Train loop that records its attempt; the first attempt fails as an ordinary error does,
    every later one with a non-finite loss."""
    import ray.train

    path = _attempt_log(config["store"], config["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{ray.train.get_context().get_world_rank()}\n")
    if len(path.read_text().splitlines()) == 1:
        raise RuntimeError("a transient failure")
    raise NonFiniteLoss("teachers", 1, 3, float("nan"), "teachers.lr=1e+12")


def test_a_fatal_worker_error_is_not_retried(ray_local, tmp_path):
    """Real Ray Train, one worker: the first attempt's ordinary error is retried (so the counter
    sees restarts), the second attempt's NaN loss ends the run at once although
    compute.max_failures=2 allows another restart (without the policy: 3 attempts)."""
    from hello_ray import launcher
    from hello_ray.config import ComputeConfig
    from hello_ray.store import open_store

    store = open_store(str(tmp_path / "store"))
    key = "teachers-nan"
    log = _attempt_log(store, key)
    log.unlink(missing_ok=True)
    compute = ComputeConfig(num_workers=1, use_gpu=False, cpus_per_worker=0.5, max_failures=2)
    with pytest.raises(launcher.StageFailed, match=r"^teachers teachers-nan: the loss is nan at epoch 1, "
                       r"step 3; .*\(not retried: ") as info:
        launcher.fit("teachers", compute, store, key, counting_loop, {"store": store, "key": key}, {})
    assert isinstance(info.value.__cause__, NonFiniteLoss)
    assert len(log.read_text().splitlines()) == 2
    log.unlink()
