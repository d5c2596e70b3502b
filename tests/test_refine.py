"""Image refine: x' = up(down(x)), Adam on the pixels against MSE(E(x), E(x')), on Ray Data actors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hello_ray.models.clip import RANDOM_INIT, TINY_CLIP
from hello_ray.models.projector import Projector
from hello_ray.stages.refine_core import low_pass, refine_images, refine_objective

CLASS_NAMES = ["zero", "one", "two", "three"]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    projector = Projector.from_clip(TINY_CLIP, RANDOM_INIT, CLASS_NAMES).add_lora(4, 8).merge_lora()
    projector.requires_grad_(False)
    return projector.encode


def _images(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))  # [N,3,S,S]


def test_low_pass_averages_2x2_and_keeps_smooth_images():
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2  # [8,8] 0/1
    x = checker.float().expand(1, 3, 8, 8)
    assert torch.allclose(low_pass(x, 2), torch.full_like(x, 0.5))
    const = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(low_pass(const, 2), const)
    assert torch.allclose(low_pass(x, 1), x)


@pytest.mark.parametrize("target", ["joint", "detached"])
def test_refine_lowers_its_objective_and_keeps_pixels_in_range(encoder, target):
    x = _images()
    refined, history = refine_images(encoder, x, steps=15, lr=0.01, factor=2, target=target)
    assert len(history) == 16
    assert history[-1] < 0.9 * history[0], history
    assert refined.shape == x.shape and refined.min() >= 0 and refined.max() <= 1
    assert not torch.equal(refined, x)
    # The history's last value is the objective of the returned images.
    assert float(refine_objective(encoder, refined, 2, target).mean()) == pytest.approx(history[-1], rel=1e-5)


def test_refine_rejects_an_unknown_target(encoder):
    with pytest.raises(ValueError, match="refine target"):
        refine_images(encoder, _images(1), steps=1, lr=0.01, factor=2, target="both")


def test_refine_stage_writes_a_child_image_set(ray_local, file_store_uri, tmp_path):
    """Ray Data actors refine a small selected set; the new set names its parent and transfer key."""
    from hello_ray.config import load_config
    from hello_ray.data.imageset import load_image_set, write_image_set
    from hello_ray.models.adapter import save_adapter
    from hello_ray.stages import refine
    from hello_ray.store import open_store

    cfg = load_config("smoke", overrides=[f"store={file_store_uri}", "refine.steps=8", "refine.batch_size=4"])
    store = open_store(cfg.store)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)  # [N,H,W,3]
    labels = np.repeat(np.arange(4), 2)
    select_key = "select-tinyparent01"
    write_image_set(store, select_key, images, labels, CLASS_NAMES, None,
                    {"ipc": 2, "factor": 1, "parent": "teachers-none"})
    store.finalize(select_key, "select", {"tiny": True}, {})

    torch.manual_seed(0)
    projector = Projector.from_clip(TINY_CLIP, RANDOM_INIT, CLASS_NAMES).add_lora(4, 8)
    save_adapter(projector, tmp_path / "adapter", dtype="fp32")
    transfer_key = "transfer-tinyadapter1"
    store.put_dir(transfer_key, tmp_path / "adapter")
    store.finalize(transfer_key, "transfer", {"tiny": True}, {})

    inputs = {"select": select_key, "transfer": transfer_key}
    key = store.artifact_key(refine.STAGE, refine.stage_config(cfg), inputs)
    summary = refine.run(cfg, store, key, inputs)
    store.finalize(key, refine.STAGE, refine.stage_config(cfg), inputs, summary)

    child = load_image_set(store, key)
    assert child.meta["parent"] == select_key and child.meta["transfer"] == transfer_key
    assert child.meta["refine"]["steps"] == 8
    assert summary["objective_after"] < summary["objective_before"], summary
    assert tuple(np.asarray(child.images).shape) == images.shape
    assert np.asarray(child.labels).tolist() == labels.tolist()
    assert not np.array_equal(np.asarray(child.images), images)
