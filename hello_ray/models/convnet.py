"""ConvNet-D3..D6: the low-resolution protocol's teacher, observer and student.

Built as RDED builds it (LINs-lab/RDED @ 3f6453d, ``synthesize/models.py`` class ``ConvNet`` and
``load_model`` in ``synthesize/utils.py``: ``net_norm="batch"``, ``net_act="relu"``,
``net_pooling="avgpooling"``, ``net_width=128``, depth = the digit of ``conv<d>``): ``depth`` blocks
of 3x3 convolution (padding 1, with bias) -> BatchNorm2d (affine) -> ReLU -> 2x2 average pooling
(stride 2), then one linear classifier on the flattened ``[width, S / 2^d, S / 2^d]`` map. RDED
pairs conv3 with 32 px (CIFAR), conv4 with 64 px (Tiny-ImageNet), conv5/conv6 with 128 px
(ImageNette, ImageWoof, ImageNet-100). Its AdamW rate for every conv student is 1e-3
(``argument.py``), which ``EvalConfig.lr`` carries.

The state-dict keys are the reference's (``layers.conv.<i>``, ``layers.norm.<i>``, ``classifier``),
so a checkpoint of RDED's ConvNet loads into ``ZooModel.net`` as it is.

One deliberate difference, for 28 px only: the reference sizes its classifier for 32 px whenever
``im_size`` is 28 and pads its first convolution by 3 only for 1-channel input (MNIST), so with
3-channel 28 px input its map (3x3 after three poolings) does not fit its own classifier (4x4)
and the forward fails. Here the first convolution pads by 3 at 28 px whatever the channels, which
makes the map 32 px as the reference's classifier expects: the same layer shapes and parameter
count, and a model that runs.
"""
from __future__ import annotations

import torch
from torch import nn

CONVNETS: dict[str, int] = {"conv3": 3, "conv4": 4, "conv5": 5, "conv6": 6}  # name -> depth
WIDTH = 128


class ConvNet(nn.Module):
    """RDED's ConvNet (batch norm, ReLU, average pooling) for ``image_size`` px, 3-channel input."""

    def __init__(self, num_classes: int, depth: int, image_size: int, width: int = WIDTH):
        super().__init__()
        # The reference computes the classifier's input as if 28 px were 32 (see the module docstring).
        side = 32 if image_size == 28 else image_size
        if side >> depth < 1:
            raise ValueError(f"model 'conv{depth}': {depth} 2x2 poolings leave no pixel of a "
                             f"{image_size} px image; use at least {2 ** depth} px or a shallower ConvNet")
        self.depth = depth
        pad0 = 3 if image_size == 28 else 1
        convs = [nn.Conv2d(3 if d == 0 else width, width, kernel_size=3, padding=pad0 if d == 0 else 1)
                 for d in range(depth)]
        act, pool = nn.ReLU(), nn.AvgPool2d(kernel_size=2, stride=2)  # stateless, shared as in RDED
        self.layers = nn.ModuleDict({
            "conv": nn.ModuleList(convs),
            "norm": nn.ModuleList(nn.BatchNorm2d(width, affine=True) for _ in range(depth)),
            "act": nn.ModuleList([act] * depth),
            "pool": nn.ModuleList([pool] * depth),
        })
        self.classifier = nn.Linear(width * (side >> depth) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N,3,S,S] (normalised) -> logits [N,C]
        for d in range(self.depth):
            x = self.layers["pool"][d](self.layers["act"][d](self.layers["norm"][d](self.layers["conv"][d](x))))
        # flatten, not view: a channels_last student's map is not contiguous in NCHW order, and
        # flatten keeps the reference's (C, H, W) feature order either way.
        return self.classifier(torch.flatten(x, 1))  # [N, width * (S/2^d)^2] -> [N, C]
