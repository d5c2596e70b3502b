"""LoRA knowledge transfer: the loss, one training step, label fidelity, and the Ray Train stage.

The CLIP is the tiny random-init one. open_clip's own ResNet init zeroes the last BN of every
Bottleneck (which would zero the gradient of that block's conv LoRA); hello_ray's random-init
stand-in gives those BNs unit weights (hello_ray/models/clip.py, v2), so LoRA tensors of the
stem, the residual blocks and the head must all move -- and no other tensor may.
"""
from __future__ import annotations

import json

import pytest
from builders import write_teachers
import torch
from torch import nn

from hello_ray.models.clip import RANDOM_INIT, TINY_CLIP
from hello_ray.models.ensemble import TeacherEnsemble
from hello_ray.models.projector import Projector
from hello_ray.models.zoo import build_model
from hello_ray.stages.transfer_core import (FIDELITY_KEYS, fidelity_counts, finish_fidelity, label_fidelity,
                                       lora_parameters, transfer_loss, transfer_step)

SIZE = 32
# Two Train workers on the 2-CPU test Ray: half a CPU each leaves room for Ray Data's read tasks.
RAY_CPUS = ["compute.num_workers=2", "compute.cpus_per_worker=0.5"]
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def tiny_teachers(n: int, num_classes: int, image_size: int, model: str = "resnet18") -> list[nn.Module]:
    """n zoo models at (seeded) random init: distinct, fixed functions to transfer from."""
    out = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        out.append(build_model(model, num_classes, image_size).eval())
    return out


def write_tiny_trajectory(store, cfg, epochs: int = 3) -> str:
    """A finished teachers artifact in the documented trajectory format (hello_ray/formats/trajectory.py):
    one zoo state_dict per epoch + trajectory.json, then the manifest. Returns its key."""
    from hello_ray.data.sources import load_train_val

    train, _ = load_train_val(cfg.data, store)
    # The same models as tiny_teachers(epochs, ...): seeds 1000, 1001, ...
    return write_teachers(store, "resnet18", list(train.class_names), cfg.data.image_size,
                          [1000 + i for i in range(epochs)], config={"tiny_trajectory": epochs})


@pytest.fixture(scope="module")
def teachers() -> TeacherEnsemble:
    return TeacherEnsemble(tiny_teachers(3, len(CLASS_NAMES), SIZE), epochs=[1, 2, 3])


def _projector(conv_rank: int = 4, head_rank: int = 8) -> Projector:
    torch.manual_seed(0)
    return Projector.from_clip(TINY_CLIP, RANDOM_INIT, CLASS_NAMES).add_lora(conv_rank, head_rank)


def _batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=g), torch.randint(0, len(CLASS_NAMES), (n,), generator=g)


@pytest.mark.parametrize("t,n,c,w", [(1, 4, 3, 0.0), (3, 5, 10, 0.1), (9, 2, 7, 1.0)])
def test_transfer_loss_is_mean_teacher_mse_plus_weighted_ce(t, n, c, w):
    g = torch.Generator().manual_seed(t * 100 + n)
    p, tl = torch.randn(n, c, generator=g), torch.randn(t, n, c, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    loss, parts = transfer_loss(p, tl, y, w)
    per_teacher = torch.stack([nn.functional.mse_loss(p, tl[i]) for i in range(t)]).mean()
    expected = per_teacher + w * nn.functional.cross_entropy(p, y)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert parts["mse"] == pytest.approx(float(per_teacher), rel=1e-5)
    with pytest.raises(ValueError, match="same classes"):
        transfer_loss(p, tl[..., :-1], y, w)


def test_transfer_steps_lower_the_loss_and_change_only_lora(teachers):
    projector = _projector()
    before_state = {k: v.clone() for k, v in projector.state_dict().items()}
    lora_keys = {k for k in before_state if ".lora_A." in k or ".lora_B." in k}
    assert lora_keys and all(".lora_" in n for n, p in projector.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(lora_parameters(projector), lr=1e-2, weight_decay=0.0)
    x, y = _batch()
    losses = [transfer_step(projector, teachers, x, y, opt, ce_weight=0.1)["loss"] for _ in range(15)]
    with torch.no_grad():
        final, _ = transfer_loss(projector(x), teachers(x), y, 0.1)
    assert float(final) < 0.8 * losses[0], losses  # 8.07 -> 5.80 here

    after_state = projector.state_dict()
    changed = {k for k in before_state if not torch.equal(before_state[k], after_state[k])}
    assert changed <= lora_keys, f"non-LoRA tensors changed: {sorted(changed - lora_keys)[:5]}"
    assert any(k.startswith("head.") for k in changed), "the head LoRA did not train"
    assert any(".conv1." in k and "layer" not in k for k in changed), "the stem conv LoRA did not train"
    assert any(".layer1.0.conv2." in k for k in changed), "a residual block's conv LoRA did not train"
    for t in teachers.teachers:  # the teachers are targets only
        assert all(not p.requires_grad and p.grad is None for p in t.parameters())


def test_fidelity_of_the_ensemble_against_itself_is_perfect(teachers):
    class EnsembleMean(nn.Module):  # the projector that equals the ensemble: agreement 1, KL 0
        def forward(self, x):
            return teachers(x).mean(0)

    x, y = _batch(20, seed=1)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    f = label_fidelity(EnsembleMean(), teachers, batches)
    assert f["views"] == 20 and f["agreement"] == 1.0 and f["kl"] == pytest.approx(0.0, abs=1e-6)
    assert f["projector_top1"] == f["teacher_top1"]
    # Counts add across batches (and ranks): the split result equals the whole-batch one.
    whole = finish_fidelity(fidelity_counts(EnsembleMean(), teachers, x, y))
    assert whole == pytest.approx(f)


def test_fidelity_of_the_zero_shot_projector_is_in_range(teachers):
    projector = Projector.from_clip(TINY_CLIP, RANDOM_INIT, CLASS_NAMES)
    x, y = _batch(12, seed=2)
    counts = fidelity_counts(projector, teachers, x, y)
    assert counts.shape == (len(FIDELITY_KEYS),)
    f = finish_fidelity(counts)
    assert 0 <= f["agreement"] <= 1 and f["kl"] > 0 and 0 <= f["projector_top1"] <= 1
    with pytest.raises(ValueError, match="zero validation views"):
        finish_fidelity(torch.zeros(len(FIDELITY_KEYS), dtype=torch.float64))


# ---------------------------------------------------------------------------- the Ray Train stage

def test_transfer_stage_on_smoke_preset(ray_local, file_store_uri):
    """Ray Train DDP (2 workers) over the demo digits: the loss falls, fidelity before/after is
    written, the adapter has only LoRA tensors, and a longer run under the same name resumes.

    With the fault drill folded in (no extra Train run): rank 1's OS process is killed with
    SIGKILL after the first batch of epoch 2, so the stage resumes from epoch 1's checkpoint."""
    from safetensors.torch import load_file

    from faults import KillOnMarker
    from hello_ray.launcher import KillDrill

    from hello_ray.config import load_config
    from hello_ray.formats.fidelity import read_fidelity
    from hello_ray.formats.trajectory import load_trajectory
    from hello_ray.models.adapter import read_adapter_json
    from hello_ray.models.projector import load_adapter
    from hello_ray.stages import transfer
    from hello_ray.store import open_store

    cfg = load_config("smoke", overrides=[f"store={file_store_uri}", *RAY_CPUS, "transfer.epochs=2",
                                          "transfer.lr=0.01", "transfer.adapter_dtype=fp32"])
    store = open_store(cfg.store)
    teachers_key = write_tiny_trajectory(store, cfg)
    key = store.artifact_key(transfer.STAGE, transfer.stage_config(cfg), {"teachers": teachers_key})
    assert cfg.compute.max_failures >= 1
    drill = KillDrill(epoch=2, rank=1)
    killer = KillOnMarker(store, key, drill)
    try:
        summary = transfer.run(cfg, store, key, {"teachers": teachers_key}, drill=drill)
    finally:
        killer.stop()
    assert killer.pid and killer.gone and killer.cmdline.startswith("ray::"), vars(killer)

    history = json.loads(store.get_bytes(key, "history.json"))
    assert [h["epoch"] for h in history] == [1, 2]
    # Epoch 1 by the first attempt, epoch 2 by the second, which started right after epoch 1:
    # no finished epoch was trained twice.
    assert [h["attempt_start_epoch"] for h in history] == [1, 2]
    assert history[0]["attempt"] != history[1]["attempt"]
    assert history[-1]["loss"] < history[0]["loss"], history
    fidelity = read_fidelity(store, key)
    for when in ("before", "after"):
        assert set(fidelity[when]) == {"views", "agreement", "kl", "projector_top1", "teacher_top1"}
        assert fidelity[when]["views"] > 0
    assert fidelity["before"]["teacher_top1"] == pytest.approx(fidelity["after"]["teacher_top1"])
    assert fidelity["after"]["kl"] < fidelity["before"]["kl"]  # fitted to the teachers on real data
    assert summary["fidelity_after"] == fidelity["after"]

    # Resume: the same run name with one more epoch restores epoch 2's checkpoint and trains epoch 3 only,
    # its images decoded by the Train workers this time (data.decode is how, not what: the same key).
    cfg4 = load_config("smoke", overrides=[f"store={file_store_uri}", *RAY_CPUS, "transfer.epochs=3",
                                           "transfer.lr=0.01", "transfer.adapter_dtype=fp32", "data.decode=worker"])
    assert transfer.stage_config(cfg4)["data"] == transfer.stage_config(cfg)["data"]
    transfer.run(cfg4, store, key, {"teachers": teachers_key})
    history4 = json.loads(store.get_bytes(key, "history.json"))
    assert [h["epoch"] for h in history4] == [1, 2, 3]
    assert history4[:2] == history  # restored, not retrained
    assert history4[2]["attempt_start_epoch"] == 3 and history4[2]["loss"] < history[0]["loss"]
    assert read_fidelity(store, key)["before"] == fidelity["before"]

    store.finalize(key, transfer.STAGE, transfer.stage_config(cfg4), {"teachers": teachers_key})
    folder = store.download(key)
    meta = read_adapter_json(folder)
    tensors = load_file(str(folder / "adapter.safetensors"))
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert meta["num_params"] == sum(t.numel() for t in tensors.values())
    trajectory = load_trajectory(store, teachers_key)
    assert meta["class_names"] == trajectory["class_names"] and meta["conv_rank"] == cfg.transfer.conv_rank
    # B starts at zero (a fresh LoRA equals its base): the head's B must have moved.
    shipped = load_adapter(folder).lora_state_dict()
    assert shipped["head.lora_B.weight"].abs().sum() > 0
