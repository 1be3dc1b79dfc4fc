"""SegNet and SegNet-Basic: max-unpooling wiring, odd sizes, parameter counts, decoder variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vgg import cfgs, make_layers

from pixelwise.errors import UserError
from pixelwise.layers import MaxUnpool
from pixelwise.models.segnet import segnet, segnet_basic


def _tiny_segnet(**kw) -> nn.Module:
    return segnet(num_classes=3, width_div=16, **kw)


def _tiny_basic(**kw) -> nn.Module:
    return segnet_basic(num_classes=3, encoder_channels=8, decoder_channels=8, **kw)


@pytest.mark.parametrize("build", [_tiny_segnet, _tiny_basic], ids=["segnet", "segnet_basic"])
def test_decoder_unpools_with_the_encoders_indices(build):
    torch.manual_seed(0)
    model = build().eval()
    seen = {}
    model.encoder.register_forward_hook(lambda m, args, out: seen.update(encoder=out))
    first_up = model.decoder.ups[0]
    assert isinstance(first_up, MaxUnpool)
    first_up.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(x=args[0], kwargs=kwargs, out=out), with_kwargs=True
    )
    with torch.no_grad():
        model(torch.randn(2, 3, 45, 61))
    feats = seen["encoder"]
    indices, sizes = feats.indices, feats.sizes
    assert seen["kwargs"]["indices"] is indices[-1]  # the deepest pool's indices go to the first unpooling
    assert tuple(seen["kwargs"]["output_size"]) == sizes[-1]
    out, x, idx = seen["out"], seen["x"], indices[-1]
    assert out.shape[-2:] == sizes[-1]
    # Every value is back at its argmax position; every other position is zero.
    flat = out.flatten(2)
    torch.testing.assert_close(flat.gather(2, idx.flatten(2)), x.flatten(2), rtol=0, atol=0)
    hit = torch.zeros_like(flat, dtype=torch.bool).scatter_(2, idx.flatten(2), True)
    assert (flat[~hit] == 0).all()
    torch.testing.assert_close(out, F.max_unpool2d(x, idx, 2, 2, output_size=sizes[-1]), rtol=0, atol=0)


@pytest.mark.parametrize("upsample", ["max_unpool", "bilinear", "transposed", "fixed_unpool"])
@pytest.mark.parametrize("build", [_tiny_segnet, _tiny_basic], ids=["segnet", "segnet_basic"])
def test_odd_sizes_and_every_upsampling_kind(build, upsample):
    model = build(upsample=upsample)
    sizes = [(45, 61), (17, 5)] if upsample == "max_unpool" else [(45, 61)]
    for size in sizes:
        assert model(torch.randn(1, 3, *size)).shape == (1, 3, *size)


@pytest.mark.parametrize("build", [_tiny_segnet, _tiny_basic], ids=["segnet", "segnet_basic"])
def test_forward_backward(build):
    torch.manual_seed(0)
    model = build()
    y = model(torch.randn(2, 3, 32, 40))
    loss = F.cross_entropy(y, torch.randint(0, 3, (2, 32, 40)))
    loss.backward()
    assert torch.isfinite(loss)
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    first_conv = next(m for m in model.encoder.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0


def test_parameter_counts_match_the_paper():
    with torch.device("meta"):
        n_segnet = sum(p.numel() for p in segnet(num_classes=11).parameters())
        n_basic = sum(p.numel() for p in segnet_basic(num_classes=11).parameters())
    assert 29.3e6 < n_segnet < 29.6e6  # Table 6: 29.45 M
    # SegNet-Basic: 4 x 64 7x7 filters in the encoder (3 -> 64 first) and decoder, BN, 1x1 classifier.
    conv = 64 * 64 * 49
    assert n_basic == (3 * 64 * 49 + 3 * conv) + 4 * conv + 8 * 2 * 64 + (64 * 11 + 11)


def test_segnet_decoder_mirrors_vgg16():
    model = segnet(num_classes=11)
    widths = [
        [(c.in_channels, c.out_channels) for c in s.modules() if isinstance(c, nn.Conv2d)] for s in model.decoder.stages
    ]
    assert widths == [
        [(512, 512)] * 3,
        [(512, 512), (512, 512), (512, 256)],
        [(256, 256), (256, 256), (256, 128)],
        [(128, 128), (128, 64)],
        [(64, 64)],
    ]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.decoder.modules()) == 12
    last = model.head  # conv1_1_D: a 3x3 conv straight to the class scores
    assert isinstance(last, nn.Conv2d) and last.kernel_size == (3, 3) and last.out_channels == 11


def test_segnet_basic_decoder_has_no_relu_and_no_bias():
    model = segnet_basic(num_classes=11)
    assert not any(isinstance(m, nn.ReLU) for m in model.decoder.modules())
    convs = [m for m in model.decoder.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.bias is None and c.kernel_size == (7, 7) for c in convs)
    assert sum(isinstance(m, nn.ReLU) for m in model.encoder.modules()) == 4


def test_single_channel_decoder():
    model = segnet_basic(num_classes=3, encoder_channels=8, decoder_channels=8, single_channel_decoder=True)
    convs = [m for m in model.decoder.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.shape == (8, 1, 7, 7) for c in convs)  # each filter sees one channel
    assert model(torch.randn(1, 3, 21, 22)).shape == (1, 3, 21, 22)
    with pytest.raises(UserError, match="single_channel_decoder"):
        segnet_basic(num_classes=3, decoder_channels=32, single_channel_decoder=True)


def test_decoder_channels():
    model = segnet_basic(num_classes=3, encoder_channels=8, decoder_channels=4, upsample="bilinear")
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 3, 16, 16)
    assert model.head.in_channels == 4
    with pytest.raises(UserError, match="per channel"):
        segnet_basic(num_classes=3, encoder_channels=8, decoder_channels=4)  # indices are per channel


def test_weights_backbone_loads_vgg16_bn(tmp_path):
    torch.manual_seed(0)
    features = make_layers([v if v == "M" else v // 16 for v in cfgs["D"]], batch_norm=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "vgg16_bn.pth")
    model = segnet(num_classes=3, width_div=16, weights_backbone=tmp_path / "vgg16_bn.pth")
    for key, value in features.state_dict().items():
        torch.testing.assert_close(model.encoder.features.state_dict()[key], value, rtol=0, atol=0)
