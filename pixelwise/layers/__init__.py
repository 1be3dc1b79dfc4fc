"""Shared building blocks: upsampling, conv-norm-act, separable and atrous convolution / ASPP, convolutionalization."""

from pixelwise.layers.atrous import ASPP, ASPPConv, ASPPPooling, ASPPv2, aspp_rates, atrous_conv3x3
from pixelwise.layers.blocks import ConvNormAct, SeparableConv2d, center_crop, mirror_pad, pad_to_multiple
from pixelwise.layers.convolutionalize import convolutionalize
from pixelwise.layers.upsample import (
    UPSAMPLE_KINDS,
    FixedUnpool,
    InterpolateUpsample,
    MaxUnpool,
    TransposedUpsample,
    bilinear_kernel,
    make_upsample,
)

__all__ = [
    "ASPP",
    "ASPPConv",
    "ASPPPooling",
    "ASPPv2",
    "ConvNormAct",
    "FixedUnpool",
    "InterpolateUpsample",
    "MaxUnpool",
    "SeparableConv2d",
    "TransposedUpsample",
    "UPSAMPLE_KINDS",
    "aspp_rates",
    "atrous_conv3x3",
    "bilinear_kernel",
    "center_crop",
    "convolutionalize",
    "make_upsample",
    "mirror_pad",
    "pad_to_multiple",
]
