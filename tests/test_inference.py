"""Inference modes: slide == whole for a pointwise model, flip/multiscale averaging, U-Net overlap-tile."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.errors import ArgumentError
from pixelwise.inference import normalize, predict_logits


def _pointwise(k=4):
    torch.manual_seed(0)
    return nn.Conv2d(3, k, 1).eval()


class _Recorder(nn.Module):
    """Pointwise model that records the inputs (and their batch sizes) it is called with."""

    def __init__(self):
        super().__init__()
        self.conv = _pointwise()
        self.batches = []
        self.inputs = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        self.inputs.append(x)
        return self.conv(x)


@pytest.mark.parametrize("size", [(37, 53), (16, 16), (9, 70)])
def test_slide_equals_whole_for_a_pointwise_model(size):
    model = _pointwise()
    x = torch.randn(2, 3, *size)
    whole = predict_logits(model, x)
    assert whole.shape == (2, 4, *size)
    slide = predict_logits(model, x, mode="slide", window=(16, 24), stride=(7, 9))
    assert torch.allclose(slide, whole, atol=1e-6)
    # an image smaller than the window is padded and cropped back
    big = predict_logits(model, x, mode="slide", window=(96, 96))
    assert big.shape == whole.shape and torch.allclose(big, whole, atol=1e-6)


def test_slide_averages_overlaps_with_a_count_map():
    class Ones(nn.Module):  # 1 inside each window's left column, 0 elsewhere
        def forward(self, x):
            y = torch.zeros(x.shape[0], 1, *x.shape[-2:])
            y[..., 0] = 1
            return y

    out = predict_logits(Ones(), torch.zeros(1, 3, 4, 10), mode="slide", window=(4, 4), stride=(4, 3))
    # windows start at x = 0, 3, 6: columns 0, 3, 6 are a window's first column; 3 and 6 are covered twice
    cover = torch.tensor([1, 1, 1, 2, 1, 1, 2, 1, 1, 1.0])
    first = torch.zeros(10)
    first[[0, 3, 6]] = 1
    assert torch.allclose(out[0, 0, 0], first / cover)


def test_windows_are_run_in_small_batches():
    model = _Recorder()
    predict_logits(model, torch.randn(1, 3, 40, 40), mode="slide", window=(10, 10), stride=(10, 10), batch_size=3)
    assert sum(model.batches) == 16 and max(model.batches) <= 3


def test_flip_and_multiscale_average():
    model = _pointwise()
    x = torch.randn(1, 3, 20, 30)
    whole = predict_logits(model, x)
    assert torch.allclose(predict_logits(model, x, flip=True), whole, atol=1e-6)  # pointwise: flip-invariant
    assert torch.allclose(predict_logits(model, x, mode="multiscale", scales=[1.0]), whole)

    class LeftRamp(nn.Module):  # not flip-invariant: the output depends on the column
        def forward(self, x):
            return torch.linspace(0, 1, x.shape[-1]).expand(x.shape[0], 1, *x.shape[-2:]).clone()

    flipped = predict_logits(LeftRamp(), x, flip=True)
    assert torch.allclose(flipped, torch.full_like(flipped, 0.5), atol=1e-6)
    # multiscale = mean of per-scale logits resized back bilinearly (the input shrunk antialiased)
    ms = predict_logits(model, x, mode="multiscale", scales=[0.5, 1.5])
    manual = (
        sum(
            F.interpolate(
                model(F.interpolate(x, size=s, mode="bilinear", align_corners=False, antialias=aa)),
                size=(20, 30),
                mode="bilinear",
                align_corners=False,
            )
            for s, aa in [((10, 15), True), ((30, 45), False)]
        )
        / 2
    )
    assert ms.shape == (1, 4, 20, 30) and torch.allclose(ms, manual, atol=1e-6)


def test_multiscale_shrinks_the_input_as_training_scales_it():
    """A test scale below 1 shows the network the image RandomScale would make at that scale (antialiased
    bilinear); above 1 the input is grown plain bilinear; the logits come back bilinearly either way."""
    from torchvision import tv_tensors

    from pixelwise.data.transforms import RandomScale

    model = _Recorder()
    x = torch.randn(1, 3, 20, 30)
    half = predict_logits(model, x, mode="multiscale", scales=[0.5])
    trained, _ = RandomScale((0.5, 0.5))(tv_tensors.Image(x[0]), tv_tensors.Mask(torch.zeros(20, 30)))
    (seen,) = model.inputs
    assert seen.shape == (1, 3, 10, 15) and torch.allclose(seen[0], trained, atol=1e-6)
    plain = F.interpolate(x, size=(10, 15), mode="bilinear", align_corners=False)
    assert not torch.allclose(seen, plain, atol=1e-2)  # the plain resize would differ: the check can fail
    up = F.interpolate(model.conv(seen), size=(20, 30), mode="bilinear", align_corners=False)
    assert torch.equal(half, up)

    model.inputs.clear()
    predict_logits(model, x, mode="multiscale", scales=[1.5])
    assert torch.equal(model.inputs[0], F.interpolate(x, size=(30, 45), mode="bilinear", align_corners=False))


def test_valid_unet_overlap_tile_matches_whole_image():
    from pixelwise.models.unet import unet

    torch.manual_seed(0)
    model = unet(num_classes=3, base_channels=4, depth=2).eval()  # valid convs, margin 40
    x = torch.randn(1, 3, 45, 50)
    whole = predict_logits(model, x)
    tiled = predict_logits(model, x, mode="slide", window=(60, 60), batch_size=2)  # 20x20 output tiles
    assert tiled.shape == (1, 3, 45, 50)
    # depth 2: output tiles are multiples of 4, the pooling grid lines up, so tiling is seamless and exact
    assert torch.allclose(tiled, whole, atol=1e-5)


def test_errors_and_normalize():
    model = _pointwise()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ArgumentError, match="needs a window"):
        predict_logits(model, x, mode="slide")
    with pytest.raises(ArgumentError, match="at most the window"):
        predict_logits(model, x, mode="slide", window=(4, 4), stride=(5, 2))
    with pytest.raises(ArgumentError, match="unknown"):
        predict_logits(model, x, mode="tiles")
    img = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    assert torch.allclose(normalize(img, (0.5, 0.5, 0.5), (0.5, 0.25, 1.0)).flatten(), torch.tensor([1.0, 2.0, 0.5]))
