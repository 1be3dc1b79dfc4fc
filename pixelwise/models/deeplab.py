"""The DeepLab family: v1 (LargeFOV), v2 (ASPP-L), v3 and v3+.

References:
    v1: Chen, Papandreou, Kokkinos, Murphy, Yuille, "Semantic Image Segmentation with Deep
        Convolutional Nets and Fully Connected CRFs", ICLR 2015 (DeepLab-LargeFOV, Sec. 3.1, 4.1).
    v2: Chen et al., "DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous
        Convolution, and Fully Connected CRFs", TPAMI 2017 (ASPP-L on ResNet-101, Sec. 3.3, 4.1).
    v3: Chen, Papandreou, Schroff, Adam, "Rethinking Atrous Convolution for Semantic Image
        Segmentation", arXiv:1706.05587, 2017 (ASPP with image pooling and BN, Multi-Grid).
    v3+: Chen, Zhu, Papandreou, Schroff, Adam, "Encoder-Decoder with Atrous Separable Convolution
        for Semantic Image Segmentation", ECCV 2018 (decoder on stride-4 features, Sec. 3.1).

``deeplabv3_resnet50/101`` are state-dict compatible with torchvision's models of the same names
(``load_state_dict(tv_model.state_dict(), strict=True)``; equal eval logits), so they keep torchvision's
module names (``backbone``, ``classifier``, ``aux_classifier``; see ``SimpleSegmentationModel`` for their
encoder, decoder and head). v3 with ``aux=True`` follows the auxiliary-output convention of
``pixelwise.models``. The dense CRF that v1/v2 put after the network lives in ``pixelwise.crf``; the
models return logits.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.encoders.resnet import ResNetEncoder
from pixelwise.encoders.timm_encoder import TimmEncoder
from pixelwise.encoders.vgg import VGGEncoder, vgg16_classifier
from pixelwise.errors import UserError
from pixelwise.layers import ASPP, ASPPv2, ConvNormAct, SeparableConv2d, aspp_rates, atrous_conv3x3, pad_to_multiple
from pixelwise.models.anatomy import LoadsOldKeys
from pixelwise.models.fcn_resnet import FCNHead, SimpleSegmentationModel
from pixelwise.models.hub import HubMixin

MULTIGRID: tuple[int, int, int] = (1, 2, 4)  # DeepLabv3, Sec. 4.1: the best unit rates for block4


# --------------------------------------------------------------------------------------------- v1
class LargeFOV(nn.Sequential):
    """DeepLab-LargeFOV's fc6 and fc7 (Chen et al., ICLR 2015, Sec. 4.1 and Table 2).

    fc6: 3x3 conv with dilation (input stride) 12 and 1024 channels, fc7: 1x1 conv with 1024
    channels, each followed by ReLU and Dropout(0.5). fc8, the class scores, is the model's head.

    Shape:
        (B, in_channels, h, w) -> (B, channels, h, w).
    """

    def __init__(self, in_channels: int, channels: int = 1024, rate: int = 12) -> None:
        super().__init__(
            atrous_conv3x3(in_channels, channels, rate),  # fc6
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Conv2d(channels, channels, 1),  # fc7
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )

    @torch.no_grad()
    def init_from_vgg16_fc(self, fc: nn.Sequential) -> None:
        """Start fc6/fc7 from VGG-16's fully connected layers by decimation (ICLR 2015, Sec. 3.1).

        fc6 (4096 x 512*7*7) is subsampled spatially 7x7 -> 3x3 (taps 0, 3, 6) as in the paper, and
        fc6/fc7 keep every 4th filter (4096 -> 1024; how the paper initialised its 1024 filters is not
        stated, decimation is the analogous choice).
        """
        fc6, fc7 = self[0], self[3]
        w6 = fc[0].weight.reshape(-1, fc6.in_channels, 7, 7)  # (4096, 512, 7, 7), C-H-W flattening
        step = w6.shape[0] // fc6.out_channels
        fc6.weight.copy_(w6[::step, :, ::3, ::3])  # (1024, 512, 3, 3)
        fc6.bias.copy_(fc[0].bias[::step])
        fc7.weight.copy_(fc[3].weight[::step, ::step, None, None])  # (1024, 1024, 1, 1)
        fc7.bias.copy_(fc[3].bias[::step])


class DeepLabV1(HubMixin, LoadsOldKeys, nn.Module):
    """DeepLab-LargeFOV (Chen et al., ICLR 2015): VGG-16 at output stride 8, fc6/fc7, fc8.

    Pool4/pool5 have stride 1 and conv5 dilation 2 (see ``VGGEncoder(output_stride=8)``); the class
    scores at stride 8 are upsampled bilinearly to the input size (the paper's fully connected CRF
    is ``pixelwise.crf``).

    Args:
        encoder: the ``VGGEncoder``.
        decoder: ``LargeFOV``, fc6 and fc7 on pool5.
        head: fc8, the 1x1 conv to class scores.

    Shape:
        (B, 3, H, W) -> (B, K, H, W).
    """

    # was `backbone` and `classifier` (fc6 at 0, fc7 at 3, fc8 at 6)
    OLD_KEYS = {"backbone.": "encoder.", "classifier.6.": "head.", "classifier.": "decoder."}

    def __init__(self, encoder: VGGEncoder, decoder: LargeFOV, head: nn.Conv2d) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)  # pool1..pool5, (B, C_i, H/s_i, W/s_i), high to low resolution
        y = self.decoder(feats[-1])  # fc6, fc7: (B, 1024, H/8, W/8)
        y = self.head(y)  # fc8: (B, K, H/8, W/8)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, K, H, W)


def deeplab_v1(*, num_classes: int, weights_backbone: str | os.PathLike | None = None) -> DeepLabV1:
    """DeepLab-LargeFOV, VGG-16 (ICLR 2015; 20.5 M parameters with 21 classes, Table 2).

    Args:
        num_classes: number of classes K.
        weights_backbone: path of torchvision's ImageNet ``vgg16`` ``.pth`` file, or None. Its conv
            layers load by key and fc6/fc7 start from its decimated fully connected layers.
    """
    # Caffe geometry of DeepLab-LargeFOV/train.prototxt: 3x3 pad-1 pools, sizes rounded up.
    encoder = VGGEncoder(output_stride=8, pool_kernel=3, ceil_mode=True, weights=weights_backbone)
    decoder = LargeFOV(encoder.out_channels[-1])
    head = nn.Conv2d(decoder[3].out_channels, num_classes, 1)  # fc8
    nn.init.normal_(head.weight, std=0.01)  # as the Caffe prototxt starts fc8: Gaussian std 0.01, zero bias
    nn.init.zeros_(head.bias)
    if weights_backbone is not None:
        decoder.init_from_vgg16_fc(vgg16_classifier(weights=weights_backbone))
    return DeepLabV1(encoder, decoder, head)


# --------------------------------------------------------------------------------------------- v2
class DeepLabV2(HubMixin, LoadsOldKeys, nn.Module):
    """DeepLab v2 (Chen et al., TPAMI 2017): ResNet-101 at output stride 8 + ASPP-L.

    ASPP-L: four 3x3 atrous convs (rates 6, 12, 18, 24) from layer4 straight to class scores, the
    four score maps summed; bilinear upsampling to the input size. Its branches score the features
    directly, so they are the head and there is no decoder (``nn.Identity``). The paper's multi-scale
    input fusion (MSC) and dense CRF are training/post-processing options, not part of this module.

    Shape:
        (B, 3, H, W) -> (B, K, H, W).
    """

    OLD_KEYS = {"backbone.": "encoder.", "classifier.": "head."}  # was `backbone` and `classifier`

    def __init__(self, encoder: ResNetEncoder, head: ASPPv2) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = nn.Identity()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)  # stem, layer1..layer4, high to low resolution
        y = self.decoder(feats[-1])  # (B, 2048, H/8, W/8)
        y = self.head(y)  # (B, K, H/8, W/8): the four branches' scores summed
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, K, H, W)


def deeplab_v2(
    *,
    num_classes: int,
    rates: tuple[int, ...] = (6, 12, 18, 24),
    weights_backbone: str | os.PathLike | None = None,
) -> DeepLabV2:
    """DeepLab v2 ResNet-101 with ASPP-L (TPAMI 2017, Table 4 / Sec. 4.1).

    Args:
        num_classes: number of classes K.
        rates: atrous rates of the summed branches; (6, 12, 18, 24) is ASPP-L, (2, 4, 8, 12) ASPP-S.
        weights_backbone: path of torchvision's ImageNet ``resnet101`` ``.pth`` file, or None.
    """
    encoder = ResNetEncoder(depth=101, output_stride=8, weights=weights_backbone)
    return DeepLabV2(encoder, ASPPv2(2048, num_classes, rates=rates, hidden_channels=None))


# --------------------------------------------------------------------------------------------- v3
class DeepLabHead(nn.Sequential):
    """torchvision's DeepLabv3 head: ASPP -> 3x3 conv 256 -> BN -> ReLU -> 1x1 conv to K.

    Shape:
        (B, in_channels, h, w) -> (B, num_classes, h, w).
    """

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: tuple[int, ...] = (12, 24, 36)) -> None:
        super().__init__(
            ASPP(in_channels, atrous_rates),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.Conv2d(256, num_classes, 1),
        )


class DeepLabV3(SimpleSegmentationModel):
    """DeepLab v3 (Chen et al., arXiv:1706.05587): dilated ResNet + ASPP head, torchvision's layout.

    Shape:
        (B, 3, H, W) -> (B, K, H, W); ``(out, aux)`` in training when built with ``aux=True``.
    """


def _deeplabv3(
    depth: int,
    num_classes: int,
    output_stride: int,
    multigrid: bool,
    aux: bool,
    weights_backbone: str | os.PathLike | None,
) -> DeepLabV3:
    rates = aspp_rates(output_stride)
    backbone = ResNetEncoder(
        depth=depth, output_stride=output_stride, multigrid=MULTIGRID if multigrid else None, weights=weights_backbone
    )
    aux_classifier = FCNHead(1024, num_classes) if aux else None
    return DeepLabV3(backbone, DeepLabHead(2048, num_classes, rates), aux_classifier)


def deeplabv3_resnet50(
    *,
    num_classes: int,
    output_stride: int = 8,
    multigrid: bool = False,
    aux: bool = False,
    weights_backbone: str | os.PathLike | None = None,
) -> DeepLabV3:
    """DeepLab v3 ResNet-50, keys identical to torchvision's ``deeplabv3_resnet50``.

    Args:
        num_classes: number of classes K.
        output_stride: 8 (torchvision's default; ASPP rates 12, 24, 36) or 16 (rates 6, 12, 18).
        multigrid: layer4 unit rates (1, 2, 4) times its dilation (the paper's Multi-Grid); False
            keeps torchvision's layout. Changes no parameter.
        aux: add the auxiliary FCN head on layer3 (``aux_classifier``, torchvision's ``aux_loss``).
        weights_backbone: path of torchvision's ImageNet ``resnet50`` ``.pth`` file, or None.
    """
    return _deeplabv3(50, num_classes, output_stride, multigrid, aux, weights_backbone)


def deeplabv3_resnet101(
    *,
    num_classes: int,
    output_stride: int = 8,
    multigrid: bool = False,
    aux: bool = False,
    weights_backbone: str | os.PathLike | None = None,
) -> DeepLabV3:
    """DeepLab v3 ResNet-101, keys identical to torchvision's ``deeplabv3_resnet101``.

    Args:
        num_classes: number of classes K.
        output_stride: 8 (torchvision's default; ASPP rates 12, 24, 36) or 16 (rates 6, 12, 18).
        multigrid: layer4 unit rates (1, 2, 4) times its dilation (the paper's Multi-Grid); False
            keeps torchvision's layout. Changes no parameter.
        aux: add the auxiliary FCN head on layer3 (``aux_classifier``, torchvision's ``aux_loss``).
        weights_backbone: path of torchvision's ImageNet ``resnet101`` ``.pth`` file, or None.
    """
    return _deeplabv3(101, num_classes, output_stride, multigrid, aux, weights_backbone)


# -------------------------------------------------------------------------------------------- v3+
LOW_LEVEL_CHANNELS = 48  # v3+, Sec. 4.1 (Table 1): the stride-4 features reduced to 48 channels


class DeepLabV3PlusDecoder(nn.Module):
    """ASPP on the deepest features, then the DeepLab v3+ decoder (Chen et al., ECCV 2018, Sec. 3.1).

    The stride-4 low-level features are reduced by a 1x1 conv to 48 channels (so they do not
    outweigh the 256 ASPP channels), concatenated with the ASPP output upsampled to their size and
    refined by ``fuse``; the model's head classifies them. The paper counts ASPP in its encoder
    (DeepLabv3 as encoder); here the encoder is the ImageNet ResNet (what ``train.freeze_encoder``
    freezes) and ASPP opens the decoder.

    Args:
        aspp: the v3 ASPP, or any module from the deepest features to 256 channels (the separable
            layout: a separable ASPP and a separable 3x3 conv).
        low_channels: channels of the stride-4 features (layer1: 256).
        fuse: the refining convs, from 256 + 48 to 256 channels (the paper: two 3x3 convs with 256).
        low_index: the position of the stride-4 features in the encoder's list (1 for a ResNet:
            stem, layer1, ...; 0 for a ConvNeXt, whose first map has stride 4).

    Shape:
        the encoder's ``Features`` (layer4 (B, 2048, H/os, W/os), layer1 (B, low_channels, H/4, W/4))
        -> (B, 256, H/4, W/4).
    """

    def __init__(self, aspp: nn.Module, low_channels: int, fuse: nn.Module, low_index: int = 1) -> None:
        super().__init__()
        self.aspp = aspp
        self.low_index = low_index
        self.reduce = ConvNormAct(low_channels, LOW_LEVEL_CHANNELS, kernel_size=1)
        self.fuse = fuse

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.aspp(feats[-1])  # (B, 256, H/os, W/os)
        low = self.reduce(feats[self.low_index])  # (B, 48, H/4, W/4): the stride-4 feature (a ResNet's layer1)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)  # (B, 256, H/4, W/4)
        return self.fuse(torch.cat([x, low], dim=1))  # (B, 256, H/4, W/4)


class DeepLabV3Plus(HubMixin, LoadsOldKeys, nn.Module):
    """DeepLab v3+ (Chen et al., ECCV 2018): a dilated ResNet, ASPP and a simple decoder at stride 4.

    Args:
        encoder: a ``ResNetEncoder`` (output stride 16 or 8), or a ``TimmEncoder`` (its input is padded
            to a multiple of its deepest stride and the logits cropped back).
        decoder: ``DeepLabV3PlusDecoder`` (ASPP on layer4, fused with layer1's features).
        head: the final 1x1 conv to class scores.

    Shape:
        (B, 3, H, W) -> (B, K, H, W).
    """

    # was `backbone`, a top-level `aspp`, and the decoder's own `classifier`
    OLD_KEYS = {"backbone.": "encoder.", "aspp.": "decoder.aspp.", "decoder.classifier.": "head."}

    def __init__(self, encoder: ResNetEncoder | TimmEncoder, decoder: DeepLabV3PlusDecoder, head: nn.Conv2d) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.encoder.input_multiple)  # (B, 3, H', W'); a ResNetEncoder's 1: no-op
        feats = self.encoder(x)  # stem, layer1..layer4, (B, C_i, H'/s_i, W'/s_i), high to low resolution
        y = self.decoder(feats)  # (B, 256, H'/4, W'/4)
        y = self.head(y)  # (B, K, H'/4, W'/4)
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, K, H', W')
        return y[..., :h, :w]  # (B, K, H, W)


def _v3plus_blocks(in_channels: int, rates: tuple[int, ...], separable: bool) -> tuple[nn.Module, nn.Module]:
    """v3+'s ASPP (deepest features -> 256 channels) and the refining convs after the stride-4 fusion."""
    fused = 256 + LOW_LEVEL_CHANNELS  # the upsampled ASPP output and the reduced stride-4 features
    # Dropout 0.1 after the ASPP projection: keep_prob=0.9 in the authors' TensorFlow code (model.py).
    if separable:
        # segmentation-models-pytorch's DeepLabV3Plus layout: separable atrous branches, a separable 3x3
        # conv at stride os after ASPP, one separable 3x3 conv at stride 4
        aspp = nn.Sequential(
            ASPP(in_channels, rates, dropout=0.1, conv_layer=SeparableConv2d),
            ConvNormAct(256, 256, conv_layer=SeparableConv2d),
        )
        return aspp, nn.Sequential(ConvNormAct(fused, 256, conv_layer=SeparableConv2d))
    aspp = ASPP(in_channels, rates, dropout=0.1)
    return aspp, nn.Sequential(ConvNormAct(fused, 256), ConvNormAct(256, 256))  # the paper's Table 2 choice


def _deeplabv3plus(
    depth: int,
    num_classes: int,
    output_stride: int,
    multigrid: bool,
    separable: bool,
    weights_backbone: str | os.PathLike | None,
) -> DeepLabV3Plus:
    encoder = ResNetEncoder(
        depth=depth, output_stride=output_stride, multigrid=MULTIGRID if multigrid else None, weights=weights_backbone
    )
    aspp, fuse = _v3plus_blocks(2048, aspp_rates(output_stride), separable)
    decoder = DeepLabV3PlusDecoder(aspp, encoder.out_channels[1], fuse)
    return DeepLabV3Plus(encoder, decoder, nn.Conv2d(256, num_classes, 1))


def deeplabv3plus_resnet50(
    *,
    num_classes: int,
    output_stride: int = 16,
    multigrid: bool = False,
    separable: bool = False,
    weights_backbone: str | os.PathLike | None = None,
) -> DeepLabV3Plus:
    """DeepLab v3+ with a ResNet-50 encoder (40.4 M parameters with 21 classes; separable: 26.7 M).

    Args:
        num_classes: number of classes K.
        output_stride: 16 (the paper's training default; ASPP rates 6, 12, 18) or 8 (12, 24, 36).
        multigrid: layer4 unit rates (1, 2, 4) times its dilation (DeepLabv3's Multi-Grid).
        separable: depthwise-separable 3x3 convs in ASPP and decoder (the paper's setting for Xception,
            Sec. 3.2) in the layout of segmentation-models-pytorch's ``DeepLabV3Plus``: separable atrous
            branches, a separable 3x3 conv after ASPP (at stride os), one separable 3x3 conv fusing at
            stride 4, no norm between depthwise and pointwise (the authors' TensorFlow code has BN + ReLU
            there and both refining convs at stride 4). False: the paper's ResNet decoder, full 3x3 convs.
        weights_backbone: path of torchvision's ImageNet ``resnet50`` ``.pth`` file, or None.
    """
    return _deeplabv3plus(50, num_classes, output_stride, multigrid, separable, weights_backbone)


def deeplabv3plus_resnet101(
    *,
    num_classes: int,
    output_stride: int = 16,
    multigrid: bool = False,
    separable: bool = False,
    weights_backbone: str | os.PathLike | None = None,
) -> DeepLabV3Plus:
    """DeepLab v3+ with a ResNet-101 encoder (the paper's ResNet-101 model, Table 3).

    Args:
        num_classes: number of classes K.
        output_stride: 16 (the paper's training default; ASPP rates 6, 12, 18) or 8 (12, 24, 36).
        multigrid: layer4 unit rates (1, 2, 4) times its dilation (DeepLabv3's Multi-Grid).
        separable: depthwise-separable ASPP and decoder in smp's layout, as ``deeplabv3plus_resnet50``.
        weights_backbone: path of torchvision's ImageNet ``resnet101`` ``.pth`` file, or None.
    """
    return _deeplabv3plus(101, num_classes, output_stride, multigrid, separable, weights_backbone)


def deeplabv3_timm(
    *,
    num_classes: int,
    encoder: str = "resnet50",
    output_stride: int = 8,
    aux: bool = False,
    weights_backbone: str | os.PathLike | None = None,
) -> DeepLabV3:
    """DeepLab v3's head (ASPP, torchvision's ``DeepLabHead``) on any timm encoder.

    Args:
        num_classes: number of classes K.
        encoder: a timm model name, e.g. "resnet50", "convnext_tiny", "efficientnet_b0" (needs the
            ``timm`` extra); see ``pixelwise.encoders.TimmEncoder``.
        output_stride: 8 (ASPP rates 12, 24, 36) or 16 (6, 12, 18), where the timm model supports it.
        aux: add the auxiliary FCN head on the second-deepest features.
        weights_backbone: local file with the timm model's state dict, or None.
    """
    rates = aspp_rates(output_stride)  # checked before the encoder is built
    backbone = TimmEncoder(encoder, output_stride=output_stride, weights=weights_backbone)
    aux_classifier = FCNHead(backbone.out_channels[-2], num_classes) if aux else None
    head = DeepLabHead(backbone.out_channels[-1], num_classes, rates)
    return DeepLabV3(backbone, head, aux_classifier)


def deeplabv3plus_timm(
    *,
    num_classes: int,
    encoder: str = "resnet50",
    output_stride: int = 16,
    weights_backbone: str | os.PathLike | None = None,
) -> DeepLabV3Plus:
    """DeepLab v3+ (ASPP and the stride-4 decoder) on any timm encoder that has stride-4 features.

    Args:
        num_classes: number of classes K.
        encoder: a timm model name, e.g. "resnet50", "convnext_tiny", "efficientnet_b0" (needs the
            ``timm`` extra); see ``pixelwise.encoders.TimmEncoder``.
        output_stride: 16 (the paper's training default; ASPP rates 6, 12, 18) or 8 (12, 24, 36), where
            the timm model supports it.
        weights_backbone: local file with the timm model's state dict, or None.
    """
    rates = aspp_rates(output_stride)  # checked before the encoder is built
    backbone = TimmEncoder(encoder, output_stride=output_stride, weights=weights_backbone)
    if 4 not in backbone.strides:
        raise UserError(
            f"encoder={encoder!r} has no stride-4 features (strides {backbone.strides}) for the v3+ decoder; "
            "choose another encoder or deeplabv3_timm"
        )
    low = backbone.strides.index(4)
    aspp, fuse = _v3plus_blocks(backbone.out_channels[-1], rates, separable=False)
    decoder = DeepLabV3PlusDecoder(aspp, backbone.out_channels[low], fuse, low_index=low)
    return DeepLabV3Plus(backbone, decoder, nn.Conv2d(256, num_classes, 1))
