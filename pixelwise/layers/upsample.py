"""The upsampling family used by every decoder in pixelwise.

One factory, ``make_upsample(kind, in_channels, out_channels, scale, **kw)``, and one module per kind.
Every module has ``forward(x, indices=None, output_size=None)``: ``indices`` is only read by
``max_unpool``; ``output_size=(H, W)`` fixes the output size when the encoder saw odd sizes (an
11-pixel map pooled to 5 comes back as 11, not 10).

Kinds:
    ``nearest``, ``bilinear``, ``bicubic``: fixed interpolation (``align_corners=False`` throughout,
        the PyTorch default and what torchvision's segmentation models use). If ``in_channels !=
        out_channels`` a learned 1x1 convolution projects the channels first (interpolation weights
        sum to 1, so projecting before equals projecting after, at 1/s^2 of the cost).
    ``fixed_unpool``: Dosovitskiy et al., "Learning to Generate Chairs with Convolutional Neural
        Networks", CVPR 2015: every value goes to the top-left corner of its s x s block, zeros
        elsewhere, followed by a learned convolution (5x5 by default, as in the paper).
    ``max_unpool``: Zeiler & Fergus / DeconvNet (Noh et al., ICCV 2015) / SegNet (Badrinarayanan et
        al., TPAMI 2017): every value goes back to the position recorded by
        ``nn.MaxPool2d(return_indices=True)``, zeros elsewhere. Parameter-free; when the channel
        counts differ a 1x1 projection to ``out_channels`` comes first, so the indices are those of
        a pooled map with ``out_channels`` channels (U-Net's skip features).
    ``transposed``: a learned up-convolution ("deconvolution", Long et al., "Fully Convolutional
        Networks for Semantic Segmentation", CVPR 2015). ``init="bilinear"`` starts it as exact
        bilinear upsampling, see ``TransposedUpsample``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.errors import UserError

UPSAMPLE_KINDS: tuple[str, ...] = ("nearest", "bilinear", "bicubic", "fixed_unpool", "max_unpool", "transposed")


def _check_scale(scale: int) -> int:
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise UserError(f"upsampling scale={scale!r} is not supported; use a positive integer such as 2, 8 or 32")
    return scale


def _natural_size(x: torch.Tensor, scale: int, output_size: tuple[int, int] | None) -> tuple[int, int]:
    """The output size: `output_size` if given, else (H*scale, W*scale)."""
    if output_size is None:
        return x.shape[-2] * scale, x.shape[-1] * scale
    out_h, out_w = tuple(output_size)[-2:]  # no int(): symbolic sizes must stay symbolic for export
    return out_h, out_w


def _fit(y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop the bottom/right of `y`, or zero-pad it there, to `size` (top-left alignment is kept)."""
    out_h, out_w = size
    y = y[..., :out_h, :out_w]
    pad_h, pad_w = out_h - y.shape[-2], out_w - y.shape[-1]
    if pad_h or pad_w:
        y = F.pad(y, (0, pad_w, 0, pad_h))  # (B, C, out_h, out_w)
    return y


def _projection(in_channels: int, out_channels: int) -> nn.Module:
    """A learned 1x1 conv when the channel counts differ, else identity."""
    if in_channels == out_channels:
        return nn.Identity()
    return nn.Conv2d(in_channels, out_channels, kernel_size=1)


def bilinear_kernel(size: int) -> torch.Tensor:
    """FCN's bilinear upsampling filter (`surgery.upsample_filt`) of shape (size, size).

    factor = (size + 1) // 2, centre = factor - 1 (odd size) or factor - 0.5 (even size),
    w(i, j) = (1 - |i - centre| / factor) * (1 - |j - centre| / factor).
    """
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float64)
    filt = 1 - (og - center).abs() / factor
    return (filt[:, None] * filt[None, :]).float()


class InterpolateUpsample(nn.Module):
    """An optional learned 1x1 projection, then fixed interpolation (nearest / bilinear / bicubic).

    ``align_corners=False`` (pixel centres at (i + 0.5) / s - 0.5; edge values are replicated
    outside the image). With ``output_size`` the map is resized straight to that size, so the
    effective scale is in/out rather than exactly ``1 / scale`` (what torchvision and smp do for
    skip connections).

    Args:
        mode: "nearest", "bilinear" or "bicubic".
        in_channels: input channels.
        out_channels: output channels; a 1x1 conv (applied before interpolating) is added when they
            differ from ``in_channels``.
        scale: integer upsampling factor.

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H*scale, W*scale) or (B, out_channels, *output_size).
    """

    def __init__(self, mode: str, in_channels: int, out_channels: int, scale: int) -> None:
        super().__init__()
        self.mode = mode
        self.scale = _check_scale(scale)
        self.proj = _projection(in_channels, out_channels)

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor | None = None, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        size = _natural_size(x, self.scale, output_size)
        x = self.proj(x)  # (B, C_out, H, W)
        if self.mode == "nearest":
            return F.interpolate(x, size=size, mode="nearest")  # (B, C_out, H*s, W*s)
        return F.interpolate(x, size=size, mode=self.mode, align_corners=False)  # (B, C_out, H*s, W*s)


class FixedUnpool(nn.Module):
    """Fixed unpooling + a learned convolution (Dosovitskiy et al., CVPR 2015).

    Each input value is written to the top-left corner of its ``scale x scale`` output block and
    the other positions are zero ("unpooling" of "Learning to Generate Chairs ..."), then a learned
    ``kernel_size x kernel_size`` convolution (5x5 in the paper, 'same' padding) mixes the sparse map.

    Args:
        in_channels: input channels.
        out_channels: channels of the learned convolution.
        scale: integer upsampling factor.
        kernel_size: odd size of the learned convolution.

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H*scale, W*scale) or (B, out_channels, *output_size).
    """

    def __init__(self, in_channels: int, out_channels: int, scale: int, kernel_size: int = 5) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise UserError(f"fixed_unpool kernel_size={kernel_size} must be a positive odd number, e.g. 3 or 5")
        self.scale = _check_scale(scale)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def unpool(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """The parameter-free part: values at the top-left of each block, zeros elsewhere."""
        s = self.scale
        out_h, out_w = _natural_size(x, s, output_size)
        y = x.new_zeros(*x.shape[:-2], out_h, out_w)  # (B, C, out_h, out_w)
        # A block exists for input row i iff its top-left row i*s is inside the output.
        rows, cols = min(x.shape[-2], math.ceil(out_h / s)), min(x.shape[-1], math.ceil(out_w / s))
        y[..., : rows * s : s, : cols * s : s] = x[..., :rows, :cols]
        return y

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor | None = None, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        return self.conv(self.unpool(x, output_size))


class MaxUnpool(nn.Module):
    """Max-unpooling with the encoder's pooling indices (DeconvNet, SegNet).

    Needs the ``indices`` returned by ``nn.MaxPool2d(kernel_size=scale, stride=scale,
    return_indices=True)`` of the matching encoder stage: every value goes back to the position of
    its maximum and all other positions are zero. Pass ``output_size`` (the pre-pooling size) when
    that size was odd. When ``in_channels != out_channels`` a learned 1x1 projection comes first.

    Shape:
        (B, in_channels, H, W) + indices (B, out_channels, H, W) -> (B, out_channels, H*scale, W*scale)
        or (B, out_channels, *output_size).
    """

    def __init__(self, in_channels: int, out_channels: int, scale: int) -> None:
        super().__init__()
        self.scale = _check_scale(scale)
        self.proj = _projection(in_channels, out_channels)

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor | None = None, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        if indices is None:
            raise ValueError(
                "max_unpool needs the pooling indices: call it as up(x, indices=idx) with idx from "
                "nn.MaxPool2d(..., return_indices=True), or choose an upsample kind that needs none"
            )
        size = _natural_size(x, self.scale, output_size)
        x = self.proj(x)  # (B, C_out, H, W)
        if indices.shape != x.shape:
            raise ValueError(
                f"max_unpool: indices shape {tuple(indices.shape)} does not match the (projected) input "
                f"{tuple(x.shape)}; pass the indices of the pooling that produced this resolution"
            )
        # F.max_unpool2d as a scatter into the flattened plane (indices are per-plane flat positions):
        # the same values and gradients, and it exports to ONNX (ScatterElements) and torch.export
        # with symbolic sizes, which aten::max_unpool2d does not.
        b, c = x.shape[:2]
        out = x.new_zeros(b, c, size[0] * size[1])  # (B, C_out, H_out * W_out)
        out = out.scatter(2, indices.flatten(2), x.flatten(2))
        return out.view(b, c, size[0], size[1])  # (B, C_out, *size)


class TransposedUpsample(nn.Module):
    """A learned up-convolution (transposed convolution) with stride ``scale``.

    ``init="default"`` (U-Net's 2x2 up-convolution): kernel ``scale``, no padding, PyTorch's default
    init. ``init="bilinear"`` (FCN): kernel ``2*scale - scale % 2`` (64 for s=32, 32 for 16, 16 for
    8, 4 for 2), weights set to FCN's bilinear filter on the channel diagonal (channel c only feeds
    channel c; needs ``in_channels == out_channels``), zero bias.

    Alignment convention: the transposed conv uses ``padding = scale // 2``, which is Caffe FCN's
    unpadded deconvolution ((H+1)*s outputs for even s) followed by a crop of s/2 at the top-left.
    The output is then exactly H*s x W*s and, with the bilinear init,

        up(x) == F.interpolate(F.pad(x, (1, 1, 1, 1)), scale_factor=s, mode="bilinear",
                               align_corners=False)[..., s:-s, s:-s]

    everywhere, i.e. it equals ``F.interpolate(x, scale_factor=s, mode="bilinear",
    align_corners=False)`` in the interior and differs only in the outer ``scale // 2`` rows and
    columns on each side, where the transposed conv sees zeros beyond the image (values fade towards
    0) while ``F.interpolate`` replicates the edge. ``border="replicate"`` pads the input by one
    edge-replicated pixel first (and crops ``scale`` more), which makes the bilinear-initialised
    layer equal ``F.interpolate`` everywhere, borders included.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        scale: integer stride.
        init: "default" or "bilinear".
        learnable: False freezes the weights (FCN-8s' final fixed 8x bilinear upsampling).
        bias: add a bias (zero-initialised with the bilinear init).
        border: "zeros" (FCN) or "replicate" (see above).

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H*scale, W*scale) or (B, out_channels, *output_size).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        scale: int,
        init: str = "default",
        learnable: bool = True,
        bias: bool = True,
        border: str = "zeros",
    ) -> None:
        super().__init__()
        s = self.scale = _check_scale(scale)
        if init not in ("default", "bilinear"):
            raise UserError(f"transposed upsampling init={init!r} is not supported; choose 'default' or 'bilinear'")
        if border not in ("zeros", "replicate"):
            raise UserError(f"transposed upsampling border={border!r} is not supported; choose 'zeros' or 'replicate'")
        if init == "bilinear" and in_channels != out_channels:
            raise UserError(
                f"transposed upsampling with init='bilinear' needs in_channels == out_channels "
                f"(got {in_channels} and {out_channels}); add a 1x1 conv before it or use init='default'"
            )
        kernel = 2 * s - s % 2 if init == "bilinear" else s
        self.padding = (kernel - s) // 2  # output (H-1)*s - 2p + k == H*s
        self.border = border
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel, stride=s, padding=self.padding, bias=bias)
        if init == "bilinear":
            with torch.no_grad():
                self.up.weight.zero_()
                filt = bilinear_kernel(kernel)
                for c in range(in_channels):
                    self.up.weight[c, c] = filt
                if self.up.bias is not None:
                    self.up.bias.zero_()
        self.up.requires_grad_(learnable)

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor | None = None, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        s = self.scale
        size = _natural_size(x, s, output_size)
        pad = self.padding
        k = self.up.kernel_size[0]
        if k == s and pad == 0 and self.border == "zeros" and size[0] <= x.shape[-2] * s and size[1] <= x.shape[-1] * s:
            # Non-overlapping kernel (U-Net's 2x2 up-conv): the same map as a 1x1 conv to s*s*C_out channels
            # + pixel shuffle, a plain matmul that runs ~25% faster than the transposed conv on CPU. (A larger
            # output_size takes the path below, whose output_padding rows hold the bias, not zeros.)
            c_in, c_out = self.up.weight.shape[:2]
            weight = self.up.weight.permute(1, 2, 3, 0).reshape(c_out * s * s, c_in, 1, 1)  # (C_out*s*s, C_in, 1, 1)
            bias = self.up.bias.repeat_interleave(s * s) if self.up.bias is not None else None
            y = F.pixel_shuffle(F.conv2d(x, weight, bias), s)  # (B, C_out, H*s, W*s)
            return _fit(y, size)
        if self.border == "replicate":
            x = F.pad(x, (1, 1, 1, 1), mode="replicate")  # (B, C, H+2, W+2)
            pad += s
        h, w = x.shape[-2:]
        # Natural size (h-1)*s - 2*pad + k; output_padding adds up to s-1 real rows/columns at the
        # bottom/right, anything beyond that (or a smaller target) is cropped or zero-padded.
        nat_h = (h - 1) * s - 2 * pad + self.up.kernel_size[0]
        nat_w = (w - 1) * s - 2 * pad + self.up.kernel_size[1]
        out_pad = (min(max(size[0] - nat_h, 0), s - 1), min(max(size[1] - nat_w, 0), s - 1))
        y = F.conv_transpose2d(
            x, self.up.weight, self.up.bias, stride=s, padding=pad, output_padding=out_pad
        )  # (B, C_out, nat_h + out_pad, nat_w + out_pad)
        return _fit(y, size)


def make_upsample(kind: str, in_channels: int, out_channels: int, scale: int, **kw) -> nn.Module:
    """Build an upsampling module of the given kind (see the module docstring for each kind).

    Extra keyword arguments go to the module: ``fixed_unpool`` takes ``kernel_size``;
    ``transposed`` takes ``init``, ``learnable``, ``bias``, ``border``.

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H*scale, W*scale), or ``output_size`` when given.
    """
    if kind in ("nearest", "bilinear", "bicubic"):
        if kw:
            raise UserError(f"upsample kind {kind!r} takes no extra options, got {sorted(kw)}")
        return InterpolateUpsample(kind, in_channels, out_channels, scale)
    if kind == "fixed_unpool":
        return FixedUnpool(in_channels, out_channels, scale, **kw)
    if kind == "max_unpool":
        if kw:
            raise UserError(f"upsample kind 'max_unpool' takes no extra options, got {sorted(kw)}")
        return MaxUnpool(in_channels, out_channels, scale)
    if kind == "transposed":
        return TransposedUpsample(in_channels, out_channels, scale, **kw)
    raise UserError(f"unknown upsample kind {kind!r}; choose one of {', '.join(UPSAMPLE_KINDS)}")
