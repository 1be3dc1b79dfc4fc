"""SegNet and SegNet-Basic: Badrinarayanan, Kendall & Cipolla, "SegNet: A Deep Convolutional
Encoder-Decoder Architecture for Image Segmentation", TPAMI 2017 (and the released Caffe nets,
alexgkendall/SegNet-Tutorial ``Models/segnet_train.prototxt``, ``segnet_basic_train.prototxt``).

An encoder that keeps the argmax positions of every 2x2 max-pool, and a decoder that mirrors it:
each decoder stage puts its input back at those positions (max-unpooling, zeros elsewhere) and
densifies the sparse map with trainable convolutions. Pools round up as Caffe's do, and each unpooling
is told the size its encoder stage had before pooling, so any input size (e.g. 45 x 61) round-trips.

* ``segnet``: the 13 convs of VGG-16-BN (loadable from torchvision's ``vgg16_bn`` file), a
  mirrored decoder of 13 convs, each 3x3 + BatchNorm + ReLU, except the last, ``conv1_1_D``, which is
  a plain 3x3 conv to the K class scores (≈29.4 M parameters).
* ``segnet_basic``: 4 encoders of 64 7x7 filters (conv, BN, ReLU, pool) on an LRN-normalised input,
  4 decoders of 64 7x7 filters with BN and neither ReLU nor biases (Sec. 3.1), and a 1x1 classifier.

The decoder's upsampling can be any ``pixelwise.layers.make_upsample`` kind, which gives the paper's
"Bilinear-Interpolation" variant (``upsample="bilinear"``); ``segnet_basic`` also has the decoder
width (``decoder_channels``) and SegNet-Basic-SingleChannelDecoder (``single_channel_decoder=True``,
each decoder filter sees one channel).

* ``fcn_basic``: the paper's FCN-Basic (Sec. 3.1, Fig. 3 right, Table 1): SegNet-Basic's encoder with
  FCN's decoder, which uses no pooling indices and has no decoder convolutions: 1x1 convs reduce the
  pooled encoder maps to K channels, and 4 learned 8x8 deconvolutions (bilinear-initialised) upsample
  2x each, adding the reduced pooled map of the same resolution after the first three. Its flags give
  the table's FCN-Basic-NoAddition, -NoDimReduction and -NoAddition-NoDimReduction rows.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from pixelwise.encoders import Features, VGGEncoder
from pixelwise.errors import UserError
from pixelwise.layers import ConvNormAct, bilinear_kernel, make_upsample
from pixelwise.models.anatomy import LoadsOldKeys
from pixelwise.models.hub import HubMixin


def _decoder_upsample(kind: str, channels: int) -> nn.Module:
    """A 2x upsampling of the family; the transposed conv starts as bilinear interpolation."""
    kw = {"init": "bilinear"} if kind == "transposed" else {}
    return make_upsample(kind, channels, channels, 2, **kw)


class SegNetDecoder(nn.Module):
    """Upsample (with the encoder's pooling indices) then convolve, once per encoder stage.

    Args:
        stages: one ``nn.Sequential`` of convolutions per stage, deepest first.
        in_channels: channels entering each stage (what its upsampling sees), deepest first.
        upsample: a ``make_upsample`` kind; "max_unpool" uses the encoder's indices (SegNet).

    Shape:
        the encoder's ``Features`` (the deepest map (B, C, h, w) is the input; ``indices`` and ``sizes``
        of every stage) -> (B, C', H, W), where (H, W) is the size before the first pool (the input size).
    """

    def __init__(self, stages: list[nn.Sequential], in_channels: list[int], upsample: str) -> None:
        super().__init__()
        self.ups = nn.ModuleList([_decoder_upsample(upsample, c) for c in in_channels])
        self.stages = nn.ModuleList(stages)

    def forward(self, feats: Features) -> torch.Tensor:
        x = feats[-1]
        indices = reversed(feats.indices) if feats.indices is not None else [None] * len(self.ups)
        for up, stage, idx, size in zip(self.ups, self.stages, indices, reversed(feats.sizes), strict=True):
            x = up(x, indices=idx, output_size=size)  # (B, C, *size): values back at their argmax positions
            x = stage(x)
        return x


class SegNet(HubMixin, LoadsOldKeys, nn.Module):
    """Encoder with pooling indices -> mirrored decoder -> per-pixel classifier.

    Build it with ``segnet`` or ``segnet_basic``.

    Args:
        encoder: returns the pooled maps with their argmax ``indices`` and pre-pool ``sizes``.
        decoder: a ``SegNetDecoder``.
        head: the class-scoring conv (SegNet's conv1_1_D, SegNet-Basic's 1x1 classifier).

    Shape:
        (B, 3, H, W) -> (B, K, H, W).
    """

    OLD_KEYS = {"classifier.": "head."}  # the head was `classifier` (e.g. segnet_basic_camvid.safetensors)

    def __init__(self, *, encoder: nn.Module, decoder: SegNetDecoder, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)  # pooled maps high -> low res, with their argmax indices and pre-pool sizes
        y = self.decoder(feats)  # (B, C, H, W)
        return self.head(y)  # (B, K, H, W)


class SegNetBasicEncoder(nn.Module):
    """SegNet-Basic's encoder: LRN, then 4 x (7x7 conv, BN, ReLU, 2x2 max-pool keeping indices).

    Args:
        channels: filters per layer (64 in the paper).
        lrn: normalise the input with LRN (size 5, alpha 1e-4, beta 0.75), as the released net does.

    Attributes:
        out_channels: ``[channels] * 4``.
        strides: ``[2, 4, 8, 16]``.

    Shape:
        (B, 3, H, W) -> ``Features``: 4 maps (B, channels, ~H/2^i, ~W/2^i) with their pooling
        ``indices`` and the ``sizes`` (H, W) of each stage before pooling.
    """

    def __init__(self, *, channels: int = 64, lrn: bool = True) -> None:
        super().__init__()
        self.norm = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0) if lrn else nn.Identity()
        # "No biases are used after convolutions" (Sec. 3.1); BN follows each conv anyway.
        self.convs = nn.ModuleList(
            [ConvNormAct(3 if i == 0 else channels, channels, kernel_size=7, bias=False) for i in range(4)]
        )
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True)
        self.out_channels = [channels] * 4
        self.strides = [2, 4, 8, 16]

    def forward(self, x: torch.Tensor) -> Features:
        maps, indices, sizes = [], [], []
        x = self.norm(x)
        for conv in self.convs:
            x = conv(x)
            sizes.append((x.shape[-2], x.shape[-1]))
            x, idx = self.pool(x)  # (B, C, ceil(h/2), ceil(w/2)) and argmax positions
            maps.append(x)
            indices.append(idx)
        return Features(maps, indices=indices, sizes=sizes)


def segnet(
    *,
    num_classes: int,
    upsample: str = "max_unpool",
    width_div: int = 1,
    weights_backbone: str | os.PathLike | None = None,
) -> SegNet:
    """SegNet (Badrinarayanan et al., TPAMI 2017): VGG-16-BN encoder, mirrored decoder, max-unpooling.

    Decoder (Caffe names): unpool5, conv5_3_D..conv5_1_D (512); unpool4, conv4_3_D, conv4_2_D (512),
    conv4_1_D (256); unpool3, conv3_3_D, conv3_2_D (256), conv3_1_D (128); unpool2, conv2_2_D (128),
    conv2_1_D (64); unpool1, conv1_2_D (64); each 3x3 + BN + ReLU; then conv1_1_D, 3x3 to K scores.

    Args:
        num_classes: K.
        upsample: decoder upsampling, a ``make_upsample`` kind ("max_unpool" is SegNet's).
        width_div: divide every width by this (tiny test networks).
        weights_backbone: local torchvision ``vgg16_bn-6c64b313.pth`` for the encoder.

    Shape:
        (B, 3, H, W) -> (B, K, H, W), any H and W.
    """
    encoder = VGGEncoder(
        batch_norm=True, return_indices=True, ceil_mode=True, width_div=width_div, weights=weights_backbone
    )
    c1, c2, c3, c4, c5 = encoder.out_channels
    widths = [[c5, c5, c5, c5], [c4, c4, c4, c3], [c3, c3, c3, c2], [c2, c2, c1], [c1, c1]]  # deepest first
    stages = [nn.Sequential(*(ConvNormAct(a, b) for a, b in zip(w[:-1], w[1:], strict=True))) for w in widths]
    decoder = SegNetDecoder(stages, [w[0] for w in widths], upsample)
    head = nn.Conv2d(c1, num_classes, 3, padding=1)  # conv1_1_D: no BN, no ReLU
    return SegNet(encoder=encoder, decoder=decoder, head=head)


def segnet_basic(
    *,
    num_classes: int,
    upsample: str = "max_unpool",
    encoder_channels: int = 64,
    decoder_channels: int = 64,
    single_channel_decoder: bool = False,
    lrn: bool = True,
) -> SegNet:
    """SegNet-Basic (Badrinarayanan et al., TPAMI 2017, Sec. 3.1) and its decoder variants.

    4 encoders (7x7 conv, BN, ReLU, 2x2 max-pool) and 4 decoders (upsampling, 7x7 conv, BN; no ReLU,
    no biases), then a 1x1 conv to the K class scores; ≈1.4 M parameters with 64 filters.

    Args:
        num_classes: K.
        upsample: decoder upsampling ("max_unpool" is SegNet's; "bilinear" is the paper's
            Bilinear-Interpolation variant; any ``make_upsample`` kind).
        encoder_channels: filters per encoder layer (64).
        decoder_channels: filters per decoder layer (64); other than ``encoder_channels`` only with an
            upsampling that needs no indices.
        single_channel_decoder: SegNet-Basic-SingleChannelDecoder: each decoder filter convolves a
            single channel (a depthwise 7x7 conv); needs ``decoder_channels == encoder_channels``.
        lrn: LRN on the input, as in the released ``segnet_basic_train.prototxt``.

    The paper's FCN-Basic decoder variants on this encoder are built by ``fcn_basic``.

    Shape:
        (B, 3, H, W) -> (B, K, H, W), any H and W.
    """
    if single_channel_decoder and decoder_channels != encoder_channels:
        raise UserError(
            f"single_channel_decoder=True needs decoder_channels == encoder_channels "
            f"(got {decoder_channels} and {encoder_channels}); make them equal"
        )
    if upsample == "max_unpool" and decoder_channels != encoder_channels:
        raise UserError(
            f"upsample='max_unpool' needs decoder_channels == encoder_channels (got {decoder_channels} and "
            f"{encoder_channels}): the pooling indices are per channel; make them equal or use upsample='bilinear'"
        )
    encoder = SegNetBasicEncoder(channels=encoder_channels, lrn=lrn)
    stages = []
    for i in range(4):
        c_in = encoder_channels if i == 0 else decoder_channels
        conv = nn.Conv2d(
            c_in, decoder_channels, 7, padding=3, bias=False, groups=decoder_channels if single_channel_decoder else 1
        )
        stages.append(nn.Sequential(conv, nn.BatchNorm2d(decoder_channels)))  # no ReLU in the decoder (Sec. 3.1)
    decoder = SegNetDecoder(stages, [encoder_channels] + [decoder_channels] * 3, upsample)
    head = nn.Conv2d(decoder_channels, num_classes, 1)
    return SegNet(encoder=encoder, decoder=decoder, head=head)


class FCNBasicUpsample(nn.Module):
    """FCN-Basic's learned 2x upsampling: a transposed conv with 8x8 multi-channel kernels, no bias.

    Sec. 3.1: "upsampling is performed by inverse convolution using a fixed or trainable multi-channel
    upsampling kernel. We set the kernel size to 8 x 8", "initialized using bilinear interpolation
    weights". Every (input, output) channel pair has its own 8x8 kernel (C * C * 64 weights). At
    initialisation channel c only feeds channel c, through FCN's 4x4 bilinear filter for a factor of 2
    placed at the centre of the 8x8 kernel: the layer then equals ``make_upsample("transposed", C, C,
    2, init="bilinear")`` exactly (bilinear 2x upsampling; the outer row and column see zeros beyond
    the image), and training may widen its footprint to the full 8x8.

    Args:
        channels: input and output channels.

    Shape:
        (B, C, h, w) -> (B, C, 2h, 2w), or (B, C, *output_size) with output_size <= (2h, 2w) (the
        pre-pool size of a ceil-mode 2x2 pool: the bottom row / right column are dropped when odd).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        # padding 3: (h - 1) * 2 - 2 * 3 + 8 = 2h outputs, each 2x2 block under its input pixel.
        self.up = nn.ConvTranspose2d(channels, channels, 8, stride=2, padding=3, bias=False)
        with torch.no_grad():
            self.up.weight.zero_()
            filt = bilinear_kernel(4)
            for c in range(channels):
                self.up.weight[c, c, 2:6, 2:6] = filt

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor | None = None, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        y = self.up(x)  # (B, C, 2h, 2w)
        if output_size is None:
            return y
        return y[..., : output_size[0], : output_size[1]]  # (B, C, *output_size), top-left aligned


class FCNBasicScores(nn.Module):
    """FCN-Basic's dimensionality reduction (Sec. 3.1, Fig. 3 right): 1x1 convs that score pooled maps.

    The deepest pooled encoder map (H/16, the decoder's input) and, with ``skip_addition``, the pooled
    maps of the three shallower encoders (H/8, H/4, H/2) are each reduced to K channels by a 1x1 conv
    of their own (with bias, as FCN's score layers): FCN-Basic's class-scoring layers. The decoder that
    follows upsamples and adds the score maps.

    Shape:
        4 pooled maps (B, encoder_channels, ~H/2^i, ~W/2^i), high to low resolution -> their score maps
        (B, K, ~H/2^i, ~W/2^i), high to low resolution (only the deepest without ``skip_addition``).
    """

    def __init__(self, *, encoder_channels: int, num_classes: int, skip_addition: bool) -> None:
        super().__init__()
        self.reduce_input = nn.Conv2d(encoder_channels, num_classes, 1)  # on pool4, the decoder's input
        n_skips = 3 if skip_addition else 0
        self.reduce_skips = nn.ModuleList([nn.Conv2d(encoder_channels, num_classes, 1) for _ in range(n_skips)])

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        skips = [reduce(f) for reduce, f in zip(self.reduce_skips, maps[-2::-1], strict=False)]  # H/8, /4, /2
        return [*reversed(skips), self.reduce_input(maps[-1])]


class FCNBasicDecoder(nn.Module):
    """FCN-Basic's decoder (Sec. 3.1, Fig. 3 right): 4 x (learned 2x deconvolution, + encoder map).

    The deepest map (H/16) is the decoder's input. Each decoder upsamples 2x with an 8x8 deconvolution;
    with ``skip_addition`` the first three then add, element-wise, the map of the shallower encoder at
    that resolution (H/8, H/4, H/2); the last one upsamples to the input size, where no pooled map
    exists. There are no other decoder filters, no BatchNorm and no ReLU. It decodes FCN-Basic's score
    maps (``FCNBasicScores``), or the pooled maps themselves in FCN-Basic-NoDimReduction.

    Args:
        channels: channels of the maps it decodes (K after the reduction, else ``encoder_channels``).
        skip_addition: add the shallower maps; False keeps only the upsampling kernels
            (FCN-Basic-NoAddition).

    Shape:
        maps (B, channels, ~H/2^i, ~W/2^i), high to low resolution (the deepest alone without
        ``skip_addition``), and the pre-pool sizes of the 4 encoder stages -> (B, channels, H, W).
    """

    def __init__(self, *, channels: int, skip_addition: bool) -> None:
        super().__init__()
        self.skip_addition = skip_addition
        self.ups = nn.ModuleList([FCNBasicUpsample(channels) for _ in range(4)])

    def forward(self, maps: list[torch.Tensor], sizes: list[tuple[int, int]]) -> torch.Tensor:
        x = maps[-1]  # (B, C, H/16, W/16)
        skips = maps[-2::-1] if self.skip_addition else []  # H/8, H/4, H/2
        for i, (up, size) in enumerate(zip(self.ups, reversed(sizes), strict=True)):
            x = up(x, output_size=size)  # (B, C, *size): H/8, H/4, H/2, then H
            if i < len(skips):
                x = x + skips[i]  # the (reduced) pooled map of the same resolution
        return x


class FCNBasic(HubMixin, LoadsOldKeys, nn.Module):
    """SegNet-Basic's encoder with FCN's decoding technique (no pooling indices).

    FCN-Basic scores first: the head (``FCNBasicScores``) reduces the pooled maps to K channels and
    the decoder upsamples and adds the score maps. Without the reduction (FCN-Basic-NoDimReduction) the
    decoder works on the pooled maps and the head, a 1x1 conv, scores its output. Modules are registered
    in the order ``forward`` runs them.

    Build it with ``fcn_basic``.

    Shape:
        (B, 3, H, W) -> (B, K, H, W).
    """

    # The score layers were the decoder's `reduce_*`, the NoDimReduction classifier `classifier`.
    OLD_KEYS = {
        "decoder.reduce_input.": "head.reduce_input.",
        "decoder.reduce_skips.": "head.reduce_skips.",
        "classifier.": "head.",
    }

    def __init__(self, *, encoder: SegNetBasicEncoder, decoder: FCNBasicDecoder, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.scores_first = isinstance(head, FCNBasicScores)
        if self.scores_first:
            self.head, self.decoder = head, decoder
        else:
            self.decoder, self.head = decoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)  # 4 pooled maps high -> low res (indices unused), pre-pool sizes
        if self.scores_first:
            scores = self.head(feats)  # (B, K, ~H/2^i, ~W/2^i)
            return self.decoder(scores, feats.sizes)  # (B, K, H, W)
        y = self.decoder(feats, feats.sizes)  # (B, C, H, W)
        return self.head(y)  # (B, K, H, W)


def fcn_basic(
    *,
    num_classes: int,
    skip_addition: bool = True,
    dim_reduction: bool = True,
    encoder_channels: int = 64,
    lrn: bool = True,
) -> FCNBasic:
    """FCN-Basic and its variants (Badrinarayanan et al., TPAMI 2017, Sec. 3.1, Fig. 3, Table 1).

    SegNet-Basic's encoder (4 x 7x7 conv, BN, ReLU, 2x2 max-pool) with the FCN decoding technique:
    1x1 dimensionality reduction of the pooled encoder maps to K channels, 4 learned 2x deconvolutions
    with 8x8 kernels initialised as bilinear upsampling, and after the first three the element-wise
    addition of the reduced pooled map of that resolution (see ``FCNBasicDecoder``). The decoder's
    K-channel output is the score map ("there are no trainable decoder filters in FCN", Fig. 3).

    Table 1 rows (parameters here at K = 11 vs the paper's):
        FCN-Basic (defaults): 0.646 M (0.65 M);
        FCN-Basic-NoAddition (``skip_addition=False``): 0.644 M (0.65 M);
        FCN-Basic-NoDimReduction (``dim_reduction=False``): 1.661 M (1.625 M);
        FCN-Basic-NoAddition-NoDimReduction (both False): 1.661 M (1.625 M).
    Without dimensionality reduction the decoder runs at ``encoder_channels`` and a 1x1 conv to the K
    class scores follows it (the soft-max classifier's input must have K channels).

    Left open by the paper and chosen here: the added maps are the pooled (post-subsampling) encoder
    outputs (Fig. 3's caption; the storage column counts the first pooled map, 180 x 240 for a
    360 x 480 input), so the last upsampling to the input size adds nothing; the 1x1 reductions have
    biases (FCN's score layers do), the deconvolutions none (FCN's upsampling layers); the bilinear
    initialisation of an 8x8 kernel at stride 2 is the 2x bilinear filter centred in it (see
    ``FCNBasicUpsample``); other layers keep PyTorch's default initialisation, as ``segnet_basic``.

    Args:
        num_classes: K.
        skip_addition: add the reduced encoder maps after upsampling (False: FCN-Basic-NoAddition).
        dim_reduction: reduce the encoder maps to K channels (False: FCN-Basic-NoDimReduction).
        encoder_channels: filters per encoder layer (64).
        lrn: LRN on the input, as in the released ``segnet_basic_train.prototxt``.

    Shape:
        (B, 3, H, W) -> (B, K, H, W), any H and W.
    """
    encoder = SegNetBasicEncoder(channels=encoder_channels, lrn=lrn)
    if dim_reduction:
        head = FCNBasicScores(encoder_channels=encoder_channels, num_classes=num_classes, skip_addition=skip_addition)
        decoder = FCNBasicDecoder(channels=num_classes, skip_addition=skip_addition)
    else:
        decoder = FCNBasicDecoder(channels=encoder_channels, skip_addition=skip_addition)
        head = nn.Conv2d(encoder_channels, num_classes, 1)
    return FCNBasic(encoder=encoder, decoder=decoder, head=head)
