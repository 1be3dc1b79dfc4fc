"""U-Net (Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015).

A contracting path of double 3x3 convs and 2x2 max pooling (64 -> 1024 channels at depth 4), an
expanding path of 2x2 up-convolutions that halve the channels, concatenation with the (centre-cropped)
encoder features of the same level, double 3x3 convs, and a final 1x1 conv to the class scores:
encoder (``UNetEncoder``), decoder (``UNetDecoder``) and head. ``unet_timm`` puts the expanding path
(same padding) on a timm classification network instead (``EncoderUNet``, smp's Unet).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.encoders import Features, TimmEncoder
from pixelwise.errors import UserError
from pixelwise.layers import UPSAMPLE_KINDS, ConvNormAct, center_crop, make_upsample, mirror_pad, pad_to_multiple
from pixelwise.models.anatomy import LoadsOldKeys
from pixelwise.models.hub import HubMixin


class DoubleConv(nn.Sequential):
    """Two 3x3 conv (+ optional norm) + ReLU layers: one U-Net level.

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H - 4, W - 4) ('valid') or (B, out_channels, H, W) ('same').
    """

    def __init__(self, in_channels: int, out_channels: int, padding: int, norm_layer: type[nn.Module] | None) -> None:
        super().__init__(
            ConvNormAct(in_channels, out_channels, 3, padding=padding, norm_layer=norm_layer),
            ConvNormAct(out_channels, out_channels, 3, padding=padding, norm_layer=norm_layer),
        )


class UNetEncoder(nn.Module):
    """U-Net's contracting path: a ``DoubleConv``, then ``depth`` x (2x2 max pooling, ``DoubleConv``).

    Args:
        in_channels: input channels.
        widths: channels of each level, ``depth + 1`` of them (64, 128, 256, 512, 1024 in the paper).
        conv_padding: padding of the 3x3 convs: 0 ('valid', the paper's) or 1 ('same').
        norm_layer: normalisation after each 3x3 conv, or None.
        return_indices: keep the max-pooling indices (for a max-unpooling expanding path).

    Attributes:
        out_channels: ``widths``.
        strides: ``[1, 2, 4, ..., 2**depth]`` (nominal: valid convs also trim 4 pixels per level).

    Shape:
        (B, in_channels, H, W) -> ``Features``: the ``depth + 1`` levels' maps, high to low resolution,
        with the pools' input ``sizes`` and, with ``return_indices``, their ``indices``.
    """

    def __init__(
        self,
        in_channels: int,
        widths: list[int],
        conv_padding: int,
        norm_layer: type[nn.Module] | None,
        return_indices: bool,
    ) -> None:
        super().__init__()
        ins = [in_channels, *widths[:-1]]
        self.blocks = nn.ModuleList(
            [DoubleConv(i, o, conv_padding, norm_layer) for i, o in zip(ins, widths, strict=True)]
        )
        self.return_indices = return_indices
        self.out_channels = list(widths)
        self.strides = [2**i for i in range(len(widths))]

    def forward(self, x: torch.Tensor) -> Features:
        maps, indices, sizes = [], [], []
        for i, block in enumerate(self.blocks):
            if i > 0:
                sizes.append((x.shape[-2], x.shape[-1]))
                if self.return_indices:
                    x, idx = F.max_pool2d(x, 2, 2, return_indices=True)  # (B, C, H/2, W/2)
                    indices.append(idx)
                else:
                    x = F.max_pool2d(x, 2, 2)  # (B, C, H/2, W/2)
            x = block(x)
            maps.append(x)
        return Features(maps, indices=indices if self.return_indices else None, sizes=sizes)


class UNetDecoder(nn.Module):
    """U-Net's expanding path: ``depth`` x (2x2 up-convolution halving the channels, concatenation with
    the centre-cropped encoder map of the same level, ``DoubleConv``).

    Args:
        widths: channels of each level, as the encoder's.
        conv_padding: padding of the 3x3 convs: 0 ('valid') or 1 ('same').
        norm_layer: normalisation after each 3x3 conv, or None.
        upsample: an ``UPSAMPLE_KINDS`` kind ("transposed": the paper's up-convolution).

    Shape:
        the encoder's ``Features`` -> (B, widths[0], h, w): the top level's size, less 4 pixels per
        level and direction with valid convs.
    """

    def __init__(self, widths: list[int], conv_padding: int, norm_layer: type[nn.Module] | None, upsample: str) -> None:
        super().__init__()
        levels = range(len(widths) - 1, 0, -1)  # deepest first
        self.same = conv_padding > 0
        self.ups = nn.ModuleList([make_upsample(upsample, widths[i], widths[i - 1], 2) for i in levels])
        self.blocks = nn.ModuleList(
            [DoubleConv(2 * widths[i - 1], widths[i - 1], conv_padding, norm_layer) for i in levels]
        )

    def forward(self, feats: Features) -> torch.Tensor:
        x = feats[-1]  # the bottom level is not a skip
        indices = feats.indices[::-1] if feats.indices is not None else [None] * len(self.ups)
        for up, block, skip, idx in zip(self.ups, self.blocks, feats[-2::-1], indices, strict=True):
            out_size = skip.shape[-2:] if self.same else None
            x = up(x, indices=idx, output_size=out_size)  # (B, C_skip, 2h, 2w)
            skip = center_crop(skip, x.shape[-2:])  # (B, C_skip, 2h, 2w)
            x = block(torch.cat([skip, x], dim=1))
        return x


class UNet(HubMixin, LoadsOldKeys, nn.Module):
    """U-Net (Ronneberger et al., MICCAI 2015), with 'valid' (the paper's) or 'same' convolutions.

    ``padding="valid"`` is the paper's network: unpadded 3x3 convs, so a 572x572 tile gives a
    388x388 map of its centre (``forward_valid``). A tile is legal when every 2x2 max pooling sees
    an even size: for depth d the valid tile sizes are ``n = 2**d * b + 4 * (2**d - 1)`` with an
    integer ``b >= 8`` (depth 4: 188, 204, ..., 572, ...; i.e. n % 16 == 12, n >= 188), and the
    output is ``n - margin`` with ``margin = 12 * 2**d - 8`` (184 at depth 4).

    ``forward`` keeps the pixelwise model contract (logits at input size) with the paper's
    overlap-tile strategy for one tile: the input is mirror-padded by ``margin // 2`` context pixels
    on each side (more at the bottom/right up to the next valid tile size), run through
    ``forward_valid``, and the map is cropped back to (H, W). So every input size works. To tile a
    large image as in the paper's Fig. 2, mirror-pad it by ``margin // 2`` and run ``forward_valid``
    on tiles of a legal size (``valid_input_size(out)``) whose outputs abut.

    ``padding="same"`` pads every 3x3 conv by 1; inputs divisible by ``2**depth`` need no further
    padding, others are mirror-padded at the bottom/right to the next multiple and cropped back.

    Args:
        num_classes: number of classes K.
        in_channels: input channels (1 for the paper's grey-scale microscopy, 3 for RGB).
        base_channels: channels of the first level (64); level i has ``base_channels * 2**i``.
        depth: number of poolings (4 in the paper).
        padding: "valid" or "same".
        upsample: an ``UPSAMPLE_KINDS`` kind for the expanding path ("transposed": the paper's 2x2
            up-convolution halving the channels); "max_unpool" needs ``padding="same"``.
        norm_layer: normalisation after each 3x3 conv (None in the paper, which predates BatchNorm).

    Shape:
        (B, in_channels, H, W) -> (B, num_classes, H, W); ``forward_valid``:
        (B, in_channels, n, n') -> (B, num_classes, n - margin, n' - margin).
    """

    # the levels were the model's `down`, `up` and `decode` lists
    OLD_KEYS = {"down.": "encoder.blocks.", "up.": "decoder.ups.", "decode.": "decoder.blocks."}

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        base_channels: int = 64,
        depth: int = 4,
        padding: str = "valid",
        upsample: str = "transposed",
        norm_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if padding not in ("valid", "same"):
            raise UserError(f"unet padding={padding!r} is not supported; choose 'valid' (the paper's) or 'same'")
        if upsample not in UPSAMPLE_KINDS:
            raise UserError(f"unet upsample={upsample!r} is unknown; choose one of {', '.join(UPSAMPLE_KINDS)}")
        if upsample == "max_unpool" and padding == "valid":
            raise UserError(
                "unet upsample='max_unpool' needs padding='same': with valid convs the decoder maps are smaller "
                "than the pooled maps whose indices it would reuse"
            )
        if not isinstance(depth, int) or depth < 1:
            raise UserError(f"unet depth={depth!r} must be a positive integer (4 in the paper)")
        if base_channels < 1 or num_classes < 1:
            raise UserError(f"unet base_channels={base_channels} and num_classes={num_classes} must be positive")
        self.depth = depth
        self.padding = padding
        self.margin = 12 * 2**depth - 8 if padding == "valid" else 0  # input size - output size of forward_valid
        conv_pad = 0 if padding == "valid" else 1
        widths = [base_channels * 2**i for i in range(depth + 1)]  # 64, 128, 256, 512, 1024
        self.encoder = UNetEncoder(in_channels, widths, conv_pad, norm_layer, return_indices=upsample == "max_unpool")
        self.decoder = UNetDecoder(widths, conv_pad, norm_layer, upsample)
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        # The paper: Gaussian init with std sqrt(2 / N), N = k*k*C_in (He et al.'s fan-in rule).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def valid_output_size(self, size: int) -> int:
        """The side of ``forward_valid``'s output for an input side ``size``; UserError if illegal."""
        if self.padding == "same":
            if size % 2**self.depth:
                raise UserError(
                    f"unet(padding='same', depth={self.depth}): size {size} is not divisible by {2**self.depth}"
                )
            return size
        offset = size - 4 * (2**self.depth - 1)
        b, rest = offset // 2**self.depth, offset % 2**self.depth  # not divmod(): symbolic sizes must export
        if rest or b < 8:
            lo = self.valid_input_size(1)
            raise UserError(
                f"unet(padding='valid', depth={self.depth}): input size {size} is not a valid tile size; "
                f"valid sizes are {2**self.depth}*b + {4 * (2**self.depth - 1)} for b >= 8 ({lo}, "
                f"{lo + 2**self.depth}, ...), e.g. {self.valid_input_size(max(size - self.margin, 1))}; "
                f"or call forward(), which mirror-pads any size"
            )
        return size - self.margin

    def valid_input_size(self, min_output: int) -> int:
        """The smallest legal ``forward_valid`` input whose output side is at least ``min_output``."""
        if self.padding == "same":
            return -(-min_output // 2**self.depth) * 2**self.depth
        step, offset = 2**self.depth, 4 * (2**self.depth - 1)
        b = max(8, -(-(min_output + self.margin - offset) // step))
        return step * b + offset

    def forward_valid(self, x: torch.Tensor) -> torch.Tensor:
        """The network itself, without padding the input: the paper's 572 -> 388 (depth 4, 'valid')."""
        for size in x.shape[-2:]:
            self.valid_output_size(size)
        feats = self.encoder(x)  # depth + 1 levels, high to low resolution
        y = self.decoder(feats)  # (B, base_channels, n - margin, n' - margin)
        return self.head(y)  # (B, K, n - margin, n' - margin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        in_h, in_w = self.valid_input_size(h), self.valid_input_size(w)
        before = self.margin // 2  # the context of the overlap-tile strategy (92 px at depth 4)
        x = mirror_pad(x, before, in_w - w - before, before, in_h - h - before)  # (B, C, in_h, in_w)
        y = self.forward_valid(x)  # (B, K, in_h - margin, in_w - margin)
        return y[..., :h, :w]  # (B, K, H, W)


def unet(
    *,
    num_classes: int,
    in_channels: int = 3,
    base_channels: int = 64,
    depth: int = 4,
    padding: str = "valid",
    upsample: str = "transposed",
    norm_layer: type[nn.Module] | None = None,
) -> UNet:
    """U-Net of the paper (depth 4, 64 -> 1024 channels, valid convs, 2x2 up-convolutions); see ``UNet``."""
    return UNet(
        num_classes=num_classes,
        in_channels=in_channels,
        base_channels=base_channels,
        depth=depth,
        padding=padding,
        upsample=upsample,
        norm_layer=norm_layer,
    )


# ------------------------------------------------------------------------------ on a timm encoder
class SkipDecoder(nn.Module):
    """U-Net's expanding path on any encoder's maps (the decoder of segmentation-models-pytorch's Unet):
    from the deepest map up to full resolution, one x2 step per block: upsample, concatenate the
    encoder map of that stride if there is one, ``DoubleConv`` (same padding, BatchNorm).

    Args:
        channels: the encoder's ``out_channels``.
        strides: the encoder's ``strides``, powers of two, the deepest one ``2**len(widths)``.
        widths: output channels of each block, deepest first (smp's 256, 128, 64, 32, 16).
        upsample: an ``UPSAMPLE_KINDS`` kind except "max_unpool" (these encoders keep no indices).

    Shape:
        the encoder's ``Features`` -> (B, widths[-1], H, W), H = strides[i] * the i-th map's height.
    """

    def __init__(self, channels: list[int], strides: list[int], widths: tuple[int, ...], upsample: str) -> None:
        super().__init__()
        deepest = strides[-1]
        if any(s & (s - 1) for s in strides) or deepest != 2 ** len(widths):
            raise UserError(
                f"decoder_channels={tuple(widths)}: give one width per x2 step from the encoder's deepest "
                f"stride {deepest} to 1 ({deepest.bit_length() - 1} of them; the encoder's strides are {strides})"
            )
        ups, blocks, self.skips = [], [], []
        x_channels, stride = channels[-1], deepest
        for width in widths:
            stride //= 2
            skip = strides.index(stride) if stride in strides else None  # ConvNeXt has no stride-2 map
            self.skips.append(skip)
            ups.append(make_upsample(upsample, x_channels, x_channels, 2))
            blocks.append(
                DoubleConv(x_channels + (channels[skip] if skip is not None else 0), width, 1, nn.BatchNorm2d)
            )
            x_channels = width
        self.ups, self.blocks = nn.ModuleList(ups), nn.ModuleList(blocks)

    def forward(self, feats: Features) -> torch.Tensor:
        x = feats[-1]  # (B, C, H/s, W/s), the deepest map
        for up, block, skip in zip(self.ups, self.blocks, self.skips, strict=True):
            x = up(x)  # (B, C, 2h, 2w)
            if skip is not None:
                x = torch.cat([x, feats[skip]], dim=1)  # (B, C + C_skip, 2h, 2w)
            x = block(x)
        return x


class EncoderUNet(HubMixin, nn.Module):
    """A U-Net whose contracting path is a pretrained classification network (timm), as in
    segmentation-models-pytorch's Unet; the expanding path is Ronneberger et al.'s with same padding.

    Any input size works: the input is zero-padded to a multiple of the encoder's deepest stride and
    the logits are cropped back.

    Args:
        encoder: a ``TimmEncoder`` (output stride 32).
        decoder: a ``SkipDecoder`` on its maps.
        head: the 1x1 conv to class scores.

    Shape:
        (B, 3, H, W) -> (B, K, H, W).
    """

    def __init__(self, encoder: TimmEncoder, decoder: SkipDecoder, head: nn.Conv2d) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.encoder.input_multiple)  # (B, 3, H', W'), H' and W' multiples of 32
        feats = self.encoder(x)  # list of (B, C_i, H'/s_i, W'/s_i), high to low resolution
        y = self.decoder(feats)  # (B, widths[-1], H', W')
        return self.head(y)[..., :h, :w]  # (B, K, H, W)


def unet_timm(
    *,
    num_classes: int,
    encoder: str = "resnet34",
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
    upsample: str = "nearest",
    weights_backbone: str | os.PathLike | None = None,
) -> EncoderUNet:
    """U-Net with any timm encoder (smp's Unet: ``timm.create_model(encoder, features_only=True)``).

    Args:
        num_classes: number of classes K.
        encoder: a timm model name, e.g. "resnet34" (smp's default), "convnext_tiny", "efficientnet_b0"
            (needs the ``timm`` extra); see ``pixelwise.encoders.TimmEncoder``.
        decoder_channels: one width per x2 step from stride 32 to 1, deepest first (smp's defaults).
        upsample: the decoder's x2 upsampling ("nearest", smp's; any ``UPSAMPLE_KINDS`` kind but max_unpool).
        weights_backbone: local file with the timm model's state dict, or None.
    """
    if upsample not in UPSAMPLE_KINDS or upsample == "max_unpool":
        kinds = ", ".join(k for k in UPSAMPLE_KINDS if k != "max_unpool")
        raise UserError(f"unet_timm upsample={upsample!r} is not supported; choose one of {kinds}")
    backbone = TimmEncoder(encoder, weights=weights_backbone)
    decoder = SkipDecoder(backbone.out_channels, backbone.strides, tuple(decoder_channels), upsample)
    return EncoderUNet(backbone, decoder, nn.Conv2d(decoder_channels[-1], num_classes, 1))
