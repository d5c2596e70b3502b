"""The teachers artifact's format: the trajectory index, per-epoch checkpoints and metrics.

    trajectory.json            {"model", "num_classes", "image_size", "class_names",
                                "epochs": [{"epoch": e, "top1": acc, "loss", "train_acc",
                                            "file": "epochs/epoch_{e:03d}.pt"}]}
    epochs/epoch_{e:03d}.pt    the zoo model's state_dict after epoch e (CPU, fp32); epochs are 1-based
    epochs/epoch_{e:03d}.json  that epoch's metrics (top1, loss, train_acc, lr, seconds, ...)

``class_names`` are the readable names when the trajectory was trained: names are not in the
teachers' key (the weights depend on the label indices only), so they may since have changed;
the stages that show names (select, transfer) key on them and read them from the data.

Written by the teachers stage; read by the models (``hello_ray.models.ensemble``), the stages that
need a class count, and the report.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hello_ray.formats.jsonfile import read_json, require_finished, write_json

if TYPE_CHECKING:
    from hello_ray.store import Store

TRAJECTORY_FILE = "trajectory.json"
# What every reader of a trajectory may rely on.
# (No observer: which epoch observes is the choice of the stages that use one, teachers.observer
# in their keys, so another observer reuses the same trajectory.)
TRAJECTORY_FIELDS = ("model", "num_classes", "image_size", "class_names", "epochs")


def epoch_file(epoch: int) -> str:
    """Name of epoch ``epoch``'s checkpoint inside the teachers artifact."""
    return f"epochs/epoch_{epoch:03d}.pt"


def epoch_metrics_file(epoch: int) -> str:
    """Name of epoch ``epoch``'s metrics JSON inside the teachers artifact (beside its checkpoint)."""
    return f"epochs/epoch_{epoch:03d}.json"


def _check(trajectory: Any, where: str) -> None:
    if not isinstance(trajectory, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(trajectory).__name__}; "
                         "not a teachers trajectory")
    for field in TRAJECTORY_FIELDS:
        if field not in trajectory:
            raise ValueError(f"{where}: missing field {field!r}; not a teachers trajectory")


def write_trajectory(store: "Store", key: str, trajectory: dict[str, Any]) -> None:
    """``trajectory.json`` of teachers artifact ``key``; refused (ValueError) without the fields
    its readers rely on, so a reader never meets a trajectory it cannot use."""
    _check(trajectory, store.uri_for(key, TRAJECTORY_FILE))
    write_json(store, key, TRAJECTORY_FILE, trajectory)


def load_trajectory(store: "Store", key: str) -> dict[str, Any]:
    """``trajectory.json`` of teachers artifact ``key`` (ArtifactNotFound when it is unfinished)."""
    require_finished(store, key, "teachers")
    trajectory = read_json(store, key, TRAJECTORY_FILE)
    _check(trajectory, store.uri_for(key, TRAJECTORY_FILE))
    return trajectory
