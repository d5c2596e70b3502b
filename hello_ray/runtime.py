"""One place for process-level decisions: connecting to Ray, logging and progress output,
choosing the device, seeding."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from hello_ray.config import ComputeConfig

log = logging.getLogger("hello_ray.runtime")

# Every hello_ray record reads "12:03:04 hello_ray.<stage or module> message": one line, greppable.
LOG_FORMAT = "%(asctime)s %(name)s %(message)s"
LOG_DATEFMT = "%H:%M:%S"

# Read by DataContext's defaults when ray.data is imported, in every process (drivers, Tune
# trials, Train workers), which is how the driver's decision reaches executions in workers.
DISABLE_PROGRESS_ENV = "RAY_DATA_DISABLE_PROGRESS_BARS"
# Read by the driver each time it prints forwarded worker lines: "0" drops the ANSI colour codes
# around their "(RayTrainWorker pid=...)" prefixes.
COLOR_PREFIX_ENV = "RAY_COLOR_PREFIX"


# Libraries whose INFO lines drown a run's own (per Train report "Reporting training result",
# per checkpoint, per Ray Data execution its plan and "finished", per CLIP load its config steps):
# a demo log was 412 lines, 200 of them these. Their warnings and errors still show.
LIBRARY_LOGGERS = ("ray.train", "ray.data", "ray.tune", "open_clip")


DATA_LOG_LEVEL_ENV = "RAY_DATA_LOG_LEVEL"   # Ray Data re-applies its levels per execution from this


def quiet_library_logs(worker: bool = False) -> None:
    """Libraries' INFO records off, in this process (the driver, a Train worker or an actor).

    In a Ray worker the root logger goes to WARNING too: open_clip logs through the root logger
    and Ray Train V2 through loggers named by file path, both at INFO; our own ``hello_ray.*``
    worker loggers have their own level and handler (``worker_logger``). Ray Data resets its
    loggers' levels at each execution, from ``RAY_DATA_LOG_LEVEL`` (set for workers by
    ``ensure_ray`` off a terminal, and here for this process).
    """
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault(DATA_LOG_LEVEL_ENV, "WARNING")
    if worker:
        logging.getLogger().setLevel(logging.WARNING)


def setup_logging(level: int = logging.INFO) -> None:
    """The logging set-up of every entry point: ``hello_ray.*`` records at ``level`` on stdout,
    which Ray forwards and ``ray job logs`` keeps; other libraries' records only from WARNING.

    The root handler is added once (``basicConfig`` keeps one already there: pytest's, a
    notebook's, an earlier call's), so calling it again is harmless.
    """
    logging.basicConfig(format=LOG_FORMAT, datefmt=LOG_DATEFMT, stream=sys.stdout)
    logging.getLogger("hello_ray").setLevel(level)
    quiet_library_logs()


_SIGTERM_STOPS = False  # set by the entry points (stop_on_sigterm); ensure_ray re-installs it
_SIGTERM_AT: float | None = None  # when one arrived


def stop_on_sigterm() -> None:
    """SIGTERM (``ray job stop``, a pod's termination, ``kill``) ends a driver as an exception does:
    its ``finally`` blocks run, so the writer leases it holds are released at once and the next
    driver takes the key over without waiting out their ttl. Python's default ends the process
    without them, and ``ray.init`` puts its own handler in place (it logs and aborts), so
    :func:`ensure_ray` installs this one again after it. See :func:`sigterm_exit`."""
    import signal
    import threading

    global _SIGTERM_STOPS
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set there (a notebook's or a test's thread keeps the default)
    _SIGTERM_STOPS = True

    def _stop(signum: int, _frame: object) -> None:
        global _SIGTERM_AT
        _SIGTERM_AT = time.time()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _stop)


@contextlib.contextmanager
def sigterm_exit(prog: str) -> Iterator[None]:
    """An entry point's body under :func:`stop_on_sigterm`. A SIGTERM ends it with status 143 and one
    line on stderr, whatever exception it became on the way out (inside ``ray.get`` Ray turns it
    into its own ``SystemExit(1)``) once every ``finally`` below has run."""
    stop_on_sigterm()
    try:
        yield
    except BaseException:
        if _SIGTERM_AT is None:
            raise
        print(f"{prog}: stopped by SIGTERM after {time.time() - _SIGTERM_AT:.1f} s of clean-up; the "
              "leases it held are released, and the same command resumes the run", file=sys.stderr)
        raise SystemExit(143) from None


def source_root() -> Path | None:
    """The source checkout this hello_ray was imported from, or None when it is installed.

    A checkout has pyproject.toml beside the package; an installed wheel sits in site-packages,
    whose parent must never go on anyone's path.
    """
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def configure_progress(interactive: bool) -> dict[str, str]:
    """Ray Data progress bars and coloured prefixes only on a terminal; returns the env vars that
    carry the choice to workers.

    A bar redraws its line with carriage returns: one live line on a terminal, but in a file,
    ``ray job logs`` or a CI log each redraw is kept (thousands of lines per stage, interleaved
    from several executions). Off a terminal the driver's DataContext turns them off, and
    ``RAY_DATA_DISABLE_PROGRESS_BARS=1`` turns them off in workers that start their own Ray
    Data executions (Tune trials, Train workers), whose bars Ray would forward to the driver's
    output. The stages' own one-line-per-stage/epoch logs remain. The driver also stops
    wrapping forwarded worker lines in colour codes (``RAY_COLOR_PREFIX=0``), which a file
    shows as ``[36m`` noise. A value the user gave either variable is theirs and stays.
    """
    quiet = {DATA_LOG_LEVEL_ENV: os.environ.get(DATA_LOG_LEVEL_ENV, "WARNING")}  # the user's, else quiet
    if interactive:
        return quiet
    os.environ.setdefault(COLOR_PREFIX_ENV, "0")
    if DISABLE_PROGRESS_ENV in os.environ:  # DataContext read it; the job or shell passes it on
        return quiet
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return {DISABLE_PROGRESS_ENV: "1", **quiet}


def worker_env(interactive: bool, local: bool) -> dict[str, str]:
    """The env vars ``ensure_ray`` gives the job's workers (see configure_progress).

    A local Ray started from a source checkout also gets the checkout on PYTHONPATH, so its
    workers import this hello_ray. Nothing else needs it: an installed package is on every
    worker's path already, and under ``ray job submit --working-dir .`` Ray puts the working dir
    there itself.
    """
    env = configure_progress(interactive)
    root = source_root()
    if local and root is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return env


# Ray Train settings for a Ray this process starts on its own machine (a user's value wins). A
# worker's ``ray.train.report`` waits until the controller has polled the previous one, every
# 2 s by default: the demo's 2-5 s epochs and rows waited up to that long at each report. And
# the preemption watcher (one more actor per launch) watches for spot-node drains a single
# machine never has.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def ensure_ray(compute: ComputeConfig | None = None) -> None:
    """Connect to the cluster named by ``compute.address`` / ``RAY_ADDRESS``, or start a local Ray.

    Inside ``ray job submit`` the driver is already attached to the cluster (RAY_ADDRESS is
    set), so the same call joins it instead of starting a second Ray; the env vars given here
    are merged into the job's runtime env.
    """
    import ray

    if ray.is_initialized():
        return
    address = (compute.address if compute else "") or os.environ.get("RAY_ADDRESS") or None
    env = worker_env(interactive=sys.stdout.isatty(), local=address is None)
    # A local Ray keeps Ray's default dashboard (jobs, actors, progress for the user to watch)
    # unless compute.dashboard is off: its processes take about 6 s of a 2-core machine's start.
    # Ray reads include_dashboard only when it starts a Ray, never when it joins one.
    dashboard = None if compute is None or compute.dashboard else False
    ray.init(address=address, runtime_env={"env_vars": env} if env else None, log_to_driver=True,
             include_dashboard=dashboard)
    if _SIGTERM_STOPS:
        stop_on_sigterm()  # ray.init replaced the entry point's handler with its own
    if owns_ray():  # not a Ray joined on this machine: Ray Train reads these at each fit, in the driver
        for var, value in LOCAL_TRAIN_ENV.items():
            os.environ.setdefault(var, value)
    log.info("ray: %s", ray.cluster_resources())


def owns_ray() -> bool:
    """Whether this process started the Ray it is connected to, which then ends with it
    (``ray.init(address=None)`` joins a Ray already running on the machine instead, and a
    ``ray job submit`` driver or a Ray worker joins the cluster's)."""
    try:
        from ray._private.worker import global_worker

        node = global_worker.node if global_worker.connected else None
        return bool(node is not None and node.head)
    except Exception:  # noqa: BLE001 - a Ray without these internals: assume a shared Ray
        return False


def torch_device(use_gpu: bool) -> torch.device:
    """The single device decision of a worker: its GPU when asked for and present, else CPU."""
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """True where bf16 convolutions and matmuls have fast kernels: CUDA GPUs from Ampere on, CPUs
    whose oneDNN supports bf16 (AVX-512 and newer; fastest with AVX512-BF16 or AMX). Elsewhere bf16
    is emulated and slower than fp32: an AVX2-only EPYC labelled with RN50 4x slower in bf16."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8    # this GPU, not the current one
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch built without oneDNN
            return False
    return False


def auto_bf16(device: torch.device) -> bool:
    """What "auto" precision means everywhere (labelling, transfer): bf16 autocast on GPUs with
    native bf16; fp32 on CPUs, whose bf16 speed-up depends on the part and which keep fp32 results."""
    return device.type == "cuda" and native_bf16(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_logger(name: str) -> logging.Logger:
    """A stdout logger for code inside a Ray worker (Ray forwards worker stdout to the driver)."""
    wlog = logging.getLogger(name)
    if not wlog.handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
        wlog.addHandler(h)
        wlog.setLevel(logging.INFO)
        wlog.propagate = False
    return wlog
