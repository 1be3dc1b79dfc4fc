"""Atrous (dilated) convolution and Atrous Spatial Pyramid Pooling.

References:
    Chen et al., "DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous
    Convolution, and Fully Connected CRFs", TPAMI 2017 (DeepLab v2, ASPP-L: ``ASPPv2``).
    Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation", arXiv 2017
    (DeepLab v3: ``ASPP``, state-dict compatible with torchvision's ``deeplabv3.ASPP``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.errors import UserError

_ASPP_RATES: dict[int, tuple[int, int, int]] = {
    16: (6, 12, 18),  # DeepLab v3, Sec. 3.3: rates for output_stride 16
    8: (12, 24, 36),  # doubled when output_stride is 8
}


def atrous_conv3x3(
    in_channels: int,
    out_channels: int,
    dilation: int,
    bias: bool = True,
    conv_layer: type[nn.Module] = nn.Conv2d,
) -> nn.Module:
    """A 3x3 convolution with holes: dilation ``d`` and padding ``d`` keep the spatial size.

    ``conv_layer`` is ``nn.Conv2d`` or, for an atrous separable convolution, ``SeparableConv2d``.

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H, W).
    """
    if dilation < 1:
        raise UserError(f"atrous rate (dilation)={dilation} must be a positive integer such as 2, 6 or 12")
    return conv_layer(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=bias)


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """DeepLab v3's three ASPP atrous rates for a backbone with the given output stride."""
    if output_stride not in _ASPP_RATES:
        raise UserError(f"output_stride={output_stride} is not supported for ASPP; choose 8 or 16")
    return _ASPP_RATES[output_stride]


class ASPPv2(nn.Module):
    """DeepLab v2's ASPP: parallel atrous branches whose class scores are summed.

    ``hidden_channels=1024`` is ASPP-L of the VGG-16 model (Caffe prototxt, branch k):
    ``fc6_k`` 3x3 conv, dilation r_k, 1024 ch -> ReLU -> Dropout(0.5) -> ``fc7_k`` 1x1, 1024 ch ->
    ReLU -> Dropout(0.5) -> ``fc8_k`` 1x1, ``num_classes``; the four score maps are summed (Eltwise
    SUM). ``hidden_channels=None`` is the ResNet-101 model's head (``fc1_voc12_c0..c3``): one 3x3
    atrous conv straight to ``num_classes`` per branch, summed. The final convs start as in Caffe:
    Gaussian weights with std 0.01, zero bias.

    Args:
        in_channels: channels of the backbone features (512 for VGG-16, 2048 for ResNet-101).
        num_classes: number of classes K.
        rates: atrous rates, (6, 12, 18, 24) for ASPP-L, (2, 4, 8, 12) for ASPP-S.
        hidden_channels: width of fc6/fc7, or None for the single-conv (ResNet) branch.
        dropout: dropout probability after fc6 and fc7.

    Shape:
        (B, in_channels, H, W) -> (B, num_classes, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        rates: Sequence[int] = (6, 12, 18, 24),
        hidden_channels: int | None = 1024,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        branches = []
        for rate in rates:
            if hidden_channels is None:
                branch = nn.Sequential(atrous_conv3x3(in_channels, num_classes, rate))
            else:
                branch = nn.Sequential(
                    atrous_conv3x3(in_channels, hidden_channels, rate),  # fc6_k
                    nn.ReLU(inplace=True),
                    nn.Dropout(dropout),
                    nn.Conv2d(hidden_channels, hidden_channels, 1),  # fc7_k
                    nn.ReLU(inplace=True),
                    nn.Dropout(dropout),
                    nn.Conv2d(hidden_channels, num_classes, 1),  # fc8_k
                )
            nn.init.normal_(branch[-1].weight, std=0.01)
            nn.init.zeros_(branch[-1].bias)
            branches.append(branch)
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class ASPPConv(nn.Sequential):
    """One atrous branch of DeepLab v3's ASPP: 3x3 dilated conv (no bias) -> norm -> ReLU.

    ``conv_layer=SeparableConv2d`` makes it an atrous separable branch (DeepLab v3+, Sec. 3.2).

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dilation: int,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        conv_layer: type[nn.Module] = nn.Conv2d,
    ) -> None:
        super().__init__(
            atrous_conv3x3(in_channels, out_channels, dilation, bias=False, conv_layer=conv_layer),
            norm_layer(out_channels),
            nn.ReLU(),
        )


class ASPPPooling(nn.Sequential):
    """DeepLab v3's image-level branch: global average pool -> 1x1 conv -> norm -> ReLU -> upsample.

    Batch size 1 in training: the pooled map has one value per channel, so BatchNorm cannot compute
    batch statistics (torchvision raises "Expected more than 1 value per channel"). Here a
    BatchNorm then normalises with its running statistics, as in eval mode, and leaves them
    unchanged; its affine weight and bias still get gradients. Larger batches train as usual.

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            norm_layer(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pool, conv, norm, act = self
        y = conv(pool(x))  # (B, C_out, 1, 1)
        if (
            self.training
            and y.shape[0] == 1
            and isinstance(norm, nn.modules.batchnorm._BatchNorm)
            and norm.running_mean is not None
        ):
            y = F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
        else:
            y = norm(y)
        y = act(y)
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)  # (B, C_out, H, W)


class ASPP(nn.Module):
    """DeepLab v3's Atrous Spatial Pyramid Pooling.

    Five parallel branches -- a 1x1 conv, three 3x3 atrous convs (rates ``atrous_rates``) and image
    pooling -- each with ``out_channels`` channels, norm and ReLU, concatenated and projected by a
    1x1 conv (+ norm, ReLU, Dropout(0.5)). Submodule names match torchvision's
    ``torchvision.models.segmentation.deeplabv3.ASPP`` (``convs.0..4``, ``project``), so its state
    dicts load strictly; the only behavioural difference is batch size 1 in training, see
    ``ASPPPooling``.

    Args:
        in_channels: backbone channels (2048 for ResNet-50/101).
        atrous_rates: the three rates, ``aspp_rates(output_stride)``.
        out_channels: width of every branch and of the output.
        norm_layer: normalisation layer type, called as ``norm_layer(channels)``.
        dropout: dropout probability after the projection.
        conv_layer: type of the three 3x3 atrous convs: ``nn.Conv2d`` (v3), or ``SeparableConv2d``
            for the separable ASPP of DeepLab v3+ (Sec. 3.2); the 1x1 and pooling branches stay plain.

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        atrous_rates: Sequence[int],
        out_channels: int = 256,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        dropout: float = 0.5,
        conv_layer: type[nn.Module] = nn.Conv2d,
    ) -> None:
        super().__init__()
        modules: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), norm_layer(out_channels), nn.ReLU())
        ]
        modules += [ASPPConv(in_channels, out_channels, rate, norm_layer, conv_layer) for rate in atrous_rates]
        modules.append(ASPPPooling(in_channels, out_channels, norm_layer))
        self.convs = nn.ModuleList(modules)
        self.project = nn.Sequential(
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
            norm_layer(out_channels),
            nn.ReLU(),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = torch.cat([conv(x) for conv in self.convs], dim=1)  # (B, 5*C_out, H, W)
        return self.project(res)
