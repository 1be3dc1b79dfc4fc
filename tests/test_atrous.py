"""Atrous convolution, DeepLab v2's ASPP-L and DeepLab v3's ASPP (checked against torchvision)."""

import pytest
import torch
import torch.nn as nn
from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from pixelwise.errors import UserError
from pixelwise.layers import ASPP, ASPPv2, ConvNormAct, SeparableConv2d, aspp_rates, atrous_conv3x3


def test_aspp_rates():
    assert aspp_rates(16) == (6, 12, 18)
    assert aspp_rates(8) == (12, 24, 36)
    with pytest.raises(UserError, match=r"output_stride=32.*8 or 16"):
        aspp_rates(32)


def test_atrous_conv_samples_with_holes():
    conv = atrous_conv3x3(1, 1, dilation=2, bias=False)
    nn.init.ones_(conv.weight)
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    with torch.no_grad():
        y = conv(x)[0, 0]
    assert y.shape == (9, 9)
    expected = torch.zeros(9, 9)
    expected[2:7:2, 2:7:2] = 1.0  # the impulse reaches outputs at offsets {-2, 0, 2}^2
    torch.testing.assert_close(y, expected)


def test_separable_conv_equals_the_full_conv_of_its_factors():
    torch.manual_seed(0)
    conv = SeparableConv2d(3, 5, 3, padding=2, dilation=2)
    depthwise, pointwise = conv.depthwise.weight, conv.pointwise.weight  # (3, 1, 3, 3), (5, 3, 1, 1)
    assert sum(p.numel() for p in conv.parameters()) == 3 * 9 + 3 * 5 + 5  # no depthwise bias
    full = nn.Conv2d(3, 5, 3, padding=2, dilation=2)
    with torch.no_grad():
        full.weight.copy_(pointwise[:, :, 0, 0, None, None] * depthwise[None, :, 0])  # W[o,i] = P[o,i] * D[i]
        full.bias.copy_(conv.pointwise.bias)
        x = torch.randn(2, 3, 11, 13)
        torch.testing.assert_close(conv(x), full(x), atol=1e-5, rtol=1e-5)
    assert conv(x).shape == (2, 5, 11, 13)


def test_separable_conv_stands_where_a_conv_type_is_passed():
    block = ConvNormAct(4, 6, conv_layer=SeparableConv2d)  # bias only where no norm follows
    assert isinstance(block[0], SeparableConv2d) and block[0].pointwise.bias is None
    assert sum(p.numel() for p in block.parameters()) == 4 * 9 + 4 * 6 + 2 * 6
    aspp = ASPP(8, (1, 2, 3), out_channels=4, conv_layer=SeparableConv2d)
    for branch, rate in zip(aspp.convs[1:4], (1, 2, 3), strict=True):
        assert branch[0].depthwise.dilation == (rate, rate) and branch[0].depthwise.groups == 8
    # 1x1 and pooling branches 2 * (8*4 + 8), three separable branches 3 * (8*9 + 8*4 + 8), projection 5*4*4 + 8
    assert sum(p.numel() for p in aspp.parameters()) == 2 * 40 + 3 * 112 + 88
    assert aspp.eval()(torch.randn(1, 8, 7, 9)).shape == (1, 4, 7, 9)
    with pytest.raises(UserError, match="dilation"):
        atrous_conv3x3(4, 4, dilation=0, conv_layer=SeparableConv2d)


def _randomise_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def test_aspp_equals_torchvision():
    torch.manual_seed(0)
    ref = TorchvisionASPP(16, (2, 4, 6), out_channels=8)
    _randomise_bn(ref)
    ours = ASPP(16, (2, 4, 6), out_channels=8)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 16, 9, 11)
    ref.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
    # training mode (batch statistics), dropout switched off on both sides
    ref.train()
    ours.train()
    ref.project[3].p = 0.0
    ours.project[3].p = 0.0
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.convs[4][2].running_mean, ref.convs[4][2].running_mean)


def test_torchvision_deeplab_head_state_dict_loads_strictly():
    head = DeepLabHead(32, 5, atrous_rates=(12, 24, 36))
    ours = nn.Sequential(
        ASPP(32, aspp_rates(8)),
        nn.Conv2d(256, 256, 3, padding=1, bias=False),
        nn.BatchNorm2d(256),
        nn.ReLU(),
        nn.Conv2d(256, 5, 1),
    )
    ours.load_state_dict(head.state_dict(), strict=True)
    assert [m.dilation for m in (ours[0].convs[i][0] for i in (1, 2, 3))] == [(12, 12), (24, 24), (36, 36)]


def test_aspp_batch_size_one_in_training():
    torch.manual_seed(0)
    ref = TorchvisionASPP(8, (1, 2, 3), out_channels=4).train()
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ref(x)
    ours = ASPP(8, (1, 2, 3), out_channels=4).train()
    ours.load_state_dict(ref.state_dict())
    pool_bn = ours.convs[4][2]
    before = pool_bn.running_mean.clone(), pool_bn.running_var.clone()
    y = ours(x)
    y.sum().backward()
    assert y.shape == (1, 4, 5, 5) and torch.isfinite(y).all()
    # the pooling branch normalised with running statistics and left them unchanged ...
    torch.testing.assert_close(pool_bn.running_mean, before[0])
    torch.testing.assert_close(pool_bn.running_var, before[1])
    assert pool_bn.weight.grad is not None
    # ... while the other branches still used batch statistics and updated theirs
    assert not torch.equal(ours.convs[1][1].running_mean, torch.zeros(4))
    # and the pooling branch then equals torchvision's in eval mode
    ours.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.convs[4](x), ref.convs[4](x))


def test_aspp_v2_sums_branches():
    torch.manual_seed(0)
    head = ASPPv2(6, num_classes=3, rates=(1, 2, 3, 4), hidden_channels=10).eval()
    assert len(head.branches) == 4
    fc6, fc7, fc8 = head.branches[2][0], head.branches[2][3], head.branches[2][6]
    assert fc6.kernel_size == (3, 3) and fc6.dilation == (3, 3) and fc6.out_channels == 10
    assert fc7.kernel_size == (1, 1) and fc8.kernel_size == (1, 1) and fc8.out_channels == 3
    x = torch.randn(2, 6, 7, 8)
    with torch.no_grad():
        y = head(x)
        parts = sum(branch(x) for branch in head.branches)
    assert y.shape == (2, 3, 7, 8)
    torch.testing.assert_close(y, parts)
    resnet_form = ASPPv2(6, num_classes=3, hidden_channels=None)
    assert [len(b) for b in resnet_form.branches] == [1, 1, 1, 1]
    assert [b[0].dilation[0] for b in resnet_form.branches] == [6, 12, 18, 24]
    assert resnet_form(x).shape == (2, 3, 7, 8)
