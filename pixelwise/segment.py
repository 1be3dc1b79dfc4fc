"""One image in, class labels out, in memory bounded by the window rather than the image.

`predict` and `serve` both go through `segment_image`, which runs `pixelwise.engine.segment` (the
one scoring path) for images the model handles whole. An image of at most `MAX_WHOLE_PIXELS` is inferred
as asked (whole image by default, as before). A larger one is, by default (`large="slide"`), inferred
by sliding window, one row of windows at a time, each window run once (but see bands below):

* the window is the one asked for (`--window`), else the training crop stored in the weights, else
  512 x 512; the stride is 2/3 of it (`predict_logits`' default);
* the windows are those of one `predict_logits(mode="slide")` over the whole image, in its raster
  order, each run alone by `engine.segment` on its own crop (one forward pass), normalised and, where the
  image is smaller than the window, zero-padded as `_slide` pads the whole image;
* their logits are summed into a strip of the image's width (a band's, below) and the window's height,
  from float32 zeros, with the count of windows per pixel, as `inference._slide` sums them. After a row
  of windows the rows above the next row's start are covered by no later window: they are averaged (sum
  / count), reduced to labels and rolled out of the strip, which keeps the overlap and zeroes the rest.
  Every pixel sums the same windows in the same order as one slide over the whole image, so its scores
  and labels equal that slide's bit for bit (tests/test_segment.py). With flip, a second strip sums the
  flipped image's windows (its own grid, in its own coordinates: rows coincide under a horizontal flip)
  and each finished row is `(y + yf) / 2` with `yf` flipped back, as `predict_logits(flip=True)` does.

Peak memory is then one window's activations plus the strips, window height x band width x (K + 1)
float32 (twice with flip), plus up to about 4K float32 per pixel of the rows being reduced (at most a
stride of them), plus what is O(image) by nature: the uint8 image and labels. A band is the whole width
up to `_BAND_STRIDES` (16) strides of output columns plus up to two windows (~6,500 pixels for a
512-pixel window); a wider image is slid band by band, each band on the input span of exactly the
windows that cover it (whose own grid is the whole image's there, so the scores stay bit-identical), and
the windows on a band's border run for both bands: up to ~10% more forward passes in exchange for a
bound independent of the width.
Multi-scale inference and the dense CRF need the whole image's scores at once, so when
sliding they are refused above the limit with a one-line error. A valid-convolution U-Net (overlap-tile,
whose tiles do not overlap) is tiled by `predict_logits` over the whole image, holding K float32 per pixel.

`large="downscale"` (`--large downscale`) trades resolution for context and the whole-image methods
instead: the uint8 image is resized (Pillow's antialiased bilinear) to the largest size of its aspect
ratio with at most `max_whole_pixels` pixels, inferred there as asked (multi-scale and CRF included),
and its scores are brought back by bilinear upsampling (`F.interpolate(align_corners=False)`'s taps)
one strip of output rows at a time, each strip reduced to labels at once. Peak memory is then that of
an image at the limit plus about 5 x `STRIP_VALUES` float32 for a strip, and the uint8 image and labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from pixelwise.engine.evaluation import InferenceSpec
from pixelwise.errors import ArgumentError, UserError
from pixelwise.inference import model_device, window_starts

# a Cityscapes frame (2048 x 1024) or a 1080p photo is still inferred whole, as it was trained
MAX_WHOLE_PIXELS = 2048 * 1024
DEFAULT_WINDOW = (512, 512)  # when the weights record no training crop
# how an image above MAX_WHOLE_PIXELS is inferred; the first is the default (`--large`, `ServeLimits.large`)
LARGE_KINDS: tuple[str, ...] = ("slide", "downscale")
STRIP_VALUES = 2**21  # full-resolution float32 scores of one upsampled strip (K x rows x W): 8 MiB


class NeedsWholeImage(UserError):
    """Multi-scale inference or the CRF asked for on an image above the whole-image limit, when sliding.

    `message(fix)` words the way out as a front end offers it (`--large downscale` on the command line).
    """

    def __init__(self, name: str, size: tuple[int, int], limit: int, what: str) -> None:
        self.name, self.size, self.limit, self.what = name, size, limit, what
        super().__init__(self.message('infer it downscaled (large="downscale")'))

    def message(self, fix: str) -> str:
        """The one-line error with `fix` as the first way out, e.g. "infer it downscaled (--large downscale)"."""
        h, w = self.size
        return (
            f"{self.name}: {w}x{h} = {h * w} pixels is more than the {self.limit} that {self.what} "
            f"handles by sliding window in bounded memory; {fix} or leave {self.what} out"
        )


def check_large(large: str) -> None:
    """ArgumentError unless `large` is one of `LARGE_KINDS`."""
    if large not in LARGE_KINDS:
        raise ArgumentError("large", large, f"choose one of {', '.join(LARGE_KINDS)} for images above the limit")


def default_window(extra: dict) -> tuple[int, int]:
    """The training crop recorded in the weights' metadata (`extra["crop_size"]`), else 512 x 512."""
    crop = extra.get("crop_size")
    if isinstance(crop, list | tuple) and len(crop) == 2:
        return (int(crop[0]), int(crop[1]))
    return DEFAULT_WINDOW


def segment_image(
    model: nn.Module,
    image: np.ndarray,
    spec: InferenceSpec,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    default_win: tuple[int, int] = DEFAULT_WINDOW,
    max_whole_pixels: int = MAX_WHOLE_PIXELS,
    large: str = LARGE_KINDS[0],
    name: str = "image",
) -> np.ndarray:
    """Class labels of an RGB image as `spec` asks; above `max_whole_pixels` by sliding window, one row
    of windows at a time (`large="slide"`), or downscaled to that size and upsampled back
    (`large="downscale"`; module docstring). `default_win` is the window used when the image is slid and
    `spec` gives none.

    Shape:
        (H, W, 3) uint8 -> (H, W) uint8 (int32 above 256 classes).
    """
    check_large(large)
    h, w = image.shape[:2]
    above = h * w > max_whole_pixels
    if above and large == "downscale":
        small = downscale(image, downscaled_size(h, w, max_whole_pixels))  # (h', w', 3) uint8
        scores = _scores(model, small, spec=spec, mean=mean, std=std, num_classes=num_classes)  # (1, K, h', w')
        return upsampled_labels(scores, (h, w), num_classes)
    if above and (spec.mode == "multiscale" or spec.crf is not None):
        what = "multi-scale inference" if spec.mode == "multiscale" else "the dense CRF"
        raise NeedsWholeImage(name, (h, w), max_whole_pixels, what)
    if above:
        window = spec.window or default_win
        spec = replace(spec, mode="slide", window=window, stride=spec.stride if spec.window else None)
    if not above or _overlap_tiled(model):
        scores = _scores(model, image, spec=spec, mean=mean, std=std, num_classes=num_classes)  # (1, K, H, W)
        return _labels(scores, num_classes)[0]
    return _rolling_slide(model, image, spec, mean=mean, std=std, num_classes=num_classes)


def _scores(model: nn.Module, image: np.ndarray, *, spec: InferenceSpec, **kwargs) -> torch.Tensor:
    """`engine.segment` as `spec` asks on an (h, w, 3) uint8 array (`kwargs`: mean, std, num_classes):
    float32 scores (1, K, h, w)."""
    from pixelwise.engine import segment

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # (1, 3, h, w) uint8
    return segment(model, x.to(model_device(model)), spec, **kwargs)


def downscaled_size(h: int, w: int, max_pixels: int) -> tuple[int, int]:
    """The largest (h', w') of h x w's aspect ratio with h' * w' <= max_pixels, each side at least 1."""
    scale = math.sqrt(max_pixels / (h * w))
    small_h, small_w = max(1, math.floor(h * scale)), max(1, math.floor(w * scale))
    if h >= w:  # rounding can only overshoot by a hair; the longer side gives it back
        return min(small_h, max_pixels // small_w), small_w
    return small_h, min(small_w, max_pixels // small_h)


def downscale(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pillow's antialiased bilinear resize of a uint8 RGB image, in uint8 (no float copy of the image).
    (H, W, 3) -> (h, w, 3) for `size` = (h, w)."""
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.array(resized)  # writable, as torch.from_numpy wants


def _linear_taps(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Bilinear resizing along one axis as `F.interpolate(align_corners=False)` computes it: for each
    output index the input indices i0, i1 (i0 + 1, clamped at the edge) and their weights 1 - t, t."""
    scale = float(np.float32(n_in) / np.float32(n_out))  # PyTorch's float32 scale
    # the source index rounded once, as PyTorch's fused multiply-add does (exact in float64 first)
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).float().clamp(min=0)  # (n_out,)
    i0 = src.floor().long().clamp(max=n_in - 1)
    t = (src - i0).clamp(0, 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0.to(device), i1.to(device), (1 - t).to(device), t.to(device)


def upsampled_labels(scores: torch.Tensor, size: tuple[int, int], num_classes: int) -> np.ndarray:
    """argmax over classes of `scores` upsampled bilinearly to `size` (`F.interpolate(align_corners=False)`'s
    taps; its scores to float32 rounding), one strip of output rows at a time: the full-resolution scores
    are never held whole, only about 5 x `STRIP_VALUES` float32 of one strip.

    Shape:
        (1, K, h, w) -> (H, W) for `size` = (H, W).
    """
    (_, k, h, w), (out_h, out_w) = scores.shape, size
    y0, y1, wy0, wy1 = _linear_taps(h, out_h, scores.device)
    x0, x1, wx0, wx1 = _linear_taps(w, out_w, scores.device)
    labels = np.empty(size, _label_dtype(num_classes))
    rows = max(1, STRIP_VALUES // (k * out_w))
    for r0 in range(0, out_h, rows):
        r = slice(r0, min(r0 + rows, out_h))
        top, bottom = scores[:, :, y0[r]], scores[:, :, y1[r]]  # (1, K, rows, w)
        top = top[..., x0] * wx0 + top[..., x1] * wx1  # (1, K, rows, W)
        bottom = bottom[..., x0] * wx0 + bottom[..., x1] * wx1  # (1, K, rows, W)
        labels[r] = _labels(top * wy0[r, None] + bottom * wy1[r, None], num_classes)[0]  # (rows, W)
    return labels


def _overlap_tiled(model: nn.Module) -> bool:
    """A valid-convolution U-Net, which `predict_logits` slides by overlap-tile (the test it applies)."""
    return hasattr(model, "forward_valid") and int(getattr(model, "margin", 0)) > 0


def _labels(logits: torch.Tensor, num_classes: int) -> np.ndarray:
    """argmax over classes, in the smallest integer type that holds them. (B, K, h, w) -> (B, h, w)."""
    return logits.argmax(1).cpu().numpy().astype(_label_dtype(num_classes))


def _label_dtype(num_classes: int) -> type:
    """The smallest integer type of the label maps: uint8 up to 256 classes, else int32."""
    return np.uint8 if num_classes <= 256 else np.int32


# output columns of one band of the rolling slide, in strides: the strips hold window height x (this many
# strides + up to two windows) scores whatever the image's width (an image up to ~16 strides wide is one band); the
# windows on a band's border run once for each of the two bands they cover
_BAND_STRIDES = 16


class _Strip:
    """Window logits summed over the rows of one row of windows, at the band's full width, as
    `inference._slide` sums them: float32 from zero, one window at a time in raster order, with the
    count of windows per pixel. Row 0 is the top of the current row of windows."""

    def __init__(self, rows: int, width: int, device: torch.device) -> None:
        self.total: torch.Tensor | None = None  # (1, K, rows, W), allocated at the first window (K is the model's)
        self.count = torch.zeros(1, 1, rows, width, device=device)

    def add(self, logits: torch.Tensor, x0: int) -> None:
        """Add one window's logits (1, K, h, w) at rows 0..h, columns x0..x0 + w."""
        if self.total is None:
            self.total = torch.zeros(1, logits.shape[1], *self.count.shape[-2:], device=self.count.device)
        h, w = logits.shape[-2:]
        self.total[..., :h, x0 : x0 + w] += logits
        self.count[..., :h, x0 : x0 + w] += 1

    def pop(self, n: int) -> torch.Tensor:
        """The average of the first `n` rows, which no later window covers, rolled out of the strip (the
        rest moves up, zeros come in below). (1, K, rows, W) -> (1, K, n, W)."""
        mean = self.total[..., :n, :] / self.count[..., :n, :]  # (1, K, n, W)
        for t in (self.total, self.count):
            keep = t.shape[-2] - n
            t[..., :keep, :] = t[..., n:, :].clone()  # the overlap with the next row of windows
            t[..., keep:, :] = 0
        return mean


def _rolling_slide(model: nn.Module, image: np.ndarray, spec: InferenceSpec, **kwargs) -> np.ndarray:
    """Sliding-window labels as `spec` (mode "slide", its window and stride) asks, one band of
    `_BAND_STRIDES` strides' columns at a time (a single band up to that width), each band one row of
    windows at a time (module docstring). `kwargs`: mean, std and num_classes.

    Shape:
        (H, W, 3) uint8 -> (H, W).
    """
    h, w = image.shape[:2]
    labels = np.empty((h, w), _label_dtype(kwargs["num_classes"]))
    step = _BAND_STRIDES * spec.stride[1]
    for x0 in range(0, w, step):
        x1 = min(x0 + step, w)
        _slide_band(model, image, spec, (x0, x1), labels[:, x0:x1], **kwargs)
    return labels


def covering_span(length: int, window: int, stride: int, out0: int, out1: int) -> tuple[int, int]:
    """The input span [in0, in1) of exactly the windows that cover output pixels [out0, out1). Its own
    window grid (`window_starts` over its length) is the whole length's grid there."""
    starts = window_starts(length, window, stride)
    first = next(j for j, s in enumerate(starts) if s + window > out0)
    last = max(j for j, s in enumerate(starts) if s < out1)
    return starts[first], min(starts[last] + window, length)


def _slide_band(
    model: nn.Module,
    image: np.ndarray,
    spec: InferenceSpec,
    columns: tuple[int, int],
    out: np.ndarray,
    **kwargs,
) -> None:
    """Labels of the output columns [x0, x1) into `out` (H, x1 - x0), from the windows of the whole
    image's grid that cover them, one row of windows at a time. `kwargs`: mean, std and num_classes."""
    h, w = image.shape[:2]
    (x0, x1), window, stride = columns, spec.window, spec.stride
    b0, b1 = covering_span(w, window[1], stride[1], x0, x1)
    views = [(image[:, b0:b1], x0 - b0)]  # (columns, where the band starts in them)
    if spec.flip:  # the flipped image is slid on its own grid, in its own coordinates, as predict_logits does
        f0, f1 = covering_span(w, window[1], stride[1], w - x1, w - x0)
        views.append((image[:, ::-1][:, f0:f1], w - x1 - f0))
    one_window = replace(spec, flip=False)  # on a window's own crop, zero-padded by _slide where it is smaller
    strips = [_Strip(min(window[0], h), view.shape[1], model_device(model)) for view, _ in views]
    starts = window_starts(h, window[0], stride[0])
    for top, end in zip(starts, [*starts[1:], h], strict=True):  # rows top..end are final after this row of windows
        for (view, _), strip in zip(views, strips, strict=True):
            for c in window_starts(view.shape[1], window[1], stride[1]):
                crop = view[top : top + window[0], c : c + window[1]]
                strip.add(_scores(model, crop, spec=one_window, **kwargs), c)  # (1, K, <= wh, <= ww)
        y, *flipped = [
            strip.pop(end - top)[..., at : at + x1 - x0] for (_, at), strip in zip(views, strips, strict=True)
        ]
        if flipped:
            y = (y + flipped[0].flip(-1)) / 2
        out[top:end] = _labels(y, kwargs["num_classes"])[0]
