"""Bounded-memory inference (`pixelwise.segment`): a large image is slid one row of windows at a time,
each window run once, and its scores and labels equal one sliding window over the whole image, bit for
bit, while the model only ever sees a window and the scores a strip of the window's height; or, with
`large="downscale"`, inferred at the limit (multi-scale and CRF included) and upsampled back in strips
whose labels equal one `F.interpolate` + argmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from pixelwise import segment as seg
from pixelwise.crf import CRFParams
from pixelwise.engine import InferenceSpec, segment
from pixelwise.errors import ArgumentError, UserError
from pixelwise.inference import normalize, predict_logits, window_starts

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


class Context(nn.Module):
    """Two 3x3 convolutions (5x5 receptive field) and 4 classes: window borders change the answer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[-2:]))
        return self.net(x)  # (B, 4, H, W)


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def reference(model: nn.Module, img: np.ndarray, window, *, flip: bool = False) -> np.ndarray:
    """One `predict_logits(mode="slide")` over the whole image."""
    x = normalize(torch.from_numpy(img).permute(2, 0, 1)[None], MEAN, STD)
    return predict_logits(model, x, mode="slide", window=window, flip=flip, batch_size=1).argmax(1)[0].numpy()


def run(
    model: nn.Module,
    img: np.ndarray,
    *,
    mode: str = "whole",
    window=None,
    flip: bool = False,
    scales=(1.0,),
    crf: CRFParams | None = None,
    **kwargs,
) -> np.ndarray:
    spec = InferenceSpec(mode=mode, window=window, flip=flip, scales=scales, crf=crf)
    return seg.segment_image(model, img, spec, mean=MEAN, std=STD, num_classes=4, **kwargs)


@pytest.mark.parametrize(("h", "w", "window"), [(150, 170, (32, 40)), (97, 61, (20, 16)), (40, 300, (48, 30))])
@pytest.mark.parametrize("flip", [False, True])
def test_sliding_window_labels_equal_one_slide_over_the_whole_image(h, w, window, flip):
    model = Context().eval()
    img = image(h, w)
    got = run(model, img, mode="slide", window=window, flip=flip, max_whole_pixels=100)
    np.testing.assert_array_equal(got, reference(model, img, window, flip=flip))
    assert got.dtype == np.uint8


# (h, w, window, stride): sides not a multiple of the stride, one side below the window, no overlap
# (stride = window: the strip rolls out whole), and stride 1/3 of the window (up to 9 windows a pixel)
SHAPES = [
    (150, 170, (32, 40), None),
    (97, 61, (20, 16), None),
    (40, 300, (48, 30), None),
    (300, 20, (30, 48), None),
    (90, 80, (24, 24), (24, 24)),
    (50, 44, (24, 24), (8, 8)),
]


def slide(model: nn.Module, img: np.ndarray, spec: InferenceSpec, **kwargs) -> np.ndarray:
    """`segment_image` above a 100-pixel limit: slid, whatever `spec.mode`."""
    return seg.segment_image(model, img, spec, mean=MEAN, std=STD, num_classes=4, max_whole_pixels=100, **kwargs)


@pytest.mark.parametrize(("h", "w", "window", "stride"), SHAPES)
@pytest.mark.parametrize("flip", [False, True])
def test_rolling_strip_scores_equal_one_slide_over_the_whole_image_bit_for_bit(monkeypatch, h, w, window, stride, flip):
    """The averaged scores of the rows finished at each row of windows, stacked, are the scores of one
    `predict_logits(mode="slide")`: every pixel sums the same windows in the same order."""
    blocks = []
    labels = seg._labels

    def recording(logits, num_classes):
        blocks.append(logits)
        return labels(logits, num_classes)

    monkeypatch.setattr(seg, "_labels", recording)
    model = Context().eval()
    img = image(h, w, seed=h)
    got = slide(model, img, InferenceSpec(mode="slide", window=window, stride=stride, flip=flip))
    x = normalize(torch.from_numpy(img).permute(2, 0, 1)[None], MEAN, STD)
    scores = predict_logits(model, x, mode="slide", window=window, stride=stride, flip=flip, batch_size=1)
    assert scores.std() > 0.1  # a model whose answer depends on the pixels
    assert torch.equal(torch.cat(blocks, 2), scores)  # (1, K, H, W), bit for bit
    np.testing.assert_array_equal(got, scores.argmax(1)[0].numpy())


@pytest.mark.parametrize(
    ("h", "w", "window", "stride", "band"), [(30, 170, (24, 20), None, 2), (45, 203, (20, 24), (8, 8), 3)]
)
@pytest.mark.parametrize("flip", [False, True])
def test_a_wide_image_is_slid_band_by_band_with_the_same_scores(monkeypatch, h, w, window, stride, band, flip):
    """Bands of `band` strides bound the strips by the band, not the image's width; each band runs on the
    windows of the whole image's grid that cover it, so the scores stay those of one slide, bit for bit."""
    blocks, widths = [], []
    labels = seg._labels

    def recording(logits, num_classes):
        blocks.append(logits)
        return labels(logits, num_classes)

    strip = seg._Strip

    def measured(rows, width, device):
        widths.append(width)
        return strip(rows, width, device)

    monkeypatch.setattr(seg, "_labels", recording)
    monkeypatch.setattr(seg, "_Strip", measured)
    monkeypatch.setattr(seg, "_BAND_STRIDES", band)
    model = Context().eval()
    img = image(h, w, seed=w)
    spec = InferenceSpec(mode="slide", window=window, stride=stride, flip=flip)
    got = slide(model, img, spec)
    x = normalize(torch.from_numpy(img).permute(2, 0, 1)[None], MEAN, STD)
    scores = predict_logits(model, x, mode="slide", window=window, stride=stride, flip=flip, batch_size=1)
    rows = len(window_starts(h, window[0], spec.stride[0]))  # blocks per band, top to bottom
    bands = [torch.cat(blocks[i : i + rows], 2) for i in range(0, len(blocks), rows)]
    assert len(bands) == -(-w // (band * spec.stride[1])) > 2
    assert torch.equal(torch.cat(bands, 3), scores)  # (1, K, H, W), bit for bit
    np.testing.assert_array_equal(got, scores.argmax(1)[0].numpy())
    assert max(widths) <= band * spec.stride[1] + 2 * window[1]  # the strips: a band wide, not the image


@pytest.mark.parametrize(("h", "w", "window", "stride"), SHAPES[:3] + SHAPES[-1:])
@pytest.mark.parametrize("flip", [False, True])
def test_every_window_of_the_whole_image_runs_once(h, w, window, stride, flip):
    """The chunked slide ran a window once for every chunk it touched: ~2x the forward passes for the
    default 2/3 stride. Now: the whole image's window grid, once (the flipped image's grid too with flip)."""
    model = Context().eval()
    spec = InferenceSpec(mode="slide", window=window, stride=stride, flip=flip)
    slide(model, image(h, w), spec)
    (wh, ww), (sy, sx) = window, spec.stride
    windows = len(window_starts(max(h, wh), wh, sy)) * len(window_starts(max(w, ww), ww, sx))
    assert len(model.seen) == windows * (2 if flip else 1)
    assert set(model.seen) == {window}  # one window per forward pass, padded to the window where the image is smaller


def test_a_large_image_in_whole_mode_is_slid_and_never_reaches_the_model_whole(monkeypatch):
    """Before, `predict` and `serve` ran the model on the whole image: a 4000x4000 PNG took 7.2 GB."""
    spans = []
    scores = seg._scores

    def recording(model, img, **kwargs):
        spans.append(img.shape[:2])
        return scores(model, img, **kwargs)

    monkeypatch.setattr(seg, "_scores", recording)
    model = Context().eval()
    img = image(300, 260)
    got = run(model, img, max_whole_pixels=200 * 200, default_win=(40, 40))
    np.testing.assert_array_equal(got, reference(model, img, (40, 40)))
    assert max(h * w for h, w in model.seen) <= 40 * 40  # the model sees one window at a time
    assert max(max(s) for s in spans) <= 40  # score maps of one window, not of the image
    model.seen.clear()
    run(model, image(100, 100), max_whole_pixels=200 * 200, default_win=(40, 40))
    assert model.seen == [(100, 100)]  # at most the limit: whole, as asked


def test_default_window_is_the_training_crop():
    assert seg.default_window({"crop_size": [240, 320]}) == (240, 320)
    assert seg.default_window({}) == (512, 512)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"mode": "multiscale", "scales": (0.5, 1.0)}, "multi-scale"), ({"crf": CRFParams()}, "dense CRF")],
)
def test_whole_image_only_methods_are_refused_above_the_limit(kwargs, words):
    with pytest.raises(UserError) as e:
        run(Context().eval(), image(30, 40), max_whole_pixels=1000, name="big.png", **kwargs)
    message = str(e.value)
    assert "\n" not in message and message.startswith("big.png: 40x30 = 1200 pixels") and words in message
    assert 'infer it downscaled (large="downscale")' in message  # the way out, in the library's words


@pytest.mark.parametrize(
    ("h", "w", "size"), [(5, 7, (23, 31)), (31, 47, (200, 300)), (3, 100, (13, 401)), (9, 12, (9, 12))]
)
def test_strip_upsampling_equals_one_interpolate_then_argmax(monkeypatch, h, w, size):
    monkeypatch.setattr(seg, "STRIP_VALUES", 5 * size[1] * 3)  # strips of 3 rows, the last one shorter
    scores = torch.randn(1, 5, h, w, generator=torch.Generator().manual_seed(h))
    got = seg.upsampled_labels(scores, size, num_classes=5)
    whole = F.interpolate(scores, size=size, mode="bilinear", align_corners=False).argmax(1)[0].numpy()
    np.testing.assert_array_equal(got, whole)
    assert got.dtype == np.uint8


@pytest.mark.parametrize(
    ("h", "w", "limit"), [(150, 170, 2000), (30, 40, 1199), (1, 10**7, 2048 * 1024), (4000, 3000, 2048 * 1024)]
)
def test_downscaled_size_is_the_largest_of_the_aspect_ratio_within_the_limit(h, w, limit):
    small_h, small_w = seg.downscaled_size(h, w, limit)
    assert small_h * small_w <= limit < (small_h + 1) * (small_w + 1)
    assert small_h <= h and small_w <= w and abs(small_h / small_w - h / w) <= max(1 / small_w, h / w / small_h)


def downscaled_reference(model: nn.Module, img: np.ndarray, size, spec: InferenceSpec) -> np.ndarray:
    """`engine.segment` on Pillow's bilinear resize to `size`, then one `F.interpolate` back and argmax."""
    small = np.array(Image.fromarray(img).resize(size[::-1], Image.Resampling.BILINEAR))
    scores = segment(model, torch.from_numpy(small).permute(2, 0, 1)[None], spec, mean=MEAN, std=STD, num_classes=4)
    return F.interpolate(scores, size=img.shape[:2], mode="bilinear", align_corners=False).argmax(1)[0].numpy()


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"mode": "multiscale", "scales": (0.5, 1.0)}, {"crf": CRFParams(iterations=2)}, {"flip": True}],
    ids=["whole", "multiscale", "crf", "flip"],
)
def test_downscale_infers_at_most_the_limit_as_asked_and_answers_at_full_size(monkeypatch, kwargs):
    """`large="downscale"` runs what sliding refuses above the limit, on the image downscaled to it."""
    monkeypatch.setattr(seg, "STRIP_VALUES", 4 * 170 * 10)  # 10 rows of full-resolution scores at a time
    strips = []
    labels = seg._labels

    def recording(logits, num_classes):
        strips.append(tuple(logits.shape))
        return labels(logits, num_classes)

    monkeypatch.setattr(seg, "_labels", recording)
    model = Context().eval()
    img = image(150, 170)
    got = run(model, img, max_whole_pixels=2000, large="downscale", **kwargs)
    assert got.shape == (150, 170) and got.dtype == np.uint8
    assert max(h * w for h, w in model.seen) <= 2000  # the model never sees more than the limit
    assert (42, 47) in model.seen  # 150 x 170 downscaled to the largest 1974 pixels of its shape
    assert strips == [(1, 4, 10, 170)] * 15  # full-resolution scores: one strip of 10 rows at a time
    spec = InferenceSpec(**{"mode": "whole", **kwargs})
    np.testing.assert_array_equal(got, downscaled_reference(model, img, (42, 47), spec))
    model.seen.clear()
    run(model, image(40, 50), max_whole_pixels=2000, large="downscale")
    assert model.seen == [(40, 50)]  # at most the limit: whole, as asked, never resized


def test_an_unknown_large_kind_names_the_argument():
    with pytest.raises(ArgumentError) as info:
        run(Context().eval(), image(8, 8), large="shrink")
    assert info.value.argument == "large" and "slide, downscale" in str(info.value)
