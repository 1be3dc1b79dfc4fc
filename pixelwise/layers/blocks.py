"""Generic blocks: conv + norm + activation, depthwise-separable conv, and centre cropping for skip connections."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvNormAct(nn.Sequential):
    """Convolution -> normalisation -> activation (torchvision's ``Conv2dNormActivation`` shape).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size.
        stride: convolution stride.
        padding: zero padding; None gives 'same' padding ``dilation * (kernel_size - 1) // 2``,
            0 gives the 'valid' convolutions of the original U-Net.
        dilation: dilation (atrous rate).
        norm_layer: normalisation type called as ``norm_layer(out_channels)``, or None for none.
        activation: activation type called without arguments, or None for none.
        bias: conv bias; None means "only when there is no norm layer" (a norm's shift makes it redundant).
        conv_layer: the convolution type, called with ``nn.Conv2d``'s arguments: ``nn.Conv2d``, or
            ``SeparableConv2d`` for DeepLab v3+'s separable layers.

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H', W') with H' = H for 'same' padding and
        stride 1, H - (kernel_size - 1) * dilation for padding 0.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        norm_layer: type[nn.Module] | None = nn.BatchNorm2d,
        activation: type[nn.Module] | None = nn.ReLU,
        bias: bool | None = None,
        conv_layer: type[nn.Module] = nn.Conv2d,
    ) -> None:
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        if bias is None:
            bias = norm_layer is None
        layers: list[nn.Module] = [
            conv_layer(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation, bias=bias)
        ]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation is not None:
            # ReLU in place, as torchvision's blocks: no extra full-size tensor per block (~4% of U-Net's CPU time)
            layers.append(activation(inplace=True) if activation is nn.ReLU else activation())
        super().__init__(*layers)
        self.out_channels = out_channels


class SeparableConv2d(nn.Sequential):
    """Depthwise-separable convolution: a per-channel k x k conv, then a 1x1 conv mixing the channels.

    Chollet, "Xception: Deep Learning with Depthwise Separable Convolutions", CVPR 2017; atrous when
    ``dilation > 1`` (Chen et al., ECCV 2018, Sec. 3.1, "atrous separable convolution"). It takes
    ``nn.Conv2d``'s arguments, so it can stand where a conv type is passed (``ConvNormAct``'s
    ``conv_layer``). The depthwise conv has no bias (the pointwise conv's, or the norm after it, covers
    it) and no norm or activation between the two, as segmentation-models-pytorch's ``SeparableConv2d``:
    k*k*C_in + C_in*C_out weights instead of k*k*C_in*C_out.

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H', W'), H' as for ``nn.Conv2d`` with the same arguments.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(
            OrderedDict(
                depthwise=nn.Conv2d(
                    in_channels,
                    in_channels,
                    kernel_size,
                    stride,
                    padding,
                    dilation=dilation,
                    groups=in_channels,
                    bias=False,
                ),
                pointwise=nn.Conv2d(in_channels, out_channels, 1, bias=bias),
            )
        )
        self.in_channels = in_channels
        self.out_channels = out_channels


def center_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop the centre ``size = (h, w)`` of the last two dimensions (U-Net's skip cropping).

    The offset is ``(H - h) // 2`` (Caffe's Crop with a centred offset); an odd difference leaves the
    extra row/column at the bottom/right.

    Shape:
        (..., H, W) -> (..., h, w).
    """
    h, w = tuple(size)[-2:]  # no int(): symbolic sizes must stay symbolic for export
    big_h, big_w = x.shape[-2:]
    if h > big_h or w > big_w:
        raise ValueError(f"center_crop: cannot crop a {big_h}x{big_w} map to the larger size {h}x{w}")
    top, left = (big_h - h) // 2, (big_w - w) // 2
    return x[..., top : top + h, left : left + w]  # (..., h, w)


def mirror_pad(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """Mirror (reflect) padding of any width: maps narrower than the margin are mirrored repeatedly, a
    dimension of size 1 is repeated (U-Net's overlap-tile context, Ronneberger et al. 2015, Fig. 2).

    Shape:
        (..., H, W) -> (..., H + top + bottom, W + left + right).
    """
    for dim, (before, after) in ((-1, (left, right)), (-2, (top, bottom))):
        while before or after:
            n = x.shape[dim]
            if n == 1:  # nothing to reflect across: repeat the single row/column
                step = (before, after)
                mode = "replicate"
            else:
                step = (min(before, n - 1), min(after, n - 1))
                mode = "reflect"
            pad = step + (0, 0) if dim == -1 else (0, 0) + step
            x = F.pad(x, pad, mode=mode)  # (B, C, H(+top+bottom), W(+left+right)), one step
            before, after = before - step[0], after - step[1]
    return x


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the bottom and right so that H and W are multiples of ``multiple`` (a no-op when they are).

    An encoder whose stages floor odd sizes (a stride-4 patch stem, stride-2 convs) then gives every map
    exactly the input size over its stride; the model crops its logits back to (H, W). Zero is the mean
    of normalised images.

    Shape:
        (B, C, H, W) -> (B, C, ceil(H / multiple) * multiple, ceil(W / multiple) * multiple).
    """
    h, w = x.shape[-2:]
    return F.pad(x, (0, (multiple - w % multiple) % multiple, 0, (multiple - h % multiple) % multiple))
