"""ResNet-50/101 encoders with atrous output stride, built from torchvision's definitions.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (torchvision's "v1.5" layout:
the stride of a bottleneck sits on its 3x3 conv). Atrous (dilated) output stride and Multi-Grid:
Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation", arXiv:1706.05587, 2017.

The modules keep torchvision's names (``conv1, bn1, layer1..layer4``) so that a torchvision ImageNet
``.pth`` file (``resnet50-*.pth``, ``resnet101-*.pth``) loads by key from a local path, and so that an
encoder placed at ``model.backbone`` has exactly the keys of torchvision's segmentation backbones.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torchvision.models import ResNet, resnet50, resnet101

from pixelwise.encoders.features import Features
from pixelwise.encoders.vgg import load_by_key, load_state_dict_file
from pixelwise.errors import UserError

RESNET_DEPTHS: dict[int, Callable[..., ResNet]] = {50: resnet50, 101: resnet101}

# output_stride -> torchvision's replace_stride_with_dilation for (layer2, layer3, layer4)
_DILATE: dict[int, list[bool]] = {
    32: [False, False, False],
    16: [False, False, True],
    8: [False, True, True],
}


class ResNetEncoder(nn.Module):
    """ResNet-50/101 feature extractor with output stride 8, 16 or 32 (He et al., CVPR 2016).

    Output stride 16 / 8 replaces the stride of layer4 / layer3+layer4 with dilation, exactly as
    torchvision's ``replace_stride_with_dilation`` (used by its FCN and DeepLabv3 models). With
    ``multigrid=(1, 2, 4)`` the three units of layer4 get dilations ``rate * (1, 2, 4)`` where
    ``rate`` is layer4's dilation (2 at output stride 16, 4 at 8), the Multi-Grid of DeepLabv3
    (Chen et al., arXiv:1706.05587, Sec. 3.2). Dilation changes no parameter, so ImageNet weights
    load the same at every output stride.

    Args:
        depth: 50 or 101.
        output_stride: 8, 16 or 32, the ratio of input size to layer4's size.
        multigrid: unit rates for layer4's three blocks, or None for torchvision's layout (first
            block at the previous dilation, the others at layer4's).
        weights: path of a torchvision ImageNet ``resnet50``/``resnet101`` ``.pth`` file, or None
            for torchvision's random initialisation. Never downloaded.

    Attributes:
        out_channels: channels of the features, high to low resolution: (64, 256, 512, 1024, 2048).
        strides: their strides, e.g. (2, 4, 8, 8, 8) at output stride 8.
        input_multiple: 1, any input size runs as it is (a ``TimmEncoder`` asks for padding).

    Shape:
        (B, 3, H, W) -> ``Features`` [stem (B, 64, H/2, W/2), layer1 (B, 256, H/4, W/4), layer2 (B, 512, H/8, W/8),
        layer3 (B, 1024, H/s3, W/s3), layer4 (B, 2048, H/s4, W/s4)], sizes rounded up (ceil); no
        pooling record (``indices`` and ``sizes`` are None).
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        output_stride: int = 32,
        multigrid: Sequence[int] | None = None,
        weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise UserError(f"ResNet depth={depth} is not supported; choose 50 or 101")
        if output_stride not in _DILATE:
            raise UserError(f"output_stride={output_stride} is not supported; choose 8, 16 or 32")
        net = RESNET_DEPTHS[depth](weights=None, replace_stride_with_dilation=_DILATE[output_stride])
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

        if multigrid is not None:
            rates = tuple(int(r) for r in multigrid)
            if len(rates) != len(self.layer4) or min(rates) < 1:
                raise UserError(
                    f"multigrid={tuple(multigrid)} must give one positive rate per layer4 block "
                    f"({len(self.layer4)}), e.g. (1, 2, 4)"
                )
            layer_rate = 32 // output_stride  # layer4's dilation: 1, 2 or 4
            for block, unit in zip(self.layer4, rates, strict=True):
                d = layer_rate * unit
                block.conv2.dilation, block.conv2.padding = (d, d), (d, d)

        self.out_channels: list[int] = [64, 256, 512, 1024, 2048]
        layer3_stride = 8 if output_stride == 8 else 16
        self.strides: list[int] = [2, 4, 8, layer3_stride, output_stride]
        self.output_stride = output_stride
        self.input_multiple = 1  # any size works: the maps round up (ceil) and the heads interpolate to the input
        if weights is not None:
            # torchvision's ImageNet files hold the 1000-class fc layer too; an encoder has none.
            state = {k: v for k, v in load_state_dict_file(weights).items() if not k.startswith("fc.")}
            load_by_key(self, state, "", path=weights, hint=f"pass torchvision's ImageNet resnet{depth} .pth file")

    def forward(self, x: torch.Tensor) -> Features:
        stem = self.relu(self.bn1(self.conv1(x)))  # (B, 64, H/2, W/2)
        c1 = self.layer1(self.maxpool(stem))  # (B, 256, H/4, W/4)
        c2 = self.layer2(c1)  # (B, 512, H/8, W/8)
        c3 = self.layer3(c2)  # (B, 1024, H/8 or H/16, ...)
        c4 = self.layer4(c3)  # (B, 2048, H/output_stride, W/output_stride)
        return Features([stem, c1, c2, c3, c4])
