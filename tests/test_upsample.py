"""The upsampling family: exact alignment of the bilinear-initialised up-convolution, unpooling, sizes."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.errors import UserError
from pixelwise.layers import UPSAMPLE_KINDS, bilinear_kernel, make_upsample


def _zero_padded_bilinear(x: torch.Tensor, s: int) -> torch.Tensor:
    """The stated convention: bilinear (align_corners=False) of the input with one zero pixel around it."""
    return F.interpolate(F.pad(x, (1, 1, 1, 1)), scale_factor=s, mode="bilinear", align_corners=False)[..., s:-s, s:-s]


def test_bilinear_kernel_matches_fcn_filter():
    one_d = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(bilinear_kernel(4), one_d[:, None] * one_d[None, :])
    one_d3 = torch.tensor([1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3])  # odd size 5: factor 3, centre 2
    torch.testing.assert_close(bilinear_kernel(5), one_d3[:, None] * one_d3[None, :])
    assert make_upsample("transposed", 2, 2, 32, init="bilinear").up.kernel_size == (64, 64)  # FCN-32s


def test_transposed_bilinear_hand_computed_2x():
    x = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])
    up = make_upsample("transposed", 1, 1, 2, init="bilinear")
    expected = torch.tensor(
        [
            [0.5625, 1.125, 1.875, 1.6875],
            [1.5, 2.5, 3.5, 3.0],
            [3.0, 4.5, 5.5, 4.5],
            [2.8125, 4.125, 4.875, 3.9375],
        ]
    )
    with torch.no_grad():
        y = up(x)[0, 0]
    torch.testing.assert_close(y, expected)
    # The interior equals F.interpolate; the border row/column does not (zeros beyond the image).
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(y[1:3, 1:3], ref[1:3, 1:3])
    torch.testing.assert_close(ref[0, 0], torch.tensor(1.0))
    assert y[0, 0] == pytest.approx(0.5625)


@pytest.mark.parametrize("s", [2, 3, 4, 8, 32])
def test_transposed_bilinear_equals_interpolation(s):
    torch.manual_seed(s)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    up = make_upsample("transposed", 3, 3, s, init="bilinear").double()
    with torch.no_grad():
        y = up(x)
    assert y.shape == (2, 3, 5 * s, 6 * s)
    ref = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
    b = s // 2  # the border band where the zero padding shows
    torch.testing.assert_close(y[..., b : 5 * s - b, b : 6 * s - b], ref[..., b : 5 * s - b, b : 6 * s - b])
    # Borders, exactly: the same as bilinear interpolation of the zero-padded input.
    torch.testing.assert_close(y, _zero_padded_bilinear(x, s))
    if b:
        assert not torch.allclose(y[..., :b, :], ref[..., :b, :])
    # border="replicate" matches F.interpolate everywhere.
    up_rep = make_upsample("transposed", 3, 3, s, init="bilinear", border="replicate").double()
    with torch.no_grad():
        torch.testing.assert_close(up_rep(x), ref)


def test_transposed_default_is_unet_upconv_and_learnable_flag():
    up = make_upsample("transposed", 8, 4, 2)
    assert up.up.kernel_size == (2, 2) and up.up.stride == (2, 2)
    assert up(torch.randn(1, 8, 3, 5)).shape == (1, 4, 6, 10)
    frozen = make_upsample("transposed", 4, 4, 8, init="bilinear", learnable=False, bias=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(UserError, match="in_channels == out_channels"):
        make_upsample("transposed", 4, 3, 2, init="bilinear")


def test_max_unpool_restores_maxima():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 9)
    pooled, idx = nn.MaxPool2d(2, 2, return_indices=True)(x)  # (2, 3, 3, 4)
    up = make_upsample("max_unpool", 3, 3, 2)
    y = up(pooled, indices=idx, output_size=x.shape[-2:])
    assert y.shape == x.shape
    nonzero = y != 0
    assert int(nonzero.sum()) == pooled.numel()
    torch.testing.assert_close(y[nonzero], x[nonzero])  # every maximum at its original position
    # each 2x2 block holds its maximum where it was and zeros elsewhere; the odd last row/column is zero
    block_max = pooled.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)  # (2, 3, 6, 8)
    inner = x[..., :6, :8]
    torch.testing.assert_close(y[..., :6, :8], torch.where(inner == block_max, inner, torch.zeros_like(inner)))
    assert (y[..., 6, :] == 0).all() and (y[..., :, 8] == 0).all()
    with pytest.raises(ValueError, match="indices"):
        up(pooled)


def test_max_unpool_positions_hand_made():
    x = torch.tensor([[[[1.0, 9.0, 2.0, 0.0], [3.0, 4.0, 8.0, 5.0]]]])
    pooled, idx = F.max_pool2d(x, 2, 2, return_indices=True)
    y = make_upsample("max_unpool", 1, 1, 2)(pooled, indices=idx)
    torch.testing.assert_close(y, torch.tensor([[[[0.0, 9.0, 0.0, 0.0], [0.0, 0.0, 8.0, 0.0]]]]))


def test_fixed_unpool_top_left():
    up = make_upsample("fixed_unpool", 1, 1, 2, kernel_size=3)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = torch.tensor([[1.0, 0, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(up.unpool(x)[0, 0], expected)
    torch.testing.assert_close(up.unpool(x, output_size=(3, 3))[0, 0], expected[:3, :3])
    torch.testing.assert_close(up(x), up.conv(up.unpool(x)))
    x3 = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    y3 = make_upsample("fixed_unpool", 1, 1, 3).unpool(x3)
    assert y3.shape == (1, 1, 9, 9)
    torch.testing.assert_close(y3[0, 0, ::3, ::3], x3[0, 0])
    assert int((y3 != 0).sum()) == 9


@pytest.mark.parametrize("kind", UPSAMPLE_KINDS)
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_every_kind_gives_requested_size_for_odd_inputs(kind, ceil_mode):
    torch.manual_seed(1)
    big = torch.randn(1, 4, 11, 13)
    pooled = F.max_pool2d(big, 2, 2, ceil_mode=ceil_mode)  # (1, 4, 5|6, 6|7)
    # max_unpool projects 4 -> 3 channels first, so its indices come from a 3-channel map (U-Net's skips)
    _, idx = F.max_pool2d(big[:, :3], 2, 2, ceil_mode=ceil_mode, return_indices=True)
    up = make_upsample(kind, 4, 3, 2)
    y = up(pooled.requires_grad_(), indices=idx, output_size=(11, 13))
    assert y.shape == (1, 3, 11, 13)
    y.square().sum().backward()
    assert torch.isfinite(pooled.grad).all()
    if kind != "max_unpool":
        assert up(torch.randn(1, 4, 5, 7)).shape == (1, 3, 10, 14)


def test_interpolation_kinds_match_f_interpolate():
    x = torch.randn(1, 2, 4, 5)
    for kind in ("nearest", "bilinear", "bicubic"):
        up = make_upsample(kind, 2, 2, 4)
        assert sum(p.numel() for p in up.parameters()) == 0
        kw = {} if kind == "nearest" else {"align_corners": False}
        torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=4, mode=kind, **kw))
    proj = make_upsample("bilinear", 2, 5, 2)
    assert proj(x).shape == (1, 5, 8, 10)


def test_unknown_kind_names_the_choices():
    with pytest.raises(UserError) as err:
        make_upsample("deconv", 3, 3, 2)
    for kind in UPSAMPLE_KINDS:
        assert kind in str(err.value)
    with pytest.raises(UserError, match="scale"):
        make_upsample("bilinear", 3, 3, 0)
