"""FCN-Basic and its Table 1 variants (SegNet paper, Sec. 3.1): parameter counts, odd sizes, skip wiring."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.layers import make_upsample
from pixelwise.models.segnet import FCNBasicUpsample, fcn_basic, segnet_basic

VARIANTS = {
    "FCN-Basic": {},
    "FCN-Basic-NoAddition": {"skip_addition": False},
    "FCN-Basic-NoDimReduction": {"dim_reduction": False},
    "FCN-Basic-NoAddition-NoDimReduction": {"skip_addition": False, "dim_reduction": False},
}


def _tiny(variant: str, seed: int = 0) -> nn.Module:
    """A 3-class, 8-filter model in eval mode with random (not bilinear) deconvolution kernels."""
    torch.manual_seed(seed)
    model = fcn_basic(num_classes=3, encoder_channels=8, **VARIANTS[variant]).eval()
    with torch.no_grad():
        for up in model.decoder.ups:
            up.up.weight.normal_(0, 0.1)
    return model


@pytest.mark.parametrize(
    ("variant", "paper_m"),
    [
        ("FCN-Basic", 0.65),
        ("FCN-Basic-NoAddition", 0.65),
        ("FCN-Basic-NoDimReduction", 1.625),
        ("FCN-Basic-NoAddition-NoDimReduction", 1.625),
    ],
)
def test_parameter_counts_match_table_1(variant, paper_m):
    k, c = 11, 64  # CamVid's 11 classes, 64 filters
    with torch.device("meta"):
        n = sum(p.numel() for p in fcn_basic(num_classes=k, **VARIANTS[variant]).parameters())
    encoder = 3 * c * 49 + 3 * c * c * 49 + 4 * 2 * c  # 7x7 convs without bias, BN scale and shift
    reduce_ = c * k + k  # 1x1 conv with bias
    kw = VARIANTS[variant]
    if kw.get("dim_reduction", True):
        n_reductions = 4 if kw.get("skip_addition", True) else 1  # pool4 (the input) + pool3, 2, 1
        expected = encoder + n_reductions * reduce_ + 4 * k * k * 8 * 8  # 4 deconvs, K x K x 8 x 8, no bias
    else:
        expected = encoder + 4 * c * c * 8 * 8 + reduce_  # 64-channel deconvs, then the 1x1 classifier
    assert n == expected
    # The table gives 2-3 significant digits and its counts look like 0.625 M + decoder rounded to
    # 0.1 M (1.425 = 0.625 + 0.8 for SegNet-Basic, 1.625 = 0.625 + 1.0 here, where the deconvolutions
    # hold 1.049 M): 3 % covers all rows (here -0.6 %, -1.0 %, +2.2 %, +2.2 %).
    assert abs(n / 1e6 - paper_m) <= 0.03 * paper_m, (n, paper_m)


def test_segnet_basic_count_is_within_the_same_tolerance():
    with torch.device("meta"):
        n = sum(p.numel() for p in segnet_basic(num_classes=11).parameters())
    assert abs(n / 1e6 - 1.425) <= 0.03 * 1.425  # Table 1: SegNet-Basic 1.425 M


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_odd_sizes_and_backward(variant):
    model = _tiny(variant).train()
    for size in [(45, 61), (17, 5), (16, 16), (1, 3)]:
        assert model(torch.randn(2, 3, *size)).shape == (2, 3, *size)
    y = model(torch.randn(2, 3, 19, 23))
    loss = F.cross_entropy(y, torch.randint(0, 3, (2, 19, 23)))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("out_size", [(10, 14), (9, 13), (10, 13)])
def test_8x8_deconvolution_starts_as_the_bilinear_transposed_upsampling(out_size):
    up = FCNBasicUpsample(3)
    assert up.up.weight.shape == (3, 3, 8, 8) and up.up.weight.requires_grad and up.up.bias is None
    ref = make_upsample("transposed", 3, 3, 2, init="bilinear", bias=False)
    x = torch.randn(2, 3, 5, 7)
    torch.testing.assert_close(up(x, output_size=out_size), ref(x, output_size=out_size), rtol=0, atol=1e-6)
    # away from the border it is bilinear interpolation
    interp = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up(x)[..., 1:-1, 1:-1], interp[..., 1:-1, 1:-1], rtol=0, atol=1e-6)


def test_zeroed_skip_reductions_give_the_noaddition_output():
    full = _tiny("FCN-Basic")
    no_add = fcn_basic(num_classes=3, encoder_channels=8, skip_addition=False).eval()
    missing = no_add.load_state_dict(full.state_dict(), strict=False)
    assert missing.missing_keys == [] and sorted(missing.unexpected_keys) == sorted(
        f"head.reduce_skips.{i}.{w}" for i in range(3) for w in ("weight", "bias")
    )
    x = torch.randn(2, 3, 37, 29)
    with torch.no_grad():
        assert (full(x) - no_add(x)).abs().max() > 1e-3  # the skips do contribute
        for conv in full.head.reduce_skips:
            conv.weight.zero_()
            conv.bias.zero_()
        torch.testing.assert_close(full(x), no_add(x), rtol=0, atol=1e-6)


def test_each_skip_is_added_at_its_resolution_before_the_remaining_upsamplings():
    # The decoder is linear in its skips: shifting the bias of the skip at H/8 (pool3), H/4 (pool2) or
    # H/2 (pool1) by d adds exactly the remaining deconvolutions applied to a constant map d there.
    model = _tiny("FCN-Basic")
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        sizes = model.encoder(x).sizes  # pre-pool sizes: (45, 61), (23, 31), (12, 16), (6, 8)
        base = model(x)
        d = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
        for j, conv in enumerate(model.head.reduce_skips):  # j = 0: pool3, 1: pool2, 2: pool1
            conv.bias += d.flatten()
            shift = d.expand(1, 3, *sizes[3 - j])  # a constant map at the skip's resolution
            for i in range(j + 1, 4):
                shift = model.decoder.ups[i](shift, output_size=sizes[3 - i])
            assert shift.shape[-2:] == (45, 61)
            torch.testing.assert_close(model(x) - base, shift, rtol=1e-4, atol=1e-4)
            conv.bias -= d.flatten()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_equals_a_functional_reference(variant):
    # Written with F.conv_transpose2d / F.conv2d from the paper's description, not from the modules.
    model = _tiny(variant)
    kw = VARIANTS[variant]
    add, reduce_ = kw.get("skip_addition", True), kw.get("dim_reduction", True)
    x = torch.randn(2, 3, 27, 35)
    with torch.no_grad():
        pooled = model.encoder(x)  # 8-channel maps at 14x18, 7x9, 4x5, 2x3
        sizes = pooled.sizes
        assert [tuple(p.shape[-2:]) for p in pooled] == [(14, 18), (7, 9), (4, 5), (2, 3)]
        dec = model.decoder
        convs = [model.head.reduce_input] + list(model.head.reduce_skips) if reduce_ else []

        def red(i, f):
            return F.conv2d(f, convs[i].weight, convs[i].bias) if reduce_ else f

        y = red(0, pooled[3])
        targets = [(4, 5), (7, 9), (14, 18), (27, 35)]  # each decoder's output, deepest first
        assert [tuple(s) for s in sizes] == targets[::-1]
        for i, (h, w) in enumerate(targets):
            y = F.conv_transpose2d(y, dec.ups[i].up.weight, stride=2, padding=3)[..., :h, :w]
            if add and i < 3:
                y = y + red(i + 1, pooled[2 - i])
        if not reduce_:
            y = F.conv2d(y, model.head.weight, model.head.bias)
        assert y.shape == (2, 3, 27, 35)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
