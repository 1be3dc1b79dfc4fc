"""Inference modes: whole image, sliding window, multi-scale, horizontal flip.

`predict_logits` returns class scores at the input size for any image size. Every mode averages
*logits* (not probabilities): overlapping windows, scales and the flipped copy each contribute one
score map, resized back to the input size bilinearly, and the average is taken per pixel. Windows
are run a few at a time and accumulated on the image's device, so memory stays bounded for large
images. A U-Net with valid convolutions (a model with `forward_valid` and `margin > 0`) is tiled
the paper's way in slide mode: output tiles that do not overlap, each computed from an input tile
with `margin / 2` pixels of real context around it and mirror padding at the image border
(Ronneberger et al. 2015, Fig. 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.errors import ArgumentError, UserError
from pixelwise.layers import mirror_pad

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet statistics, which every backbone here expects
IMAGENET_STD = (0.229, 0.224, 0.225)
# the inference modes: the one list that configs, the CLI and the service take their choices from
MODES: tuple[str, ...] = ("whole", "slide", "multiscale")
# multiscale default: DeepLab's test scales (Chen et al., TPAMI 2017, Sec. 4.1)
DEEPLAB_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def resolve_device(name: str, argument: str = "--device") -> torch.device:
    """'auto' -> cuda when available else cpu; 'cpu', 'cuda', 'cuda:N' checked against the machine.

    `argument` names the option in error messages (`--device` on the CLI, `train.device` in configs).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{argument} {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{argument} {name}: CUDA is not available on this machine; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{argument} {name}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0")
    elif device.type != "cpu":
        raise UserError(f"{argument} {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    return device


def resolve_dtype(name: str, device: torch.device, argument: str = "--precision") -> torch.dtype | None:
    """The autocast dtype for precision `name` ('auto', 'fp32', 'bf16') on `device`; None = fp32.

    `auto` is bf16 where the device runs it natively (see `pixelwise.precision`), fp32 elsewhere; `argument`
    names the option in the error for a precision the device would only emulate.
    """
    from pixelwise.precision import PrecisionError, resolve_precision

    try:
        return resolve_precision(name, device)
    except PrecisionError as e:
        raise UserError(f"{argument} {name}: {e}") from None


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (else buffers) live; the CPU for a model that has neither."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images -> float32 `(x / 255 - mean) / std`, on the images' device.

    Shape:
        (B, 3, H, W) uint8 -> (B, 3, H, W) float32.
    """
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One forward pass returning logits at x's size. Shape: (B, C, H, W) -> (B, K, H, W)."""
    y = model(x)
    if isinstance(y, dict):  # torchvision-style {"out": ..., "aux": ...}
        y = y["out"]
    if y.shape[-2:] != x.shape[-2:]:
        # the model contract is logits at input size; a stride-s output is brought back bilinearly
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, K, H, W)
    return y


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering 0..length: every `stride`, plus one flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def _batched(items: list, n: int) -> list[list]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def _slide(
    model: nn.Module, x: torch.Tensor, window: tuple[int, int], stride: tuple[int, int], batch_size: int
) -> torch.Tensor:
    """Average of overlapping window logits. Shape: (B, C, H, W) -> (B, K, H, W)."""
    b, _, h, w = x.shape
    wh, ww = window
    x = F.pad(x, (0, max(ww - w, 0), 0, max(wh - h, 0)))  # (B, C, max(H, wh), max(W, ww))
    hp, wp = x.shape[-2:]
    boxes = [(y0, x0) for y0 in window_starts(hp, wh, stride[0]) for x0 in window_starts(wp, ww, stride[1])]
    total = None
    count = torch.zeros(1, 1, hp, wp, device=x.device)
    for chunk in _batched(boxes, max(1, batch_size // b)):
        crops = torch.cat([x[..., y0 : y0 + wh, x0 : x0 + ww] for y0, x0 in chunk])  # (n*B, C, wh, ww)
        out = _run(model, crops)  # (n*B, K, wh, ww)
        if total is None:
            total = torch.zeros(b, out.shape[1], hp, wp, device=x.device)  # float32 sums, also under autocast
        for i, (y0, x0) in enumerate(chunk):
            total[..., y0 : y0 + wh, x0 : x0 + ww] += out[i * b : (i + 1) * b].float()
            count[..., y0 : y0 + wh, x0 : x0 + ww] += 1
    return (total / count)[..., :h, :w]  # (B, K, H, W)


def _overlap_tile(model: nn.Module, x: torch.Tensor, window: tuple[int, int], batch_size: int) -> torch.Tensor:
    """U-Net's overlap-tile strategy for a valid-convolution model. Shape: (B, C, H, W) -> (B, K, H, W).

    `window` is rounded up to the next legal input tile (`model.valid_input_size`); each tile's
    output (tile - margin) is written once, so tiles meet without seams and without averaging.
    """
    b, _, h, w = x.shape
    margin = int(model.margin)
    tin = [model.valid_input_size(max(1, s - margin)) for s in window]  # legal input tile (H, W)
    tout = [s - margin for s in tin]  # its output
    ny, nx = math.ceil(h / tout[0]), math.ceil(w / tout[1])
    ctx = margin // 2
    x = mirror_pad(x, ctx, nx * tout[1] - w + margin - ctx, ctx, ny * tout[0] - h + margin - ctx)
    boxes = [(i, j) for i in range(ny) for j in range(nx)]
    total = None
    for chunk in _batched(boxes, max(1, batch_size // b)):
        tiles = torch.cat(
            [x[..., i * tout[0] : i * tout[0] + tin[0], j * tout[1] : j * tout[1] + tin[1]] for i, j in chunk]
        )  # (n*B, C, tin_h, tin_w)
        out = model.forward_valid(tiles)  # (n*B, K, tout_h, tout_w)
        if total is None:
            total = torch.zeros(b, out.shape[1], ny * tout[0], nx * tout[1], device=x.device)
        for k, (i, j) in enumerate(chunk):
            total[..., i * tout[0] : (i + 1) * tout[0], j * tout[1] : (j + 1) * tout[1]] = out[k * b : (k + 1) * b]
    return total[..., :h, :w]  # (B, K, H, W)


def _is_valid_conv(model: nn.Module) -> bool:
    return hasattr(model, "forward_valid") and int(getattr(model, "margin", 0)) > 0


def check_options(
    mode: str, window: Sequence[int] | None, stride: Sequence[int] | None, scales: Sequence[float]
) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """Check `predict_logits`' options (ArgumentError naming the argument); return (window, stride) as
    int pairs, the stride defaulting to 2/3 of the window."""
    if mode not in MODES:
        raise ArgumentError("mode", mode, f"unknown inference mode; choose one of {', '.join(MODES)}")
    if mode == "multiscale" and (not scales or min(scales) <= 0):
        raise ArgumentError("scales", list(scales), "give one or more positive factors, e.g. 0.5 1.0 1.5")
    if mode == "slide" and window is None:
        raise ArgumentError("window", None, "slide mode needs a window size (H, W)")
    if window is None:
        return None, None
    if len(window) != 2 or min(window) < 1:
        raise ArgumentError("window", list(window), "give two positive sizes (H, W)")
    window = (int(window[0]), int(window[1]))
    if stride is None:
        stride = (max(1, math.ceil(window[0] * 2 / 3)), max(1, math.ceil(window[1] * 2 / 3)))
    if len(stride) != 2 or not (0 < stride[0] <= window[0] and 0 < stride[1] <= window[1]):
        raise ArgumentError(
            "stride",
            list(stride),
            f"must be positive and at most the window {list(window)}, or pixels between windows get no prediction",
        )
    return window, (int(stride[0]), int(stride[1]))


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    image: torch.Tensor,
    *,
    mode: str = "whole",
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    num_classes: int | None = None,
    batch_size: int = 4,
) -> torch.Tensor:
    """Class scores for normalised images at their own size, by one of three modes.

    Args:
        model: returns logits (B, K, h, w) for (B, C, h, w) (resized to the input if smaller).
        image: normalised float images on the model's device.
        mode: "whole" (one pass), "slide" (windows of `window` every `stride`, overlaps averaged;
            images smaller than the window are zero-padded, i.e. with the mean colour) or
            "multiscale" (each of `scales`: resize bilinearly, antialiased when shrinking as training's
            random scaling is, predict — sliding when `window` is given — and resize the logits back;
            the maps are averaged).
        window: (H, W) window for slide (and optionally multiscale); for a valid-convolution U-Net
            the input tile, rounded up to a legal size.
        stride: (H, W) window step; default 2/3 of the window (1/3 overlap).
        scales: multiscale factors (DeepLab: 0.5, 0.75, 1.0, 1.25, 1.5, 1.75).
        flip: also predict the horizontally flipped image and average with it (per scale).
        num_classes: if given, the model's output channels are checked against it.
        batch_size: windows per forward pass (times the image batch), bounding memory.

    Returns:
        Averaged logits.

    Shape:
        (B, C, H, W) -> (B, K, H, W).
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
    window, stride = check_options(mode, window, stride, scales)

    def single(x: torch.Tensor) -> torch.Tensor:
        if window is not None and mode != "whole":
            if _is_valid_conv(model):
                return _overlap_tile(model, x, window, batch_size)
            return _slide(model, x, window, stride, batch_size)
        return _run(model, x)

    def with_flip(x: torch.Tensor) -> torch.Tensor:
        y = single(x)
        if flip:
            y = (y + single(x.flip(-1)).flip(-1)) / 2  # (B, K, H, W)
        return y

    if mode != "multiscale":
        return _check_classes(with_flip(image), num_classes)
    h, w = image.shape[-2:]
    total = None
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        # antialiased when shrinking: training's RandomScale (pixelwise/data/transforms.py) shrinks images with
        # antialiased bilinear, so a test scale below 1 shows the network images made the way it learnt from;
        # growing stays plain bilinear (torch's antialias filter is then the same triangle, up to rounding)
        x = (
            image
            if size == (h, w)
            else F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=s < 1)
        )  # (B, C, sH, sW)
        y = with_flip(x)
        if y.shape[-2:] != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)  # (B, K, H, W)
        total = y.float() if total is None else total + y
    return _check_classes(total / len(scales), num_classes)


def _check_classes(logits: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"the model returned {logits.shape[1]} class maps, expected num_classes={num_classes}")
    return logits
