"""Student / teacher zoo: torchvision architectures behind one ``build_model`` entry point.

Every model takes float images in [0, 1], NCHW, and applies the ImageNet mean/std itself
(ARCHITECTURE.md: nobody upstream juggles normalisation). Weights are random
(``weights=None``) unless ``pretrained=True`` asks for torchvision's ImageNet weights, the
cluster path for 224 px data; tests never ask for them.

Small images (``image_size <= 64``, the demo's 32 px digits, CIFAR-like data) get a
*small-image stem*: the ImageNet stems downsample by 4 (ResNet, ShuffleNet, Swin) or 2
(MobileNet, EfficientNet) before the first block, which would leave a 32 px input with a
1x1 map long before the head. The changes, per architecture:

- ``resnet18``: ``conv1`` becomes 3x3 stride 1 (no 7x7 stride 2). The max-pool is KEPT,
  unlike the CIFAR ResNet: on this 2-core CPU the no-max-pool variant trained at 55 img/s
  against ~200 img/s with it, and the 32 px input still ends in a 2x2 map before pooling.
- ``shufflenet_v2_x0_5``: the first 3x3 conv gets stride 1; its max-pool is kept (2x2 map).
- ``mobilenet_v2`` / ``efficientnet_b0``: the first 3x3 conv gets stride 1 (total stride
  16, a 2x2 map at 32 px).
- ``swin_v2_t``: the patch embedding uses patches of ``max(1, image_size // 16)`` pixels,
  so a small image is always 16x16 tokens (maps 16, 8, 4, 2 over the four stages) instead
  of 8x8 tokens with 4 px patches.
- ``vgg11``: the feature extractor is unchanged (five max-pools, a 1x1 map at 32 px); the
  7x7 adaptive pool and the 25088 -> 4096 -> 4096 classifier (120M parameters for a 1x1
  map) are replaced by a global pool and a 512 -> 512 -> classes MLP sized for that map.

``conv3`` .. ``conv6`` are RDED's ConvNet-D3..D6 (:mod:`hello_ray.models.convnet`), the
low-resolution protocol's models (28-128 px); they have no pretrained weights.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from hello_ray.models.convnet import CONVNETS, ConvNet

STUDENTS: tuple[str, ...] = ("resnet18", "shufflenet_v2_x0_5", "mobilenet_v2", "efficientnet_b0",
                             "swin_v2_t", "vgg11", "vit_b_16", *CONVNETS)
ZOO = STUDENTS  # teachers come from the same zoo (METHOD.md: ResNet-18 by default)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE_MAX = 64  # inputs up to this side get the small-image stem


class ZooModel(nn.Module):
    """A torchvision network behind ImageNet normalisation: ``forward(x [N,3,H,W] in [0,1])``.

    ``net`` is the plain torchvision module, so its state-dict keys are ``net.<torchvision key>``.
    """

    def __init__(self, name: str, net: nn.Module, num_classes: int, image_size: int):
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.image_size = image_size
        self.net = net
        # Buffers (not parameters): they move with .to(device) and count as no trainable weights.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N,3,H,W] in [0,1] -> logits [N,C]
        return self.net((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def _stride1_conv(conv: nn.Conv2d) -> None:
    """Make a strided stem conv stride 1 in place (same weights shape, so same parameter count)."""
    conv.stride = (1, 1)


def _small_resnet18(net: nn.Module, image_size: int) -> None:
    # 3x3 stride 1 instead of 7x7 stride 2; the max-pool stays (see the module docstring).
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)


def _small_shufflenet(net: nn.Module, image_size: int) -> None:
    _stride1_conv(net.conv1[0])


def _small_mobilenet(net: nn.Module, image_size: int) -> None:
    _stride1_conv(net.features[0][0])


def _small_efficientnet(net: nn.Module, image_size: int) -> None:
    _stride1_conv(net.features[0][0])


def _small_swin(net: nn.Module, image_size: int) -> None:
    patch = max(1, image_size // 16)  # always 16x16 tokens for small images
    old: nn.Conv2d = net.features[0][0]
    net.features[0][0] = nn.Conv2d(3, old.out_channels, kernel_size=patch, stride=patch)


def _vit_b_16(num_classes: int, image_size: int) -> nn.Module:
    """torchvision's ViT-B/16 (HeLlO's supplement, table 5; RDED's ``vit_b_16``). At 224 px and other
    multiples of 16 it is torchvision's own; small images get patches of ``image_size // 8`` px (8 x 8
    tokens, the same encoder), so a 32 px image is not one token."""
    import torchvision

    small = image_size <= SMALL_IMAGE_MAX
    patch = max(1, image_size // 8) if small else 16
    if image_size % patch:
        raise ValueError(f"model 'vit_b_16': image_size {image_size} is not a multiple of its {patch} px "
                         "patches; use a multiple of 16 (224) or, for small images, of 8")
    return torchvision.models.VisionTransformer(image_size=image_size, patch_size=patch, num_layers=12,
                                                num_heads=12, hidden_dim=768, mlp_dim=3072,
                                                num_classes=num_classes)


def _small_vgg(net: nn.Module, image_size: int) -> None:
    num_classes = net.classifier[-1].out_features
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.classifier = nn.Sequential(
        nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(512, num_classes))


_SMALL_STEM: dict[str, Callable[[nn.Module, int], None]] = {
    "resnet18": _small_resnet18,
    "shufflenet_v2_x0_5": _small_shufflenet,
    "mobilenet_v2": _small_mobilenet,
    "efficientnet_b0": _small_efficientnet,
    "swin_v2_t": _small_swin,
    "vgg11": _small_vgg,
    "vit_b_16": lambda net, image_size: None,   # built at its size by _vit_b_16
}


def _replace_classifier(name: str, net: nn.Module, num_classes: int) -> None:
    """Swap the 1000-way ImageNet classifier of a pretrained net for a fresh ``num_classes`` one."""
    if name in ("resnet18", "shufflenet_v2_x0_5"):
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    elif name == "swin_v2_t":
        net.head = nn.Linear(net.head.in_features, num_classes)
    elif name == "vit_b_16":
        net.heads.head = nn.Linear(net.heads.head.in_features, num_classes)
    else:  # mobilenet_v2, efficientnet_b0, vgg11: an nn.Sequential ending in the Linear
        last = net.classifier[-1]
        net.classifier[-1] = nn.Linear(last.in_features, num_classes)


def build_model(name: str, num_classes: int, image_size: int, pretrained: bool = False) -> nn.Module:
    """A zoo network for ``num_classes`` classes at ``image_size`` px, taking [0,1] NCHW input.

    ``pretrained=True`` loads torchvision's ImageNet-1K weights (downloads them once on a
    cluster; never used in tests) and only fits the 224 px stem, so it is refused for small
    images; for ``num_classes != 1000`` the classifier is re-initialised.
    """
    if name not in _SMALL_STEM and name not in CONVNETS:
        raise ValueError(f"unknown model {name!r}; the zoo has: {', '.join(ZOO)}")
    if num_classes < 1:
        raise ValueError(f"model {name!r}: num_classes must be >= 1, got {num_classes}")
    if image_size < 8:
        raise ValueError(f"model {name!r}: image_size must be >= 8, got {image_size}")
    small = image_size <= SMALL_IMAGE_MAX
    if name in CONVNETS:
        if pretrained:
            raise ValueError(f"model {name!r}: torchvision has no pretrained weights for RDED's ConvNet; "
                             "train it as a teacher (teachers.model) instead")
        return ZooModel(name, ConvNet(num_classes, CONVNETS[name], image_size), num_classes, image_size)
    # Imported here: torchvision's models pull in torch._dynamo (~1.4 s per process), which a ConvNet
    # teacher's workers and a driver that only plans never need.
    import torchvision

    if pretrained:
        if small:
            raise ValueError(f"model {name!r}: pretrained ImageNet weights need the 224 px stem, but "
                             f"image_size={image_size} <= {SMALL_IMAGE_MAX} uses the small-image stem")
        net = torchvision.models.get_model(name, weights="DEFAULT")
        if num_classes != 1000:
            _replace_classifier(name, net, num_classes)
    elif name == "vit_b_16":
        net = _vit_b_16(num_classes, image_size)
    else:
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        if small:
            _SMALL_STEM[name](net, image_size)
    return ZooModel(name, net, num_classes, image_size)


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
