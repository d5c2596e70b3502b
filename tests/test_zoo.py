"""The student/teacher zoo: every architecture at small and full size, its stem, its normalisation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hello_ray.models.convnet import CONVNETS
from hello_ray.models.zoo import IMAGENET_MEAN, IMAGENET_STD, STUDENTS, ZOO, build_model, count_params

TORCHVISION_NETS = [n for n in STUDENTS if n not in CONVNETS]


def test_zoo_names_are_the_students_of_the_method():
    assert STUDENTS == ("resnet18", "shufflenet_v2_x0_5", "mobilenet_v2", "efficientnet_b0", "swin_v2_t",
                        "vgg11", "vit_b_16", "conv3", "conv4", "conv5", "conv6")
    assert ZOO == STUDENTS


# RDED's ConvNet (LINs-lab/RDED @ 3f6453d synthesize/models.py, load_model in synthesize/utils.py: width 128,
# batch norm, ReLU, 2x2 average pooling), counted by hand from the reference's construction:
# conv 0: 3*128*9 + 128 = 3,584; each further conv: 128*128*9 + 128 = 147,584; each BatchNorm: 256;
# classifier: (128 * (S / 2^depth)^2) * C + C, with S = 32 where the reference is given 28.
CONVNET_PARITY = [  # (name, image side, classes, classifier inputs, parameters)
    ("conv3", 24, 10, 1152, 311_050),
    ("conv3", 28, 10, 2048, 320_010),   # the reference sizes 28 px as 32
    ("conv3", 32, 10, 2048, 320_010),
    ("conv3", 64, 10, 8192, 381_450),
    ("conv4", 24, 10, 128, 448_650),
    ("conv4", 28, 100, 512, 498_660),
    ("conv4", 32, 100, 512, 498_660),
    ("conv4", 64, 200, 2048, 857_160),
    ("conv5", 64, 10, 512, 600_330),
    ("conv5", 128, 100, 2048, 800_100),
    ("conv6", 64, 10, 128, 744_330),
    ("conv6", 128, 100, 512, 794_340),
]


@pytest.mark.parametrize("name,side,classes,features,params", CONVNET_PARITY)
def test_convnet_matches_rdeds_construction(name, side, classes, features, params):
    model = build_model(name, classes, side)
    depth = CONVNETS[name]
    shapes = {k: tuple(v.shape) for k, v in model.net.state_dict().items()}
    expected = {"layers.conv.0.weight": (128, 3, 3, 3), "layers.conv.0.bias": (128,),
                "classifier.weight": (classes, features), "classifier.bias": (classes,)}
    for d in range(1, depth):
        expected |= {f"layers.conv.{d}.weight": (128, 128, 3, 3), f"layers.conv.{d}.bias": (128,)}
    for d in range(depth):
        expected |= {f"layers.norm.{d}.{t}": (128,) for t in ("weight", "bias", "running_mean", "running_var")}
        expected[f"layers.norm.{d}.num_batches_tracked"] = ()
    assert shapes == expected, "the state-dict keys and shapes of RDED's ConvNet (its checkpoints load as they are)"
    assert count_params(model) == params
    convs = [m for m in model.net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.padding for c in convs] == [(3, 3) if side == 28 else (1, 1)] + [(1, 1)] * (depth - 1)
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs)
    pools = [m for m in model.net.modules() if isinstance(m, nn.AvgPool2d)]
    assert pools and all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    model.eval()
    x = torch.rand(2, 3, side, side)
    with torch.no_grad():
        out = model(x)
        # channels_last (how evaluate trains students) flattens in the same (C, H, W) order
        out_cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert out.shape == (2, classes)
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-4)


def test_convnet_forward_is_rdeds_layer_order():
    """conv -> batch norm -> ReLU -> 2x2 average pool per block, then the flattened map (C, H, W order)."""
    torch.manual_seed(0)
    model = build_model("conv3", 10, 32).eval()
    net = model.net
    x = torch.rand(2, 3, 32, 32)
    h = (x - model.mean) / model.std
    for d in range(3):
        h = nn.functional.avg_pool2d(torch.relu(net.layers["norm"][d](net.layers["conv"][d](h))), 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net.classifier(h.reshape(2, -1)))


def test_convnet_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="conv6.*no pixel of a 32 px image"):
        build_model("conv6", 10, 32)
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("conv3", 10, 32, pretrained=True)


# name -> the module whose output is the last feature map, and that map's side for a 32 px input
FEATURE_MAP = {
    "resnet18": ("net.layer4", 2),
    "shufflenet_v2_x0_5": ("net.conv5", 2),
    "mobilenet_v2": ("net.features", 2),
    "efficientnet_b0": ("net.features", 2),
    "swin_v2_t": ("net.norm", 2),  # NHWC tokens
    "vgg11": ("net.features", 1),
    "vit_b_16": ("net.conv_proj", 8),  # 8 x 8 tokens of 4 px patches
}


@pytest.mark.parametrize("name", TORCHVISION_NETS)
def test_small_image_forward_and_feature_map(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, image_size=32).eval()
    module_name, side = FEATURE_MAP[name]
    seen = {}
    hook = model.get_submodule(module_name).register_forward_hook(lambda m, i, o: seen.update(out=o))
    with torch.no_grad():
        out = model(torch.rand(3, 3, 32, 32))
    hook.remove()
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    fmap = seen["out"]
    spatial = fmap.shape[1:3] if name == "swin_v2_t" else fmap.shape[-2:]
    assert tuple(spatial) == (side, side), f"{name}: last feature map {tuple(fmap.shape)}"


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5"])
def test_full_size_keeps_the_imagenet_stem(name):
    model = build_model(name, num_classes=7, image_size=224).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 224, 224)).shape == (1, 7)


def test_resnet18_stems():
    small = build_model("resnet18", 10, 32).net
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.MaxPool2d), "the small-image stem keeps the max-pool (speed)"
    full = build_model("resnet18", 10, 224).net
    assert full.conv1.kernel_size == (7, 7) and full.conv1.stride == (2, 2)
    # ImageNet-1K ResNet-18 has the published 11.7M parameters
    assert count_params(build_model("resnet18", 1000, 224)) == 11_689_512


def test_swin_patch_and_vgg_classifier_fit_small_images():
    swin = build_model("swin_v2_t", 10, 32).net
    assert swin.features[0][0].kernel_size == (2, 2)
    assert build_model("swin_v2_t", 10, 224).net.features[0][0].kernel_size == (4, 4)
    vgg = build_model("vgg11", 10, 32)
    assert vgg.net.classifier[0].in_features == 512
    assert count_params(vgg) < 10_000_000  # not the 120M of the 7x7 ImageNet classifier


def test_normalisation_happens_inside():
    torch.manual_seed(0)
    model = build_model("shufflenet_v2_x0_5", 5, 32).eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - mean) / std))
    # mean/std are buffers: they follow .to() and are no weights
    assert "mean" not in dict(model.named_parameters())
    assert set(model.state_dict()) == {f"net.{k}" for k in model.net.state_dict()}


def test_small_resnet_learns():
    """A few steps on a fixed batch lower the loss: the small stem trains end to end."""
    torch.manual_seed(0)
    model = build_model("resnet18", 4, 32).train()
    x, y = torch.rand(16, 3, 32, 32), torch.arange(16) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_unknown_name_lists_the_zoo():
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*resnet18.*vgg11"):
        build_model("resnet50", 10, 32)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet18", 0, 32)
    with pytest.raises(ValueError, match="pretrained ImageNet weights need the 224 px stem"):
        build_model("resnet18", 10, 32, pretrained=True)  # refused before any download


def test_vit_b_16_is_torchvisions_at_224_and_refuses_sizes_its_patches_do_not_tile():
    """ViT-B/16 (HeLlO supplement table 5): torchvision's 86M-parameter encoder at 224 px."""
    assert count_params(build_model("vit_b_16", 1000, 224)) == 86_567_656
    with pytest.raises(ValueError, match="vit_b_16.*multiple"):
        build_model("vit_b_16", 10, 100)
