"""The one place that launches Ray Train (teachers, transfer, evaluate) and the resource check.

Every Ray Train stage is a per-worker loop plus data. What they share lives here, once:

- the driver side, :func:`fit`: scaling (``compute.num_workers`` x ``compute.cpus_per_worker``,
  one GPU each with ``compute.use_gpu``), the DDP backend (nccl on GPU, gloo on CPU), the run name
  (= the stage's artifact key, so a re-launched driver resumes the same run), the storage
  (``<store>/_ray/<key>``), failure and checkpoint retention, and a failed result turned into an
  error that names the stage and the key; a fatal error (:mod:`hello_ray.failures`: a non-finite
  loss, a full disk, a data error) is not retried (:mod:`hello_ray.retry_policy`);
- the worker side, :func:`worker_context`: rank, world size, the device, the seed, and the global
  batch split into per-worker batches;
- the resource check, :func:`check_resources`: what each stage holds at once, against what a local
  Ray has, before any stage starts;
- the fault drill, :class:`KillDrill`: a Train worker that waits, mid-epoch, for the tests to kill
  its OS process (SIGKILL), so the restart from the last checkpoint is proven on a real death.

Stages stay the owners of their loops: this module knows nothing about teachers or students.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, TypeVar

import torch

from hello_ray import placement
from hello_ray.config import ComputeConfig, ConfigError
from hello_ray.runtime import owns_ray, quiet_library_logs, seed_everything, torch_device

if TYPE_CHECKING:
    import ray.train

    from hello_ray.store import Store

log = logging.getLogger("hello_ray.launcher")

CHECKPOINTS_KEPT = 2  # the last finished epoch/row and the one before it (a torn upload leaves one)
DRILL_PREFIX = "_drill-"  # fault-drill markers live under their own (never finalized) key
DRILL_WAIT_S = 120.0  # how long a drilled worker waits for its killer before failing the drill
T = TypeVar("T")
PG_CLEANER_ENV = "HELLO_RAY_PG_CLEANER"  # 1/0: whether Train runs get Ray's placement-group cleaner


class StageFailed(RuntimeError):
    """A Ray Train stage gave up (after ``compute.max_failures`` restarts, or at once on a fatal
    error, which is then its ``__cause__``)."""


def _trainer_class() -> type:
    """TorchTrainer whose controller uses :class:`hello_ray.retry_policy.NoRetryOnFatal`, and
    that starts Ray Train's placement-group cleaner only where it can work.

    Ray Train V2 builds its failure policy inside ``fit`` from ``FailureConfig`` alone; the one
    seam is the keyword arguments it hands the controller it starts. The cleaner is a detached
    actor per run that asks the State API (served by the dashboard) every second whether the
    controller lives, and removes the run's placement group when the answer is no: see
    :func:`keep_placement_group_cleaner`.
    """
    from ray.train.torch import TorchTrainer

    from hello_ray.retry_policy import NoRetryOnFatal

    class Trainer(TorchTrainer):
        def _initialize_and_run_controller(self, **controller_init_kwargs):
            controller_init_kwargs["failure_policy"] = NoRetryOnFatal(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if keep_placement_group_cleaner():
                return callbacks
            return [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]

    return Trainer


def keep_placement_group_cleaner() -> bool:
    """Whether a Train run gets Ray's placement-group cleaner: only on a Ray with a dashboard.

    The cleaner learns whether the run's controller lives from the State API, which the dashboard
    serves. Without one (``include_dashboard=False``, as in the tests) it cannot know, and the
    address it falls back to (127.0.0.1:8265) may be *another* Ray's dashboard on the same host,
    which knows no such actor: the cleaner then removes the placement group of a live run, and
    Ray Train restarts it. Such a cleaner would also cost each launch a detached actor and a
    State API call a second. Its one job, freeing a dead controller's placement group, is done
    by Ray anyway when the driver's job ends, and a local Ray the driver started (the demo's, a
    laptop's) ends with the driver, so it gets none either. Only a driver can tell (a worker process
    reads the address Ray registers either way), so code that launches from a worker, such as a Tune trial,
    is handed the driver's answer in ``PG_CLEANER_ENV`` (``1``/``0``, which also overrides).
    """
    forced = os.environ.get(PG_CLEANER_ENV, "")
    if forced in ("0", "1"):
        return forced == "1"
    if owns_ray():  # a Ray this driver started ends with it, and its placement groups with it
        return False
    try:
        from ray._private.worker import get_dashboard_url

        return bool(get_dashboard_url())
    except Exception:  # not connected, or a Ray without this helper: keep Ray's default
        return True


def fit(stage: str, compute: ComputeConfig, store: "Store", key: str,
        loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any],
        datasets: Mapping[str, Any], *, split_datasets: bool = True, gpus_per_worker: float | None = None,
        backend: str | None = None) -> "ray.train.Result":
    """Run ``loop`` on ``compute.num_workers`` Ray Train workers under the run name ``key``.

    ``loop_config`` reaches every worker as is (it must not read argv or the environment).
    ``split_datasets=False`` gives every worker the whole of each dataset (evaluate's queue mode).
    ``gpus_per_worker`` / ``backend`` override the one GPU each worker holds and the process group
    (nccl on GPUs, else gloo): evaluate's queue mode gives each worker a share of a GPU, and
    workers sharing a GPU cannot form an NCCL group (it only needs a barrier: gloo).
    Raises :class:`StageFailed` naming the stage and key when the run fails for good.
    """
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from hello_ray.failures import NO_PATH, DiskFull, worker_fatal

    storage_path, filesystem = store.ray_storage()
    trainer = _trainer_class()(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=compute.num_workers, use_gpu=compute.use_gpu,
                                     resources_per_worker={"CPU": compute.cpus_per_worker,
                                                           **({"GPU": gpus_per_worker} if compute.use_gpu
                                                              and gpus_per_worker else {})}),
        torch_config=TorchConfig(backend=backend or ("nccl" if compute.use_gpu else "gloo")),
        run_config=RunConfig(name=key, storage_path=storage_path, storage_filesystem=filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                             failure_config=FailureConfig(max_failures=compute.max_failures)),
        datasets=dict(datasets),
        dataset_config=DataConfig(datasets_to_split="all" if split_datasets else []),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        fatal = worker_fatal(e)
        if isinstance(fatal, DiskFull) and fatal.path == NO_PATH:
            # Our own writes name their file; a bare ENOSPC comes from Ray persisting a checkpoint.
            fatal = DiskFull(f"{storage_path}/{key} (Ray Train's checkpoints of this run)", fatal.detail)
        if fatal is not None:
            what = str(fatal).removeprefix(f"{stage}: ")  # NonFiniteLoss names the stage itself
            raise StageFailed(f"{stage} {key}: {what} (not retried: a restart from the last "
                              "checkpoint would fail the same way)") from fatal
        raise StageFailed(f"{stage} {key}: Ray Train gave up after compute.max_failures="
                          f"{compute.max_failures} restarts{_storage_hint(store, e)}: {e}") from e
    if result.error is not None:
        raise StageFailed(f"{stage} {key}: Ray Train run failed{_storage_hint(store, result.error)}: "
                          f"{result.error}") from result.error
    return result


def _storage_hint(store: "Store", error: BaseException) -> str:
    """Where the run's storage is, and, for an error that reads as a network failure, that the
    S3 endpoint did not answer: pyarrow's messages (Ray Train's checkpoints) name neither."""
    from hello_ray.data.io_retry import transient_markers

    if not hasattr(store, "bucket"):
        return f" (store {store.uri})"
    where = f" (store {store.uri} at S3 endpoint {store.endpoint_url or 'AWS default'}"
    text = str(error)
    if any(m in text for m in transient_markers()) or "cannot reach the endpoint" in text:
        where += (f": the endpoint did not answer within {store.max_attempts} attempts of "
                  f"{store.timeout:g} s; check that it is up, or raise s3_timeout / s3_max_attempts")
    return where + ")"


@dataclass(frozen=True)
class WorkerContext:
    """What a Ray Train worker knows about its place in the run."""
    rank: int
    world: int
    device: torch.device
    per_worker_batch: int   # the global batch split across ranks (DDP averages the gradients)


def worker_context(use_gpu: bool, global_batch: int, seed: int) -> WorkerContext:
    """Inside a Ray Train worker: rank, world, device; seeds every RNG with ``seed``.

    The same seed on every rank gives every rank the same initial weights (DDP also broadcasts
    rank 0's). ``check_batch_split`` ran on the driver, so the split cannot be empty here.
    """
    import ray.train

    quiet_library_logs(worker=True)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    placement.record(placement.TRAIN_WORKERS, key=ctx.get_experiment_name())  # run name = artifact key
    seed_everything(seed)
    return WorkerContext(rank=rank, world=world, device=torch_device(use_gpu),
                         per_worker_batch=max(1, global_batch // world))


def checkpoint_bytes(checkpoint: "ray.train.Checkpoint", name: str) -> bytes:
    """The bytes of one file of a Ray checkpoint, read straight from its storage.

    Not ``Checkpoint.as_directory()``: for a remote checkpoint Ray downloads into one temporary
    folder per checkpoint, shared by every process of the node, and a second process that comes
    after the first download re-downloads into that folder while the first still reads it (a
    resumed run's workers all load the same checkpoint). Seen here as a torch "file read failed"
    on a Train worker resuming from S3, which ended the run; reported upstream as
    ray-project/ray#48726 (open as of Ray 2.60).
    """
    from hello_ray.data.sources import read_all

    return read_all(checkpoint.filesystem, f"{checkpoint.path.rstrip('/')}/{name}")


def load_checkpoint(checkpoint: "ray.train.Checkpoint", name: str, key: str,
                    map_location: Any = "cpu") -> Any:
    """The state a Train loop saved as ``name`` in its Ray checkpoint (under ``<store>/_ray/<key>``):
    plain tensors, dicts, lists and numbers only; a pickle that would run code is refused."""
    from hello_ray.formats.weights import load_weights

    return load_weights(checkpoint_bytes(checkpoint, name),
                        f"Ray checkpoint {name} of {key} ({checkpoint.path})", map_location)


def report(metrics: dict[str, Any], store: "Store", checkpoint_dir: str | None = None) -> None:
    """``ray.train.report`` with the checkpoint in ``checkpoint_dir`` (None: metrics only).

    On an S3 store the checkpoint goes up through the store's boto3 client into the folder Ray
    Train names (its run storage), not through pyarrow: a pyarrow multipart upload fails when S3
    throttles its CompleteMultipartUpload, and teachers' checkpoints are multipart-sized.
    """
    import ray.train

    if checkpoint_dir is None:
        ray.train.report(metrics)
        return
    checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
    upload = getattr(store, "upload_ray_dir", None)
    if upload is None or not _takes_upload_fn():
        ray.train.report(metrics, checkpoint=checkpoint)
        return

    def upload_fn(ckpt: "ray.train.Checkpoint", dir_name: str) -> "ray.train.Checkpoint":
        storage = ray.train.get_context().get_storage()
        dest = f"{storage.experiment_fs_path}/{dir_name}"
        upload(ckpt.path, dest)
        return ray.train.Checkpoint(dest, filesystem=storage.storage_filesystem)

    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=upload_fn)


def _takes_upload_fn() -> bool:
    """Whether this Ray's ``ray.train.report`` takes ``checkpoint_upload_fn`` (Train V2, 2.50+)."""
    import inspect

    import ray.train

    return "checkpoint_upload_fn" in inspect.signature(ray.train.report).parameters


# ---------------------------------------------------------------------------- fault drill (tests)

@dataclass(frozen=True)
class KillDrill:
    """On a run's first attempt, after the first batch of ``epoch``, rank ``rank`` writes its pid
    to ``<store>/_drill-<key>/kill_at_epoch_<epoch>.pid`` and waits for someone to SIGKILL it
    (tests/faults.py ``KillOnMarker``). The other ranks go on into the next collective, where
    Ray Train's teardown of the failed worker group finds them."""
    epoch: int
    rank: int = 0

    def marker(self, key: str) -> tuple[str, str]:
        """(store key, file name) of the pid marker; its presence means the drill has fired."""
        return f"{DRILL_PREFIX}{key}", f"kill_at_epoch_{self.epoch:03d}.pid"


def drilled(batches: Iterable[T], drill: KillDrill | None, store: "Store", key: str, epoch: int,
            rank: int) -> Iterable[T]:
    """``batches``, or, in the drill's epoch, its first batch then the drill's stop."""
    if drill is None or drill.epoch != epoch:
        return batches
    return _kill_after_first_batch(batches, drill, store, key, rank)


def _kill_after_first_batch(batches: Iterable[T], drill: KillDrill, store: "Store", key: str,
                            rank: int) -> Iterator[T]:
    import torch.distributed as dist

    it = iter(batches)
    yield next(it)
    fire = not drill_fired(drill, store, key)
    # Every rank's last report (the previous epoch's checkpoint) must have reached the controller
    # first: a report still queued in a killed process is lost, and its checkpoint with it.
    _reports_taken()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if fire and rank == drill.rank:
        wait_to_be_killed(drill, store, key, rank)
    yield from it


def drill_fired(drill: KillDrill, store: "Store", key: str) -> bool:
    """Whether the drill's marker is in the store (it fires on a run's first attempt only)."""
    mkey, name = drill.marker(key)
    return name in store.list_files(mkey)  # [] while the marker folder does not exist


def wait_to_be_killed(drill: KillDrill, store: "Store", key: str, rank: int) -> None:
    """Write this process's pid as the drill's marker and wait for the SIGKILL."""
    mkey, name = drill.marker(key)
    store.put_bytes(mkey, name, str(os.getpid()).encode())
    time.sleep(DRILL_WAIT_S)
    raise RuntimeError(f"fault drill: rank {rank} (pid {os.getpid()}) of {key} was not killed "
                       f"within {DRILL_WAIT_S:g} s of writing {mkey}/{name}")


def _reports_taken(timeout_s: float = 30.0) -> None:
    """Wait until Ray Train's controller has taken this worker's reports (Train V2 keeps the
    last one in a one-slot queue that it polls every few seconds)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        pending = get_train_context().execution_context.result_queue
    except (ImportError, AttributeError):  # another Ray layout: wait out a few poll intervals
        time.sleep(6.0)
        return
    deadline = time.monotonic() + timeout_s
    while not pending.empty() and time.monotonic() < deadline:
        time.sleep(0.1)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A reproducible seed per (run seed, epoch, rank): different views per rank and epoch."""
    return seed * 100_003 + epoch * 1_009 + rank


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over the DDP ranks (a copy; the input itself on one worker)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def worker_logger(stage: str) -> logging.Logger:
    """The stage's logger inside a Ray worker (``hello_ray.<stage>``, to stdout, which Ray forwards)."""
    from hello_ray.runtime import worker_logger as _wl

    return _wl(f"hello_ray.{stage}")


# ---------------------------------------------------------------------------- checks (driver, no compute)

def train_resources(compute: ComputeConfig, cpus_per_task: float) -> dict[str, float]:
    """What a Ray Train stage holds at once: its workers, plus one data task feeding them."""
    return {"CPU": compute.num_workers * compute.cpus_per_worker + cpus_per_task,
            "GPU": float(compute.num_workers) if compute.use_gpu else 0.0}


def check_batch_split(key: str, global_batch: int, compute: ComputeConfig) -> None:
    """A global batch must give every Train worker at least one image."""
    if global_batch < compute.num_workers:
        raise ConfigError(f"config key '{key}': {global_batch} cannot be split over compute.num_workers="
                          f"{compute.num_workers} Train workers; use at least one image per worker")


def check_resources(asks: Mapping[str, Mapping[str, float]], compute: ComputeConfig) -> None:
    """Refuse, on a local Ray, a stage whose ask could never be scheduled; name the stage.

    ``asks``: stage -> {"CPU": ..., "GPU": ...} that the stage holds at once, including the CPU its
    Ray Data read/decode tasks need next to the Train workers or actors (without it the first
    batch waits for data forever). A real cluster (an address) may autoscale into an ask, so only
    a local Ray is checked.
    """
    import ray

    if compute.address or os.environ.get("RAY_ADDRESS"):
        return
    have = ray.cluster_resources()
    for stage, ask in asks.items():
        for kind in ("CPU", "GPU"):
            need, got = float(ask.get(kind, 0.0)), float(have.get(kind, 0.0))
            if need > got + 1e-9:
                hint = ("set compute.use_gpu=false or fewer workers/actors" if kind == "GPU" else
                        "lower compute.num_workers / compute.cpus_per_worker / the stage's actor_cpus, "
                        "or data.cpus_per_task")
                raise ConfigError(f"stage '{stage}' asks for {need:g} {kind} at once (its Train workers "
                                  f"or actors plus the data tasks feeding them) but this local Ray has "
                                  f"{got:g}; it would wait forever: {hint}")
