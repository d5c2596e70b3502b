"""The teacher trajectory as models: the observer and the multi-weak teachers of a window.

The teachers stage (hello_ray/stages/teachers.py) writes the artifact read here, in the format
of hello_ray/formats/trajectory.py (``trajectory.json`` + ``epochs/epoch_{e:03d}.pt``).

A *teacher window* "a-b" with n teachers names n checkpoints evenly spaced from epoch a to
epoch b inclusive (METHOD.md: "11-51", 9 -> 11, 16, ..., 51).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from hello_ray.config import ConfigError, parse_window
from hello_ray.formats.trajectory import load_trajectory
from hello_ray.formats.weights import load_weights
from hello_ray.models.zoo import build_model

if TYPE_CHECKING:
    from hello_ray.store import Store


def _span(epochs: Iterable[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3, 5"``: the trained epochs, short enough for an error message."""
    es = sorted(set(epochs))
    if not es:
        return "none"
    runs, start, prev = [], es[0], es[0]
    for e in es[1:] + [None]:
        if e is not None and e == prev + 1:
            prev = e
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if e is not None:
            start = prev = e
    return ", ".join(runs)


def resolve_window(window: str, n: int, available_epochs: Iterable[int]) -> list[int]:
    """The ``n`` epochs of window ``"a-b"``: evenly spaced from a to b inclusive, rounded half up
    (``n=1`` takes b, the window's strongest checkpoint).

    Raises ValueError naming the window and the trained epochs when two teachers would be
    the same checkpoint (n larger than the window is wide) or an epoch was never trained.
    """
    lo, hi = parse_window(window)
    if n < 1:
        raise ValueError(f"teacher window {window!r}: n must be >= 1, got {n}")
    available = set(int(e) for e in available_epochs)
    if n == 1:
        epochs = [hi]  # a single teacher: the window's end, its strongest checkpoint
    else:
        step = (hi - lo) / (n - 1)
        epochs = [int(math.floor(lo + i * step + 0.5)) for i in range(n)]
    if len(set(epochs)) != len(epochs):
        raise ValueError(
            f"teacher window {window!r} with n={n} repeats checkpoints ({epochs}): the window "
            f"spans only {hi - lo + 1} epochs; widen it or lower n (trained epochs: {_span(available)})")
    missing = [e for e in epochs if e not in available]
    if missing:
        raise ValueError(
            f"teacher window {window!r} (n={n}) needs epochs {missing} that the trajectory does not "
            f"have (trained epochs: {_span(available)}); choose a window inside them")
    return epochs


def load_state(store: "Store", key: str, name: str) -> dict[str, torch.Tensor]:
    """A state_dict stored as ``name`` in artifact ``key``, on CPU (verified against the
    manifest as it is read; plain tensors only, see formats/weights.py)."""
    return load_weights(store.get_bytes(key, name), store.uri_for(key, name))


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _model_from(traj: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> nn.Module:
    model = build_model(traj["model"], int(traj["num_classes"]), int(traj["image_size"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{where}: does not fit a {traj['model']} with {traj['num_classes']} "
                         f"classes at {traj['image_size']} px: {e}") from None
    return model


def observer_file(traj: dict[str, Any], key: str, observer: str) -> str | None:
    """The trajectory file of the observer named by ``teachers.observer`` ('last', 'epoch:N'), or
    None for 'torchvision' (torchvision's weights); ConfigError when the trajectory cannot
    provide it (an untrained epoch; torchvision's ResNet-18 for another model or class count)."""
    if observer == "torchvision":
        if traj["model"] != "resnet18" or int(traj["num_classes"]) != 1000:
            raise ConfigError(
                "config key 'teachers.observer': 'torchvision' loads torchvision's ImageNet-1K ResNet-18, "
                f"which only fits teachers.model=resnet18 with 1000 classes (teachers artifact {key} is "
                f"{traj['model']!r} with {traj['num_classes']} classes); use 'last' or 'epoch:N'")
        return None
    trained = {int(e["epoch"]): e["file"] for e in traj["epochs"]}
    n = str(max(trained)) if observer == "last" and trained else observer.partition(":")[2]
    if not n.isdigit() or int(n) not in trained:
        raise ConfigError(f"config key 'teachers.observer': {observer!r} names no epoch of teachers artifact "
                          f"{key} (trained epochs: {_span(trained)}); use 'last' or epoch:N")
    return trained[int(n)]


def check_observer(store: "Store", key: str, observer: str) -> None:
    """On the driver, before actors load it: the trajectory can provide ``observer``."""
    observer_file(load_trajectory(store, key), key, observer)


def load_observer(store: "Store", key: str, device: torch.device | str = "cpu", *,
                  observer: str = "last") -> nn.Module:
    """The observer (``teachers.observer``) of teachers artifact ``key``, frozen, in eval mode, on
    ``device``: an epoch of the trajectory ('last', 'epoch:N'), or torchvision's ImageNet-1K
    weights of the trajectory's architecture ('torchvision'; downloaded, cached per node)."""
    traj = load_trajectory(store, key)
    name = observer_file(traj, key, observer)
    if name is None:
        try:
            model = build_model(traj["model"], 1000, int(traj["image_size"]), pretrained=True)
        except Exception as e:
            raise RuntimeError(f"teachers.observer=torchvision: could not load torchvision's ImageNet "
                               f"weights for {traj['model']} ({e}); this needs internet access on the "
                               "workers, or use teachers.observer=last") from e
        return _frozen(model).to(device)
    model = _model_from(traj, load_state(store, key, name), store.uri_for(key, name))
    return _frozen(model).to(device)


class TeacherEnsemble(nn.Module):
    """The multi-weak teachers of a window: ``forward(x [N,3,H,W] in [0,1]) -> logits [T, N, C]``.

    The teachers are frozen and always in eval mode (``train()`` does not switch their
    BatchNorm to batch statistics), so a parent module's ``.train()`` cannot change the
    labels. Gradients still flow to ``x``; callers that only need labels wrap the call in
    ``torch.inference_mode()``.
    """

    def __init__(self, teachers: list[nn.Module], epochs: list[int] | None = None):
        super().__init__()
        if not teachers:
            raise ValueError("TeacherEnsemble needs at least one teacher")
        self.teachers = nn.ModuleList(_frozen(t) for t in teachers)
        self.epochs = list(epochs) if epochs is not None else list(range(len(teachers)))

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        # The teachers' BatchNorm must keep its running statistics: stay in eval mode.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([t(x) for t in self.teachers])  # [T, N, C]

    @classmethod
    def from_trajectory(cls, store: "Store", key: str, window: str, n: int,
                        device: torch.device | str = "cpu") -> "TeacherEnsemble":
        """Load the ``n`` checkpoints of ``window`` from teachers artifact ``key`` onto ``device``."""
        traj = load_trajectory(store, key)
        files = {int(e["epoch"]): e["file"] for e in traj["epochs"]}
        epochs = resolve_window(window, n, files)
        teachers = [_model_from(traj, load_state(store, key, files[e]), store.uri_for(key, files[e]))
                    for e in epochs]
        return cls(teachers, epochs).to(device)
