"""U-Net: the paper's shapes and size rule, parameter count, same padding, alignment, weight map."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from pixelwise.errors import UserError
from pixelwise.layers import UPSAMPLE_KINDS
from pixelwise.losses import unet_weight_map
from pixelwise.models.unet import unet


def _expected_params(in_channels: int, num_classes: int, base: int, depth: int) -> int:
    """Hand count: double 3x3 convs with bias, 2x2 up-convs halving channels, 1x1 head."""
    widths = [base * 2**i for i in range(depth + 1)]

    def double(cin, cout):
        return 9 * cin * cout + cout + 9 * cout * cout + cout

    total = double(in_channels, widths[0]) + sum(double(widths[i - 1], widths[i]) for i in range(1, depth + 1))
    total += sum(4 * widths[i] * widths[i - 1] + widths[i - 1] for i in range(1, depth + 1))  # up-convs
    total += sum(double(2 * widths[i - 1], widths[i - 1]) for i in range(1, depth + 1))
    return total + widths[0] * num_classes + num_classes


def test_paper_shapes_and_parameter_count():
    with torch.device("meta"):  # full width without allocating anything
        model = unet(num_classes=2, in_channels=1)
        y = model.forward_valid(torch.empty(1, 1, 572, 572))
    assert y.shape == (1, 2, 388, 388)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == _expected_params(1, 2, 64, 4) == 31_030_658
    assert [block[1][0].out_channels for block in model.encoder.blocks] == [64, 128, 256, 512, 1024]
    assert model.margin == 184 and model.valid_output_size(572) == 388
    assert model.valid_input_size(388) == 572 and model.valid_input_size(1) == 188


def test_valid_size_rule_and_errors():
    model = unet(num_classes=2, in_channels=1, base_channels=2)
    with pytest.raises(UserError, match=r"570 .*16\*b \+ 60"):
        model.forward_valid(torch.zeros(1, 1, 570, 572))
    with pytest.raises(UserError, match="172"):
        model.valid_output_size(172)  # 16*7 + 60: too small, the bottom would vanish
    for n in (188, 204, 572):
        assert (n - 60) % 16 == 0 and model.valid_output_size(n) == n - 184
    with pytest.raises(UserError, match="max_unpool' needs padding='same'"):
        unet(num_classes=2, upsample="max_unpool")
    with pytest.raises(UserError, match="padding='full'"):
        unet(num_classes=2, padding="full")


def test_valid_forward_is_overlap_tile_with_mirroring():
    """forward() mirror-pads by margin/2 = 20 (depth 2); away from the mirrored context it equals the
    valid network run on real context, which checks the alignment of the crop."""
    torch.manual_seed(0)
    model = unet(num_classes=3, base_channels=2, depth=2).eval()
    assert model.margin == 40
    big = torch.randn(1, 3, 92, 92)  # 4*20 + 12: a valid tile, output 52
    with torch.no_grad():
        reference = model.forward_valid(big)  # (1, 3, 52, 52), the centre big[20:72, 20:72]
        tile = model(big[..., 20:72, 20:72])
    assert reference.shape == tile.shape == (1, 3, 52, 52)
    torch.testing.assert_close(tile[..., 20:32, 20:32], reference[..., 20:32, 20:32])
    assert not torch.allclose(tile[..., :4, :4], reference[..., :4, :4])


@pytest.mark.parametrize("size", [(13, 17), (16, 16), (1, 5)])
def test_valid_forward_any_size(size):
    model = unet(num_classes=3, in_channels=2, base_channels=2, depth=2)
    x = torch.randn(2, 2, *size, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 3, *size)
    y.mean().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("upsample", UPSAMPLE_KINDS)
def test_same_padding_forward_backward(upsample):
    torch.manual_seed(0)
    model = unet(num_classes=4, base_channels=4, depth=3, padding="same", upsample=upsample, norm_layer=nn.BatchNorm2d)
    x = torch.randn(2, 3, 16, 24)
    y = model(x)
    assert y.shape == (2, 4, 16, 24)
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_valid(x))  # divisible by 8: no padding
        assert model(torch.randn(1, 3, 13, 21)).shape == (1, 4, 13, 21)  # padded to 16x24, cropped back
    with pytest.raises(UserError, match="divisible by 8"):
        model.forward_valid(torch.randn(1, 3, 13, 16))


def _two_squares(gap: int) -> np.ndarray:
    mask = np.zeros((20, 20), dtype=np.int64)
    mask[8:12, 4:8] = 1
    mask[8:12, 8 + gap : 12 + gap] = 1
    return mask


@pytest.mark.parametrize(("gap", "d_sum"), [(1, 2.0), (2, 3.0)])
def test_weight_map_two_squares(gap, d_sum):
    mask = _two_squares(gap)
    w = unet_weight_map(mask, w0=10.0, sigma=5.0)
    n_fg = 32
    wc_bg, wc_fg = 400 / (2 * (400 - n_fg)), 400 / (2 * n_fg)  # balanced class weights
    assert w.dtype == np.float32 and w.shape == (20, 20)
    assert w[9, 8] == pytest.approx(wc_bg + 10.0 * math.exp(-(d_sum**2) / (2 * 5.0**2)), rel=1e-5)
    assert w[9, 5] == pytest.approx(wc_fg, rel=1e-6)  # inside a cell: class weight only
    # a far corner: d1 to the right square's corner (8, 11 + gap), d2 to the left one's (8, 7)
    d1 = math.hypot(8, 19 - (11 + gap))
    d2 = math.hypot(8, 19 - 7)
    assert w[0, 19] == pytest.approx(wc_bg + 10.0 * math.exp(-((d1 + d2) ** 2) / 50.0), rel=1e-5)
    assert w[0, 19] == pytest.approx(wc_bg, abs=1e-4)
    assert (w * (mask == 0)).sum() / (mask == 0).sum() > wc_bg  # the term raises the background weight


def test_weight_map_instances_class_weights_ignore_and_tensor():
    mask = np.zeros((10, 10), dtype=np.int64)
    mask[4:8, 2:5] = 1
    mask[4:8, 5:8] = 2  # touching instances: one connected component
    w_cc = unet_weight_map(mask > 0, class_weights={0: 1.0, 1: 3.0})
    w_inst = unet_weight_map(mask, class_weights={0: 1.0, 1: 3.0}, instances=True)
    assert w_cc[3, 4] == pytest.approx(1.0)  # a single cell: no separation term
    # above the junction: (3,4) touches cell 1 (d1=1), cell 2 at (4,5) is sqrt(2) away
    assert w_inst[3, 4] == pytest.approx(1.0 + 10.0 * math.exp(-((1 + math.sqrt(2)) ** 2) / 50.0), rel=1e-5)
    assert w_inst[5, 3] == pytest.approx(3.0)
    ignored = np.where(np.arange(100).reshape(10, 10) < 10, 255, mask > 0)
    w_t = unet_weight_map(torch.from_numpy(ignored))
    assert isinstance(w_t, torch.Tensor) and w_t.dtype == torch.float32
    assert (w_t[0] == 0).all() and (w_t[1:] > 0).all()
    with pytest.raises(UserError, match="class 1"):
        unet_weight_map(mask > 0, class_weights={0: 1.0})


def test_weight_map_matches_brute_force():
    """Against all per-cell distance transforms sorted per pixel (the windowed computation is exact to 1e-5)."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), dtype=np.int64)
    for r, c in rng.integers(0, 60, size=(15, 2)):
        mask[r : r + 4, c : c + 3] = 1
    cells, n = ndimage.label(mask > 0, structure=np.ones((3, 3)))
    dist = np.sort(np.stack([ndimage.distance_transform_edt(cells != i) for i in range(1, n + 1)]), axis=0)
    fg = mask > 0
    wc = np.where(fg, mask.size / (2 * fg.sum()), mask.size / (2 * (~fg).sum()))
    expected = wc + ~fg * 10.0 * np.exp(-((dist[0] + dist[1]) ** 2) / (2 * 4.0**2))
    np.testing.assert_allclose(unet_weight_map(mask, sigma=4.0), expected, rtol=1e-5, atol=1e-5)


def test_mirror_pad_repeats_reflection_for_tiny_maps():
    import torch.nn.functional as F

    from pixelwise.layers import mirror_pad as _mirror_pad

    x = torch.randn(1, 2, 5, 7)
    torch.testing.assert_close(_mirror_pad(x, 3, 2, 4, 1), F.pad(x, (3, 2, 4, 1), mode="reflect"))
    row = torch.arange(3.0).view(1, 1, 1, 3)
    expected = torch.tensor([1.0, 0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1])
    torch.testing.assert_close(_mirror_pad(row, 5, 5, 0, 0)[0, 0, 0], expected)
    torch.testing.assert_close(_mirror_pad(row, 0, 0, 2, 1)[0, 0], row[0, 0].expand(4, 3))  # one row: repeated
