"""FCN-32s, FCN-16s and FCN-8s: Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015 (and the reference nets in shelhamer/fcn.berkeleyvision.org).

VGG-16 with its classifier convolutionalized (fc6 = 7x7 conv 4096, fc7 = 1x1 conv 4096, each with
ReLU and Dropout), a 1x1 class-scoring layer ``score_fr``, and up to two skips: ``score_pool4`` (FCN-16s)
and ``score_pool3`` (FCN-8s) score a shallower pool, and the upsampled coarse scores are added to
them. Upsampling is a transposed convolution initialised to bilinear interpolation; the final one is
fixed, the intermediate 2x ones are learned (Sec. 4.3 of the paper), or any kind of
``pixelwise.layers.make_upsample``.

Two geometries:

* ``"original"``: the Caffe nets exactly: conv1_1 has padding 100, pools round up, fc6 is an
  unpadded 7x7 conv, each upsampling has the extent of Caffe's unpadded Deconvolution ((h+1)*s
  rows) and the crops use the published offsets (FCN-32s 19; FCN-16s 5, 27; FCN-8s 5, 9, 31).
* ``"same"``: no 100-pixel padding; fc6 has padding 3, pools round up, and each upsampled map is
  cropped at its bottom/right to the skip's (or the input's) size. Cheaper; any input size.

Staged training (Sec. 4.2): ``fcn16s(init_from=fcn32s_model)`` and ``fcn8s(init_from=fcn16s_model)``
copy the coarser net; every scoring layer starts at zero (as in the paper and the Caffe nets), so
the finer net starts from the coarser net's predictions. The "at-once" FCN-8s
(``voc-fcn8s-atonce``) is trained from VGG-16 in one go and scales pool4 by 0.01 and pool3 by 1e-4
before scoring them (``at_once=True``).

Anatomy: the encoder is VGG-16 with fc6/fc7 (``FCNEncoder``), the head the score layers (``FCNScores``),
the decoder the upsampling and summing of the score maps (``FCNDecoder``; in FCN-32s only the final
fixed 32x upsampling). FCN scores before it upsamples, so its forward runs encoder, head, decoder.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.encoders import Features, VGGEncoder, load_by_key, load_state_dict_file, vgg16_classifier
from pixelwise.errors import UserError
from pixelwise.layers import convolutionalize, make_upsample
from pixelwise.models.anatomy import LoadsOldKeys
from pixelwise.models.hub import HubMixin

GEOMETRIES = ("same", "original")

# Caffe crop offsets (voc-fcn{32,16,8}s/train.prototxt), relative to unpadded Deconvolution outputs:
# (offsets of the score_pool4 and score_pool3 crops, offset of the final crop to the input).
_CAFFE_OFFSETS: dict[int, tuple[tuple[int, ...], int]] = {32: ((), 19), 16: ((5,), 27), 8: ((5, 9), 31)}
_AT_ONCE_SCALES = (0.01, 0.0001)  # voc-fcn8s-atonce: Scale layers on pool4 and pool3 ("for compatibility")


def _caffe_upsample(up: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Upsample with the extent of Caffe's unpadded Deconvolution (kernel 2s, stride s): (h+1)*s rows.

    Our upsamplers return h*s rows, row i at input coordinate (i + 0.5)/s - 0.5; Caffe's output
    starts s/2 rows earlier and ends s/2 rows later. Upsampling the zero-padded input and cropping
    s/2 gives exactly that extent (and exactly Caffe's values for the bilinear transposed conv).
    """
    s = up.scale
    h, w = x.shape[-2:]
    y = up(F.pad(x, (1, 1, 1, 1)))  # (B, K, (h+2)*s, (w+2)*s)
    return y[..., s // 2 : s // 2 + (h + 1) * s, s // 2 : s // 2 + (w + 1) * s]  # (B, K, (h+1)*s, (w+1)*s)


class FCNEncoder(VGGEncoder):
    """VGG-16 convolutionalized (Long et al., CVPR 2015, Sec. 3.1): VGG's pools, then fc6/fc7 as convs.

    fc6 is a 7x7 conv and fc7 a 1x1 conv (4096 channels each, with ReLU and Dropout), made from VGG-16's
    classifier by ``convolutionalize``, so a torchvision ImageNet file loads into the convs and both.
    Pools round up, as Caffe's do.

    Args:
        conv1_padding: 100 for the Caffe nets (room for fc6's 7x7 on any input), 1 otherwise.
        fc_padding: padding of fc6: 0 in the Caffe nets, 3 to keep pool5's size.
        width_div: divide every width by this (tiny test networks).
        fc_channels: width of fc6/fc7 (4096 in VGG-16), divided by ``width_div``.
        weights: local torchvision ``vgg16-397923af.pth``; conv layers and fc6/fc7 load from it.

    Attributes:
        out_channels: pool1..pool5 and fc7.
        strides: ``[2, 4, 8, 16, 32, 32]``.

    Shape:
        (B, 3, H, W) -> ``Features``: pool1..pool5 (B, C_i, ~H/2^i, ~W/2^i) and fc7
        (B, fc_channels, h5 + 2 * fc_padding - 6, w5 + 2 * fc_padding - 6), (h5, w5) being pool5's size.
    """

    def __init__(
        self,
        *,
        conv1_padding: int,
        fc_padding: int,
        width_div: int,
        fc_channels: int,
        weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(ceil_mode=True, conv1_padding=conv1_padding, width_div=width_div)
        classifier = vgg16_classifier(width_div=width_div, fc_channels=fc_channels)
        if weights is not None:
            state = load_state_dict_file(weights)
            hint = "pass torchvision's vgg16-397923af.pth (with its classifier) and keep width_div=1, fc_channels=4096"
            load_by_key(self.features, state, "features.", path=weights, hint=hint)
            fc_state = {k: v for k, v in state.items() if k.startswith(("classifier.0.", "classifier.3."))}
            load_by_key(classifier, fc_state, "classifier.", path=weights, hint=hint)
        self.fc = convolutionalize(classifier, in_channels=self.out_channels[4], spatial=7)
        self.fc[0].padding = (fc_padding, fc_padding)
        self.out_channels = [*self.out_channels, self.fc[3].out_channels]
        self.strides = [*self.strides, 32]

    def forward(self, x: torch.Tensor) -> Features:
        feats = super().forward(x)  # pool1..pool5
        feats.append(self.fc(feats[-1]))  # fc7: (B, C_fc, h, w)
        return feats


class FCNScores(nn.Module):
    """FCN's class-scoring layers: 1x1 convs on fc7 (``score_fr``), pool4 (``score_pool4``, FCN-16s/8s)
    and pool3 (``score_pool3``, FCN-8s), all starting at zero (Sec. 4.3 and 4.2).

    Args:
        in_channels: channels of pool3, pool4 and fc7.
        num_classes: K.
        stride: 32, 16 or 8: which skips are scored.
        skip_scales: factors on pool4 and pool3 before scoring (1 and 1; 0.01 and 1e-4 "at once").

    Shape:
        the encoder's pool1..pool5 and fc7 -> score maps (B, K, h_i, w_i) of fc7, pool4 and pool3, coarse
        to fine (as many as the stride scores).
    """

    def __init__(
        self, *, in_channels: tuple[int, int, int], num_classes: int, stride: int, skip_scales: tuple[float, float]
    ) -> None:
        super().__init__()
        c3, c4, c_fc = in_channels
        self.skip_scales = skip_scales
        n_skips = {32: 0, 16: 1, 8: 2}[stride]
        self.skips = [("score_pool4", 3), ("score_pool3", 2)][:n_skips]  # (score layer, encoder stage), coarse first
        self.score_fr = nn.Conv2d(c_fc, num_classes, 1)
        if stride <= 16:
            self.score_pool4 = nn.Conv2d(c4, num_classes, 1)
        if stride == 8:
            self.score_pool3 = nn.Conv2d(c3, num_classes, 1)
        for score in self.children():  # "zero-initialize the class scoring layer" (Sec. 4.3), skips too (Sec. 4.2)
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        scores = [self.score_fr(feats[-1])]  # (B, K, h, w) coarse scores of fc7
        for (name, stage), scale in zip(self.skips, self.skip_scales, strict=False):
            f = feats[stage] * scale if scale != 1 else feats[stage]
            scores.append(getattr(self, name)(f))  # (B, K, h_stage, w_stage)
        return scores


class FCNDecoder(nn.Module):
    """FCN's skip architecture (Sec. 4.2): upsample the coarse scores 2x, add the next finer scores,
    repeat; then upsample to the input size and crop. The final upsampling stays fixed bilinear (Sec. 4.3).

    Args:
        num_classes: K.
        stride: 32, 16 or 8 (FCN-32s, -16s, -8s): the number of 2x steps before the final upsampling.
        geometry: "same" or "original" (see the module docstring).
        upsample: a ``make_upsample`` kind; "transposed" is the paper's bilinear-initialised deconvolution.
        learnable_upsample: learn the intermediate 2x transposed convs (paper) or fix them (reference nets).

    Shape:
        score maps coarse to fine (as ``FCNScores`` gives them) and the input size (H, W) -> (B, K, H, W).
    """

    def __init__(
        self, *, num_classes: int, stride: int, geometry: str, upsample: str, learnable_upsample: bool
    ) -> None:
        super().__init__()
        if stride not in _CAFFE_OFFSETS:
            raise UserError(f"FCN stride={stride!r} is not supported; choose 32, 16 or 8")
        if geometry not in GEOMETRIES:
            raise UserError(f"FCN geometry={geometry!r} is not supported; choose 'same' or 'original'")
        if upsample == "max_unpool":
            raise UserError("FCN upsample='max_unpool' is not possible: FCN keeps no pooling indices; use 'transposed'")
        self.stride, self.geometry = stride, geometry

        def up(scale: int, learnable: bool) -> nn.Module:
            kw = {"init": "bilinear", "bias": False, "learnable": learnable} if upsample == "transposed" else {}
            return make_upsample(upsample, num_classes, num_classes, scale, **kw)

        if stride <= 16:
            self.upscore2 = up(2, learnable_upsample)
        if stride == 8:
            self.upscore_pool4 = up(2, learnable_upsample)
        self.upscore = up(stride, False)  # the final upsampling stays bilinear (Sec. 4.3)

    def forward(self, scores: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        offsets, final_offset = _CAFFE_OFFSETS[self.stride]
        original = self.geometry == "original"
        ups = [getattr(self, n) for n in ("upscore2", "upscore_pool4") if hasattr(self, n)]
        y = scores[0]
        for j, (up, skip) in enumerate(zip(ups, scores[1:], strict=True)):
            if original:
                y = _caffe_upsample(up, y)  # (B, K, (h+1)*2, (w+1)*2)
                o = offsets[j]
                skip = skip[..., o : o + y.shape[-2], o : o + y.shape[-1]]  # Caffe Crop to y's size
            else:
                # Pools round up, so 2 * h >= h_skip: crop the bottom/right overhang.
                y = up(y)[..., : skip.shape[-2], : skip.shape[-1]]  # (B, K, h_skip, w_skip)
            y = y + skip
        height, width = size
        if original:
            y = _caffe_upsample(self.upscore, y)
            o = final_offset
            return y[..., o : o + height, o : o + width]  # (B, K, H, W)
        return self.upscore(y)[..., :height, :width]  # (B, K, H, W)


class FCN(HubMixin, LoadsOldKeys, nn.Module):
    """FCN-32s / FCN-16s / FCN-8s on a VGG-16 encoder (Long et al., CVPR 2015).

    FCN scores first and upsamples the scores: the head scores fc7 and the skips, the decoder upsamples
    and sums the score maps. Build it with ``fcn32s``, ``fcn16s`` or ``fcn8s``.

    Args:
        encoder: an ``FCNEncoder`` (VGG-16 with fc6/fc7 as convolutions).
        head: ``FCNScores``, the 1x1 score layers.
        decoder: ``FCNDecoder``, the upsampling and fusion of the score maps.

    Shape:
        (B, 3, H, W) -> (B, K, H, W).
    """

    # fc6/fc7 were the model's `fc`, the score and upsampling layers its own attributes
    OLD_KEYS = {"fc.": "encoder.fc.", "score_": "head.score_", "upscore": "decoder.upscore"}

    def __init__(self, *, encoder: FCNEncoder, head: FCNScores, decoder: FCNDecoder) -> None:
        super().__init__()
        self.stride, self.geometry = decoder.stride, decoder.geometry
        self.encoder = encoder
        self.head = head
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)  # pool1..pool5 and fc7, (B, C_i, ~H/2^i, ~W/2^i)
        scores = self.head(feats)  # class scores of fc7, pool4 and pool3 (as the stride has them), coarse to fine
        return self.decoder(scores, x.shape[-2:])  # (B, K, H, W)


def _build(
    stride: int,
    *,
    num_classes: int,
    geometry: str,
    upsample: str,
    learnable_upsample: bool,
    width_div: int,
    fc_channels: int,
    weights_backbone: str | os.PathLike | None,
    init_from: FCN | None,
    skip_scales: tuple[float, float] = (1.0, 1.0),
) -> FCN:
    if geometry not in GEOMETRIES:
        raise UserError(f"FCN geometry={geometry!r} is not supported; choose 'same' or 'original'")
    if weights_backbone is not None and init_from is not None:
        raise UserError("pass weights_backbone or init_from, not both: init_from already carries the VGG-16 weights")
    original = geometry == "original"
    # 'same': no 100-pixel padding, and fc6 keeps pool5's size
    encoder = FCNEncoder(
        conv1_padding=100 if original else 1,
        fc_padding=0 if original else 3,
        width_div=width_div,
        fc_channels=fc_channels,
        weights=weights_backbone,
    )
    c = encoder.out_channels
    head = FCNScores(in_channels=(c[2], c[3], c[5]), num_classes=num_classes, stride=stride, skip_scales=skip_scales)
    decoder = FCNDecoder(
        num_classes=num_classes,
        stride=stride,
        geometry=geometry,
        upsample=upsample,
        learnable_upsample=learnable_upsample,
    )
    model = FCN(encoder=encoder, head=head, decoder=decoder)
    if init_from is not None:
        _init_from_coarser(model, init_from)
    return model


def _init_from_coarser(model: FCN, coarser: FCN) -> None:
    """Copy the coarser FCN's encoder (with fc6/fc7), score_fr, score_pool4 and intermediate upsampling."""
    if not isinstance(coarser, FCN) or coarser.stride <= model.stride:
        got = f"FCN-{coarser.stride}s" if isinstance(coarser, FCN) else type(coarser).__name__
        raise UserError(f"init_from={got} must be a coarser FCN than FCN-{model.stride}s (FCN-32s -> 16s -> 8s)")
    if coarser.geometry != model.geometry:
        raise UserError(
            f"init_from has geometry={coarser.geometry!r} but this net has {model.geometry!r}; build both alike"
        )
    # The final upsampling is not copied: it has a different factor in the finer net.
    kept = ("encoder.", "head.score_fr.", "head.score_pool4.", "decoder.upscore2.")
    theirs = {k: v for k, v in coarser.state_dict().items() if k.startswith(kept)}
    own = model.state_dict()
    for key, value in theirs.items():
        if key not in own or own[key].shape != value.shape:
            ours = tuple(own[key].shape) if key in own else "absent"
            raise UserError(
                f"init_from: {key} does not fit ({tuple(value.shape)} vs {ours}); "
                f"build the finer FCN with the same num_classes, width_div, fc_channels and upsample"
            )
    model.load_state_dict(theirs, strict=False)


def fcn32s(
    *,
    num_classes: int,
    geometry: str = "same",
    upsample: str = "transposed",
    learnable_upsample: bool = True,
    width_div: int = 1,
    fc_channels: int = 4096,
    weights_backbone: str | os.PathLike | None = None,
) -> FCN:
    """FCN-32s: VGG-16, fc6/fc7 as convolutions, scores upsampled 32x (Long et al., CVPR 2015).

    Args:
        num_classes: K.
        geometry: "same" (any size, no 100-pixel padding) or "original" (the Caffe net exactly).
        upsample: a ``make_upsample`` kind for the upsampling ("transposed": bilinear-initialised deconv).
        learnable_upsample: learn the intermediate 2x upsamplings (none in FCN-32s).
        width_div: divide every VGG and fc width by this (tiny test networks).
        fc_channels: width of fc6/fc7 (4096 in VGG-16), divided by ``width_div``.
        weights_backbone: local torchvision ``vgg16-397923af.pth``; conv layers and fc6/fc7 load from it.

    Shape:
        (B, 3, H, W) -> (B, K, H, W).
    """
    return _build(
        32,
        num_classes=num_classes,
        geometry=geometry,
        upsample=upsample,
        learnable_upsample=learnable_upsample,
        width_div=width_div,
        fc_channels=fc_channels,
        weights_backbone=weights_backbone,
        init_from=None,
    )


def fcn16s(
    *,
    num_classes: int,
    geometry: str = "same",
    upsample: str = "transposed",
    learnable_upsample: bool = True,
    width_div: int = 1,
    fc_channels: int = 4096,
    weights_backbone: str | os.PathLike | None = None,
    init_from: FCN | None = None,
) -> FCN:
    """FCN-16s: FCN-32s plus a pool4 skip, scores upsampled 2x + 16x (Long et al., CVPR 2015).

    Args: as ``fcn32s``, and
        init_from: an FCN-32s to start from (staged training); the new ``score_pool4`` starts at
            zero, so at initialisation this net predicts what the FCN-32s does (up to the change
            from one 32x to a 2x and a 16x upsampling).

    Shape:
        (B, 3, H, W) -> (B, K, H, W).
    """
    return _build(
        16,
        num_classes=num_classes,
        geometry=geometry,
        upsample=upsample,
        learnable_upsample=learnable_upsample,
        width_div=width_div,
        fc_channels=fc_channels,
        weights_backbone=weights_backbone,
        init_from=init_from,
    )


def fcn8s(
    *,
    num_classes: int,
    geometry: str = "same",
    upsample: str = "transposed",
    learnable_upsample: bool = True,
    width_div: int = 1,
    fc_channels: int = 4096,
    weights_backbone: str | os.PathLike | None = None,
    init_from: FCN | None = None,
    at_once: bool = False,
) -> FCN:
    """FCN-8s: FCN-16s plus a pool3 skip, scores upsampled 2x + 2x + 8x (Long et al., CVPR 2015).

    Args: as ``fcn16s``, and
        init_from: an FCN-16s (or FCN-32s) to start from; the new skip scoring layers start at zero.
        at_once: the "all-at-once" net (voc-fcn8s-atonce): pool4 and pool3 are scaled by 0.01 and
            1e-4 before scoring, for training from VGG-16 in one stage.

    Shape:
        (B, 3, H, W) -> (B, K, H, W).
    """
    return _build(
        8,
        num_classes=num_classes,
        geometry=geometry,
        upsample=upsample,
        learnable_upsample=learnable_upsample,
        width_div=width_div,
        fc_channels=fc_channels,
        weights_backbone=weights_backbone,
        init_from=init_from,
        skip_scales=_AT_ONCE_SCALES if at_once else (1.0, 1.0),
    )
