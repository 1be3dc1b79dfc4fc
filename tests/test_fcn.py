"""FCN-32s/16s/8s: shapes, Caffe geometry, staged initialisation, at-once scaling, ImageNet weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vgg import cfgs, make_layers

from pixelwise.errors import UserError
from pixelwise.layers import bilinear_kernel, make_upsample
from pixelwise.models.fcn import FCN, _caffe_upsample, fcn8s, fcn16s, fcn32s

TINY = {"width_div": 16, "fc_channels": 512}  # VGG widths 4..32, fc6/fc7 32 channels


def _randomize_scores(model: FCN) -> None:
    """Score layers start at zero (as in the paper); give them values so outputs are informative."""
    for name in ("score_fr", "score_pool4", "score_pool3"):
        if hasattr(model.head, name):
            nn.init.normal_(getattr(model.head, name).weight, std=0.5)
            nn.init.normal_(getattr(model.head, name).bias, std=0.5)


@pytest.mark.parametrize("geometry", ["same", "original"])
@pytest.mark.parametrize("builder", [fcn32s, fcn16s, fcn8s])
def test_output_is_input_sized_and_trains(builder, geometry):
    torch.manual_seed(0)
    model = builder(num_classes=3, geometry=geometry, **TINY)
    _randomize_scores(model)
    for size in [(21, 35), (1, 3)]:
        x = torch.randn(2, 3, *size)
        y = model(x)
        assert y.shape == (2, 3, *size)
    y.square().mean().backward()
    grad = model.encoder.features[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_scoring_layers_start_at_zero():
    model = fcn8s(num_classes=3, **TINY)
    for layer in (model.head.score_fr, model.head.score_pool4, model.head.score_pool3):
        assert layer.weight.abs().sum() == 0 and layer.bias.abs().sum() == 0
    assert model(torch.randn(1, 3, 32, 32)).abs().sum() == 0


@pytest.mark.parametrize("scale", [2, 8, 32])
def test_caffe_upsample_is_caffe_unpadded_deconvolution(scale):
    up = make_upsample("transposed", 3, 3, scale, init="bilinear", bias=False)
    x = torch.randn(2, 3, 4, 5)
    kernel = torch.zeros(3, 3, 2 * scale, 2 * scale)
    for c in range(3):
        kernel[c, c] = bilinear_kernel(2 * scale)  # Caffe's surgery.interp: one bilinear kernel per class
    expected = F.conv_transpose2d(x, kernel, stride=scale)  # Deconvolution, no padding: (h+1)*s rows
    torch.testing.assert_close(_caffe_upsample(up, x), expected)


def _caffe_reference(model: FCN, x: torch.Tensor) -> torch.Tensor:
    """The Caffe net written out by hand from voc-fcn8s/train.prototxt: unpadded deconvolutions, crops 5/9/31."""
    k = model.head.score_fr.out_channels

    def deconv(y: torch.Tensor, s: int) -> torch.Tensor:
        kernel = torch.zeros(k, k, 2 * s, 2 * s)
        for c in range(k):
            kernel[c, c] = bilinear_kernel(2 * s)
        return F.conv_transpose2d(y, kernel, stride=s)

    def crop(y: torch.Tensor, offset: int, ref: torch.Tensor) -> torch.Tensor:
        return y[..., offset : offset + ref.shape[-2], offset : offset + ref.shape[-1]]

    pool3, pool4, pool5 = model.encoder(x)[2:5]
    upscore2 = deconv(model.head.score_fr(model.encoder.fc(pool5)), 2)
    fuse_pool4 = upscore2 + crop(model.head.score_pool4(pool4), 5, upscore2)
    upscore_pool4 = deconv(fuse_pool4, 2)
    fuse_pool3 = upscore_pool4 + crop(model.head.score_pool3(pool3), 9, upscore_pool4)
    return crop(deconv(fuse_pool3, 8), 31, x)


def test_original_geometry_equals_the_caffe_net():
    torch.manual_seed(0)
    model = fcn8s(num_classes=3, geometry="original", **TINY).eval()
    _randomize_scores(model)
    assert model.encoder.features[0].padding == (100, 100) and model.encoder.fc[0].padding == (0, 0)
    x = torch.randn(1, 3, 37, 50)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _caffe_reference(model, x))


def test_original_fcn32s_crops_19():
    torch.manual_seed(0)
    model = fcn32s(num_classes=2, geometry="original", **TINY).eval()
    _randomize_scores(model)
    x = torch.randn(1, 3, 50, 41)
    kernel = torch.zeros(2, 2, 64, 64)
    kernel[0, 0] = kernel[1, 1] = bilinear_kernel(64)
    with torch.no_grad():
        scores = model.head.score_fr(model.encoder.fc(model.encoder(x)[4]))
        expected = F.conv_transpose2d(scores, kernel, stride=32)[..., 19 : 19 + 50, 19 : 19 + 41]
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("geometry", ["same", "original"])
def test_staged_init_keeps_the_coarser_prediction(geometry):
    # Nearest upsampling composes exactly (2x then 16x == 32x), so with zero-initialised skips the
    # finer net must reproduce the coarser one bit for bit.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 29, 45)
    kw = {"num_classes": 3, "geometry": geometry, "upsample": "nearest", **TINY}
    m32 = fcn32s(**kw).eval()
    _randomize_scores(m32)
    m16 = fcn16s(init_from=m32, **kw).eval()
    assert m16.head.score_pool4.weight.abs().sum() == 0 and m16.head.score_pool4.bias.abs().sum() == 0
    with torch.no_grad():
        y32 = m32(x)
        torch.testing.assert_close(m16(x), y32, rtol=0, atol=0)
        nn.init.normal_(m16.head.score_pool4.weight)  # fine-tuning FCN-16s changes its pool4 skip
        y16 = m16(x)
        assert not torch.equal(y16, y32)
        m8 = fcn8s(init_from=m16, **kw).eval()
        torch.testing.assert_close(m8(x), y16, rtol=0, atol=0)
        torch.testing.assert_close(fcn8s(init_from=m32, **kw).eval()(x), y32, rtol=0, atol=0)


def test_staged_init_with_bilinear_deconvolutions_copies_weights_and_zeroes_skips():
    torch.manual_seed(0)
    m16 = fcn16s(num_classes=3, **TINY)
    _randomize_scores(m16)
    nn.init.normal_(m16.decoder.upscore2.up.weight)  # a learned intermediate upsampling is carried over
    m8 = fcn8s(num_classes=3, init_from=m16, **TINY)
    for key, value in m16.state_dict().items():
        if not key.startswith("decoder.upscore."):  # the final upsampling has another factor (16x vs 8x)
            torch.testing.assert_close(m8.state_dict()[key], value, rtol=0, atol=0)
    assert m8.head.score_pool3.weight.abs().sum() == 0
    assert m8.decoder.upscore.up.weight.shape[-1] == 16 and not m8.decoder.upscore.up.weight.requires_grad  # fixed 8x
    assert m8.decoder.upscore_pool4.up.weight.requires_grad  # intermediate 2x upsampling is learned (Sec. 4.3)


def test_init_from_errors():
    m8 = fcn8s(num_classes=3, **TINY)
    with pytest.raises(UserError, match="coarser"):
        fcn16s(num_classes=3, init_from=m8, **TINY)
    with pytest.raises(UserError, match="score_fr"):
        fcn16s(num_classes=5, init_from=fcn32s(num_classes=3, **TINY), **TINY)
    with pytest.raises(UserError, match="geometry"):
        fcn16s(num_classes=3, geometry="original", init_from=fcn32s(num_classes=3, **TINY), **TINY)
    with pytest.raises(UserError, match="max_unpool"):
        fcn32s(num_classes=3, upsample="max_unpool", **TINY)


def test_at_once_scales_pool4_and_pool3():
    torch.manual_seed(0)
    at_once = fcn8s(num_classes=3, at_once=True, **TINY).eval()
    _randomize_scores(at_once)
    staged = fcn8s(num_classes=3, **TINY).eval()
    state = at_once.state_dict()
    state["head.score_pool4.weight"] = state["head.score_pool4.weight"] * 0.01
    state["head.score_pool3.weight"] = state["head.score_pool3.weight"] * 1e-4
    staged.load_state_dict(state)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(at_once(x), staged(x), rtol=1e-4, atol=1e-6)


def test_weights_backbone_loads_convs_and_convolutionalizes_fc6_fc7(tmp_path):
    torch.manual_seed(0)
    features = make_layers([v if v == "M" else v // 16 for v in cfgs["D"]])
    classifier = nn.Sequential(nn.Linear(32 * 49, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 32))
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state |= {f"classifier.{k}": v for k, v in classifier.state_dict().items()}
    state["classifier.6.weight"] = torch.zeros(1000, 32)  # ImageNet fc8: not used
    torch.save(state, tmp_path / "vgg16.pth")
    model = fcn32s(num_classes=3, geometry="original", weights_backbone=tmp_path / "vgg16.pth", **TINY).eval()
    pool5 = torch.randn(1, 32, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.features[2].weight, features[2].weight)
        # fc6 as a 7x7 conv on a 7x7 map == the Linear layer on the flattened map; fc7 follows.
        expected = classifier[3](torch.relu(classifier[0](pool5.flatten(1))))
        torch.testing.assert_close(model.encoder.fc(pool5).flatten(1), torch.relu(expected))
    with pytest.raises(UserError, match="fc_channels=4096"):
        fcn32s(num_classes=3, weights_backbone=tmp_path / "vgg16.pth", width_div=16)  # fc width 256 != 32
    with pytest.raises(UserError, match="not both"):
        fcn16s(num_classes=3, weights_backbone=tmp_path / "vgg16.pth", init_from=model, **TINY)


def test_fcn8s_parameter_count_matches_the_paper():
    with torch.device("meta"):
        model = fcn8s(num_classes=21)
    n = sum(p.numel() for p in model.parameters())
    assert 133e6 < n < 136e6  # the paper: 134 M
