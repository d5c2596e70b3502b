"""Preparing frozen labellers (BN folding, query-token attention pool, channels-last): same logits,
less work; folding refused where it would be wrong."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hello_ray.labels import ProjectorLabels, TeacherLabels
from hello_ray.models.attnpool import QueryTokenAttentionPool, use_query_token_pool
from hello_ray.models.fold import fold_batchnorm
from hello_ray.models.clip import RANDOM_INIT, TINY_CLIP
from hello_ray.models.projector import Projector
from hello_ray.models.zoo import build_model


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affines (random init has mean 0, var 1, gamma 1, beta 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def _merged_projector() -> Projector:
    """The tiny random-init CLIP projector with a rank-2/4 LoRA merged in: what evaluate labels with."""
    proj = Projector.from_clip(TINY_CLIP, RANDOM_INIT, class_names=[f"class {i}" for i in range(5)])
    return proj.add_lora(2, 4).merge_lora(unload=True).eval()


def _count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_resnet18_folds_every_batchnorm_and_keeps_its_logits():
    torch.manual_seed(0)
    model = _randomise_bn(build_model("resnet18", 10, 32))
    x = torch.rand(4, 3, 32, 32)
    folded, n = fold_batchnorm(model, x[:2])
    assert n == 20 and _count_bn(folded) == 0
    assert _count_bn(model) == 20                      # the original is left as it was
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_clip_projector_folds_and_keeps_its_logits():
    proj = _merged_projector()
    _randomise_bn(proj.encoder, seed=1)
    x = torch.rand(3, 3, 32, 32)
    folded, n = fold_batchnorm(proj, x[:2])
    assert n == _count_bn(proj.encoder) > 0 and _count_bn(folded) == 0
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), proj(x), rtol=1e-4, atol=1e-3)


class _ResidualFromConv(nn.Module):
    """conv output used by the BN *and* by a residual add: folding would change the residual."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_conv_output_also_used_elsewhere_is_not_folded():
    model = _randomise_bn(_ResidualFromConv())
    x = torch.rand(2, 3, 8, 8)
    folded, n = fold_batchnorm(model, x)
    assert n == 0 and folded is model


def test_preactivation_bn_is_not_paired():
    model = _randomise_bn(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3)))
    folded, n = fold_batchnorm(model, torch.rand(2, 3, 8, 8))
    assert n == 0 and folded is model


def test_online_teacher_labels_are_unchanged_by_moving_to_a_device():
    """``to(device)`` folds and re-lays out the labeller; the logits must not move."""
    torch.manual_seed(0)
    model = _randomise_bn(build_model("resnet18", 4, 16))
    x = torch.rand(6, 3, 16, 16)
    with torch.inference_mode():
        want = model(x)
    labels = TeacherLabels(model, 4, 16).to(torch.device("cpu"))
    assert _count_bn(labels.model) == 0
    torch.testing.assert_close(labels.logits(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side,dim,heads,out", [(3, 64, 4, 32), (7, 128, 8, 128)])
def test_query_token_attention_pool_matches_open_clips_pool(side, dim, heads, out):
    """The pool projects only the returned token; the result must be open_clip's full attention's."""
    from open_clip.modified_resnet import AttentionPool2d

    torch.manual_seed(side)
    pool = AttentionPool2d(side, dim, heads, out).eval()
    with torch.no_grad():                    # non-zero biases, so the bias terms are exercised
        for lin in (pool.q_proj, pool.k_proj, pool.v_proj):
            lin.bias.normal_()
    feats = torch.randn(3, dim, side, side)  # [N, D, H, W]: the last feature map
    with torch.inference_mode():
        torch.testing.assert_close(QueryTokenAttentionPool(pool)(feats), pool(feats), rtol=1e-5, atol=1e-5)


def test_only_clip_pools_are_swapped():
    proj = _merged_projector()
    assert use_query_token_pool(proj) == 1 and isinstance(proj.encoder.attnpool, QueryTokenAttentionPool)
    assert use_query_token_pool(build_model("resnet18", 4, 16)) == 0


def test_online_projector_labels_are_unchanged_by_moving_to_a_device():
    proj = _merged_projector()
    _randomise_bn(proj.encoder, seed=2)
    x = torch.rand(4, 3, 32, 32)
    with torch.inference_mode():
        want = proj(x)
    labels = ProjectorLabels(proj, 5, 32, adapter_bytes=0).to(torch.device("cpu"))
    assert _count_bn(labels.model) == 0
    assert isinstance(labels.model.encoder.attnpool, QueryTokenAttentionPool)
    torch.testing.assert_close(labels.logits(x), want, rtol=1e-4, atol=1e-3)
