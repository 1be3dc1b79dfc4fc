"""FCN with a dilated ResNet-50/101 backbone, state-dict compatible with torchvision.

Long et al., "Fully Convolutional Networks for Semantic Segmentation", CVPR 2015, in the form
torchvision ships as ``torchvision.models.segmentation.fcn_resnet50/101``: a ResNet at output stride
8 (He et al., CVPR 2016; dilation as in Chen et al., arXiv:1706.05587), a 3x3 conv head and bilinear
upsampling to the input size, plus an optional auxiliary head on layer3.

Every key matches torchvision's model of the same name, so
``model.load_state_dict(torchvision_model.state_dict(), strict=True)`` works and the eval logits
equal torchvision's ``["out"]``. With ``aux=True`` (an auxiliary head on layer3) it follows the
auxiliary-output convention of ``pixelwise.models``.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.encoders.resnet import ResNetEncoder
from pixelwise.encoders.timm_encoder import TimmEncoder
from pixelwise.layers import pad_to_multiple
from pixelwise.models.hub import HubMixin


class FCNHead(nn.Sequential):
    """torchvision's FCN head: 3x3 conv to in/4 channels -> BN -> ReLU -> Dropout(0.1) -> 1x1 conv to K.

    Shape:
        (B, in_channels, h, w) -> (B, num_classes, h, w).
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        inter_channels = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inter_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(inter_channels, num_classes, 1),
        )


class SimpleSegmentationModel(HubMixin, nn.Module):
    """Backbone -> classifier on the last feature, + optional aux classifier on the one before.

    The layout of torchvision's ``_SimpleSegmentationModel`` (shared by FCN-ResNet and DeepLabv3),
    with a plain tensor output instead of a dict. The modules keep torchvision's names, which its
    state dicts use; ``encoder``, ``decoder`` and ``head`` are views of them:

    * ``encoder`` is ``backbone``;
    * ``decoder``: each classifier's layers before its last (FCNHead's 3x3 conv, BN, ReLU, Dropout;
      DeepLabHead's ASPP, 3x3 conv, BN, ReLU), the aux classifier's too;
    * ``head``: the last layer of each classifier, the 1x1 conv to class scores.

    Args:
        backbone: a ``ResNetEncoder``, or a ``TimmEncoder`` (its input is padded to a multiple of its
            deepest stride and the logits cropped back).
        classifier: an ``nn.Sequential`` ending in a 1x1 conv to K, applied to layer4's features.
        aux_classifier: the same kind applied to layer3's features in training, or None.

    Shape:
        (B, 3, H, W) -> (B, K, H, W); in training with an aux classifier, a tuple of two such tensors.
    """

    def __init__(
        self, backbone: ResNetEncoder | TimmEncoder, classifier: nn.Module, aux_classifier: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier

    @property
    def encoder(self) -> ResNetEncoder | TimmEncoder:
        return self.backbone

    @property
    def decoder(self) -> nn.ModuleList:
        return nn.ModuleList(nn.Sequential(*list(c)[:-1]) for c in self._classifiers())

    @property
    def head(self) -> nn.ModuleList:
        return nn.ModuleList(c[-1] for c in self._classifiers())

    def _classifiers(self) -> list[nn.Module]:
        return [c for c in (self.classifier, self.aux_classifier) if c is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.backbone.input_multiple)  # (B, 3, H', W'); a ResNetEncoder's 1: no-op
        feats = self.backbone(x)  # list of (B, C_i, H'/s_i, W'/s_i), high to low resolution
        out = self.classifier(feats[-1])  # (B, K, H'/8, W'/8)
        out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)[..., :h, :w]  # (B, K, H, W)
        if self.aux_classifier is None or not self.training:
            return out
        aux = self.aux_classifier(feats[-2])  # (B, K, H'/8, W'/8) from layer3
        aux = F.interpolate(aux, size=x.shape[-2:], mode="bilinear", align_corners=False)[..., :h, :w]  # (B, K, H, W)
        return out, aux


class FCNResNet(SimpleSegmentationModel):
    """FCN-ResNet (Long et al., CVPR 2015, with torchvision's dilated ResNet backbone).

    Shape:
        (B, 3, H, W) -> (B, K, H, W); ``(out, aux)`` in training when built with ``aux=True``.
    """


def _fcn_resnet(depth: int, num_classes: int, aux: bool, weights_backbone: str | os.PathLike | None) -> FCNResNet:
    backbone = ResNetEncoder(depth=depth, output_stride=8, weights=weights_backbone)
    aux_classifier = FCNHead(1024, num_classes) if aux else None
    return FCNResNet(backbone, FCNHead(2048, num_classes), aux_classifier)


def fcn_resnet50(
    *, num_classes: int, aux: bool = False, weights_backbone: str | os.PathLike | None = None
) -> FCNResNet:
    """FCN-ResNet-50 at output stride 8, keys identical to torchvision's ``fcn_resnet50``.

    Args:
        num_classes: number of classes K.
        aux: add the auxiliary FCN head on layer3 (``aux_classifier``, torchvision's ``aux_loss``).
        weights_backbone: path of torchvision's ImageNet ``resnet50`` ``.pth`` file, or None.
    """
    return _fcn_resnet(50, num_classes, aux, weights_backbone)


def fcn_resnet101(
    *, num_classes: int, aux: bool = False, weights_backbone: str | os.PathLike | None = None
) -> FCNResNet:
    """FCN-ResNet-101 at output stride 8, keys identical to torchvision's ``fcn_resnet101``.

    Args:
        num_classes: number of classes K.
        aux: add the auxiliary FCN head on layer3 (``aux_classifier``, torchvision's ``aux_loss``).
        weights_backbone: path of torchvision's ImageNet ``resnet101`` ``.pth`` file, or None.
    """
    return _fcn_resnet(101, num_classes, aux, weights_backbone)


def fcn_timm(
    *,
    num_classes: int,
    encoder: str = "resnet50",
    output_stride: int = 8,
    aux: bool = False,
    weights_backbone: str | os.PathLike | None = None,
) -> FCNResNet:
    """FCN's head (torchvision's ``FCNHead``) on any timm encoder: ``fcn_resnet50``'s layout with
    ``timm.create_model(encoder, features_only=True, output_stride=output_stride)`` as its backbone.

    Args:
        num_classes: number of classes K.
        encoder: a timm model name, e.g. "resnet50", "convnext_tiny", "efficientnet_b0" (needs the
            ``timm`` extra); see ``pixelwise.encoders.TimmEncoder``.
        output_stride: 8 (FCN-ResNet's), 16 or 32, where the timm model supports it.
        aux: add the auxiliary FCN head on the second-deepest features.
        weights_backbone: local file with the timm model's state dict, or None.
    """
    backbone = TimmEncoder(encoder, output_stride=output_stride, weights=weights_backbone)
    aux_classifier = FCNHead(backbone.out_channels[-2], num_classes) if aux else None
    return FCNResNet(backbone, FCNHead(backbone.out_channels[-1], num_classes), aux_classifier)
