"""Failures that another attempt would only repeat, and the Ray Train failure policy that
stops on them instead of spending ``compute.max_failures`` restarts.

A training stage restarts from its last checkpoint after a worker error: right for a lost node,
a killed process or a network hiccup, wrong for an error that the same inputs make again. Those
are *fatal* here:

- :class:`NonFiniteLoss`: the loss became inf/NaN (a learning rate too high, broken inputs);
  the restart resumes from the checkpoint before it and diverges the same way.
- :class:`DiskFull`: no space left where a file is written (``ENOSPC``); nothing frees it.
- :class:`hello_ray.data.errors.DataError`: the dataset is wrong (a corrupt image with
  ``data.on_corrupt=fail``, a bad shard, a null label); it is the same dataset next time. Not one
  that only says the storage stopped answering (the readers' retries gave up on a transient
  error): a restart may find it back.

Ray Train V2 wraps a worker's exception (``WorkerGroupError.worker_failures[rank]``, a
``UserExceptionWithTraceback`` around the original); :func:`fatal_cause` looks through that and
through exception chains and Ray Data task errors (which carry a DataError as text), for the
policy in :mod:`hello_ray.retry_policy`. No Ray and no torch here: the plain-PyTorch compute
modules raise these errors, and the Train controller process imports this module.
"""
from __future__ import annotations

import errno
import math
from typing import TYPE_CHECKING

from hello_ray.data.errors import DataError, exception_chain, find_data_error

if TYPE_CHECKING:
    import torch
    from ray.train import TrainingFailedError

_ENOSPC_TEXT = "No space left on device"
NO_PATH = "(path not given by the error)"


class FatalError(RuntimeError):
    """A failure that a restart from the last checkpoint would repeat: never retried."""


class NonFiniteLoss(FatalError):
    """The training loss is inf or NaN (``stage``, ``epoch``, ``step`` say where)."""

    def __init__(self, stage: str, epoch: int | None, step: int, value: float, hint: str = "") -> None:
        self.stage, self.epoch, self.step, self.value, self.hint = stage, epoch, step, value, hint
        at = f"epoch {epoch}, step {step}" if epoch is not None else f"step {step}"
        super().__init__(f"{stage}: the loss is {value} at {at}; training stopped"
                         + (f" ({hint})" if hint else "")
                         + ". Lower the learning rate or check the inputs of this stage")

    def __reduce__(self):  # the default would call __init__ with the message alone
        return (type(self), (self.stage, self.epoch, self.step, self.value, self.hint))


class DiskFull(FatalError):
    """No space left on the device holding ``path`` (``ENOSPC``)."""

    def __init__(self, path: str, detail: str = "") -> None:
        self.path, self.detail = path, detail
        super().__init__(f"no space left on the device holding {path}" + (f" ({detail})" if detail else "")
                         + ": free space there (or point the store elsewhere) and re-run; finished "
                         "epochs resume from their checkpoints")

    def __reduce__(self):
        return (type(self), (self.path, self.detail))


def check_finite(value: float, stage: str, epoch: int | None, step: int, hint: str = "") -> None:
    """Raise :class:`NonFiniteLoss` when ``value`` (a loss already on the host) is inf or NaN."""
    if not math.isfinite(value):
        raise NonFiniteLoss(stage, epoch, step, value, hint)


class LossLog:
    """Losses kept on the device, read back every ``every`` steps (and when asked): one host sync
    per read instead of one per step. A non-finite loss raises :class:`NonFiniteLoss` naming the
    stage, its own epoch (as the caller counts it) and step (1-based over the run), and ``hint``."""

    def __init__(self, device: "torch.device", every: int, stage: str, hint: str = ""):
        import torch

        self.every, self.stage, self.hint = max(1, every), stage, hint
        self.buf = torch.zeros(self.every, device=device)
        self.n = 0                      # losses in the buffer
        self.step = 0                   # steps so far (1-based for the last one)
        self.last = float("nan")

    def add(self, loss: "torch.Tensor", epoch: int) -> None:
        self.buf[self.n] = loss.detach()
        self.n += 1
        self.step += 1
        if self.n == self.every:
            self.read(epoch)

    def read(self, epoch: int) -> None:
        if not self.n:
            return
        values = self.buf[:self.n].tolist()
        first = self.step - self.n + 1
        for i, v in enumerate(values):
            check_finite(v, self.stage, epoch, first + i, self.hint)
        self.last, self.n = values[-1], 0


def disk_full_error(exc: BaseException, path: str) -> DiskFull | None:
    """``exc`` as a :class:`DiskFull` naming ``path`` when it is an ENOSPC error, else None."""
    if isinstance(exc, OSError) and (exc.errno == errno.ENOSPC or _ENOSPC_TEXT in str(exc)):
        return DiskFull(path, f"{type(exc).__name__}: {exc}")
    return None


def _unreachable(err: DataError) -> bool:
    """A DataError that says the storage did not answer (hello_ray.data.io_retry gave up on a
    transient I/O error): the data may be fine, and a restart later may find the storage back."""
    from hello_ray.data.io_retry import transient_markers

    text = str(err)
    return any(m in text for m in transient_markers())


def fatal_cause(exc: BaseException) -> Exception | None:
    """The fatal error ``exc`` is or carries (see the module docstring), else None."""
    for cur in exception_chain(exc):
        if isinstance(cur, FatalError) or (isinstance(cur, DataError) and not _unreachable(cur)):
            return cur
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:
            return DiskFull(cur.filename or NO_PATH, str(cur))
    for cur in exception_chain(exc):  # errors that crossed a Ray task boundary as text
        found = find_data_error(cur)
        if found is not None and not _unreachable(found):
            return found
        if _ENOSPC_TEXT in str(cur):
            return DiskFull(NO_PATH, _last_line(str(cur), _ENOSPC_TEXT))
    return None


def _last_line(text: str, needle: str) -> str:
    return next((ln.strip() for ln in reversed(text.splitlines()) if needle in ln), needle)


def worker_fatal(error: "TrainingFailedError") -> Exception | None:
    """The first fatal error among a failed run's workers (rank order), else None."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        found = fatal_cause(failures[rank])
        if found is not None:
            return found
    controller = getattr(error, "controller_failure", None)
    return fatal_cause(controller) if controller is not None else None

