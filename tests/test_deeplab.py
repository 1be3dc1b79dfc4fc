"""DeepLab v1/v2/v3/v3+: torchvision equality, output-stride wiring, shapes, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torchvision.models import segmentation as tv_seg
from torchvision.models._utils import IntermediateLayerGetter

from pixelwise.errors import UserError
from pixelwise.layers import SeparableConv2d
from pixelwise.models.deeplab import (
    DeepLabV3,
    DeepLabV3Plus,
    deeplab_v1,
    deeplab_v2,
    deeplabv3_resnet50,
    deeplabv3_resnet101,
    deeplabv3plus_resnet50,
    deeplabv3plus_resnet101,
)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _assert_equal_train_and_eval(model: torch.nn.Module, tv: torch.nn.Module) -> None:
    """Eval: our tensor == torchvision's ["out"]; train: our (out, aux) == its ["out"], ["aux"]."""
    tv.eval(), model.eval()
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        ref, out = tv(x), model(x)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, ref["out"], atol=1e-5, rtol=1e-5)
    tv.train(), model.train()
    xb = torch.randn(2, 3, 33, 41)
    torch.manual_seed(1)  # same dropout draws, drawn in the same order (classifier, then aux)
    ref = tv(xb)
    torch.manual_seed(1)
    out, aux = model(xb)
    torch.testing.assert_close(out, ref["out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux, ref["aux"], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- v3
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(deeplabv3_resnet50, tv_seg.deeplabv3_resnet50), (deeplabv3_resnet101, tv_seg.deeplabv3_resnet101)],
)
def test_deeplabv3_equals_torchvision(ours, theirs) -> None:
    torch.manual_seed(0)
    tv = theirs(weights=None, weights_backbone=None, num_classes=4, aux_loss=True)
    model = ours(num_classes=4, aux=True)
    model.load_state_dict(tv.state_dict(), strict=True)
    _assert_equal_train_and_eval(model, tv)


def test_deeplabv3_param_count_matches_torchvision_meta() -> None:
    # torchvision's COCO weights meta: 42,004,074 parameters with aux and 21 classes.
    assert _n_params(deeplabv3_resnet50(num_classes=21, aux=True)) == 42_004_074


def test_deeplabv3_output_stride_16_equals_torchvision_assembly() -> None:
    """torchvision has no OS-16 builder; assemble one from its parts (rates 6/12/18) and compare."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, True])
    backbone = IntermediateLayerGetter(resnet, return_layers={"layer4": "out", "layer3": "aux"})
    head = tv_seg.deeplabv3.DeepLabHead(2048, 3, atrous_rates=(6, 12, 18))
    tv = tv_seg.DeepLabV3(backbone, head, tv_seg.fcn.FCNHead(1024, 3))
    model = deeplabv3_resnet50(num_classes=3, output_stride=16, aux=True)
    model.load_state_dict(tv.state_dict(), strict=True)
    _assert_equal_train_and_eval(model, tv)


@pytest.mark.parametrize(
    ("output_stride", "multigrid", "aspp", "layer4"),
    [
        (8, False, [12, 24, 36], [2, 4, 4]),
        (16, False, [6, 12, 18], [1, 2, 2]),
        (16, True, [6, 12, 18], [2, 4, 8]),
        (8, True, [12, 24, 36], [4, 8, 16]),
    ],
)
def test_deeplabv3_rates_wiring(output_stride: int, multigrid: bool, aspp: list[int], layer4: list[int]) -> None:
    model = deeplabv3_resnet50(num_classes=2, output_stride=output_stride, multigrid=multigrid)
    assert isinstance(model, DeepLabV3)
    aspp_module = model.classifier[0]
    assert [branch[0].dilation[0] for branch in aspp_module.convs[1:4]] == aspp
    assert [block.conv2.dilation[0] for block in model.backbone.layer4] == layer4
    seen = []
    model.classifier.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 63, 95)).shape == (1, 2, 63, 95)
    assert seen == [(1, 2048, math.ceil(63 / output_stride), math.ceil(95 / output_stride))]


def test_bad_output_stride() -> None:
    with pytest.raises(UserError, match="output_stride=32"):
        deeplabv3_resnet50(num_classes=2, output_stride=32)


# --------------------------------------------------------------------------------------------- v3+
@pytest.mark.parametrize(("output_stride", "size"), [(16, (63, 95)), (8, (33, 47))])
def test_deeplabv3plus_shapes_and_wiring(output_stride: int, size: tuple[int, int]) -> None:
    model = deeplabv3plus_resnet50(num_classes=5, output_stride=output_stride)
    aspp = [branch[0].dilation[0] for branch in model.decoder.aspp.convs[1:4]]
    assert aspp == ([6, 12, 18] if output_stride == 16 else [12, 24, 36])
    seen = {}
    model.decoder.aspp.register_forward_pre_hook(lambda m, args: seen.update(aspp=args[0].shape))
    # what the decoder proper reads: the ASPP output and the low-level features its 1x1 conv reduces
    model.decoder.aspp.register_forward_hook(lambda m, args, out: seen.update(decoder=[out.shape]))
    model.decoder.reduce.register_forward_pre_hook(lambda m, args: seen["decoder"].append(args[0].shape))
    x = torch.randn(2, 3, *size)
    out = model.train()(x)
    assert out.shape == (2, 5, *size)
    os_h, os_w = (math.ceil(s / output_stride) for s in size)
    assert seen["aspp"] == (2, 2048, os_h, os_w)
    # the decoder reads the ASPP output and layer1's stride-4 features (256 ch), reduced to 48
    assert seen["decoder"] == [(2, 256, os_h, os_w), (2, 256, math.ceil(size[0] / 4), math.ceil(size[1] / 4))]
    assert model.decoder.reduce[0].out_channels == 48
    out.square().mean().backward()
    assert model.decoder.reduce[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        y = model.eval()(x[:1])
    assert y.shape == (1, 5, *size) and torch.isfinite(y).all()


def test_deeplabv3plus_param_counts() -> None:
    # the default, the paper's ResNet decoder: these counts predate the separable option
    # ResNet-50 without fc 23,508,032 + ASPP 15,535,104 + decoder (12,384 + 700,928 + 590,336 + 5,397)
    model = deeplabv3plus_resnet50(num_classes=21)
    assert _n_params(model) == 40_352_181
    assert all(m.groups == 1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))  # no depthwise conv
    # ResNet-101 without fc: 42,500,160 (19 more bottlenecks in layer3)
    assert _n_params(deeplabv3plus_resnet101(num_classes=21)) == 40_352_181 - 23_508_032 + 42_500_160


# ASPP with separable atrous branches: 1x1 and pooling branches 2 * (2048*256 + 512), three branches
# 3 * (2048*9 + 2048*256 + 512), projection 1280*256 + 512
SEPARABLE_ASPP = 2 * 524_800 + 3 * 543_232 + 328_192  # 3,007,488
# separable 3x3 after ASPP 256*9 + 256*256 + 512, reduction 256*48 + 96, one separable 3x3 fusing
# 304*9 + 304*256 + 512, head 256*21 + 21
SEPARABLE_DECODER_AND_HEAD = 68_352 + 12_384 + 81_072 + 5_397


def test_deeplabv3plus_separable_param_counts() -> None:
    separable = deeplabv3plus_resnet50(num_classes=21, separable=True)
    assert _n_params(separable) == 23_508_032 + SEPARABLE_ASPP + SEPARABLE_DECODER_AND_HEAD == 26_682_725
    assert _n_params(deeplabv3plus_resnet101(num_classes=21, separable=True)) == (
        42_500_160 + SEPARABLE_ASPP + SEPARABLE_DECODER_AND_HEAD
    )
    separables = [m for m in separable.modules() if isinstance(m, SeparableConv2d)]
    assert [m.depthwise.dilation[0] for m in separables] == [6, 12, 18, 1, 1]  # 3 ASPP branches, 2 in the decoder
    assert sum(isinstance(m, SeparableConv2d) for m in separable.encoder.modules()) == 0


@pytest.mark.parametrize("depth", [50, 101])
def test_deeplabv3plus_separable_has_smps_layout(depth: int) -> None:
    """Same parameter count, the same parameter and buffer shapes and the same FLOPs as smp's DeepLabV3Plus."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    from pixelwise.models.summary import flops_of

    builder = deeplabv3plus_resnet50 if depth == 50 else deeplabv3plus_resnet101
    with torch.device("meta"):  # shapes and FLOPs only: no memory, no time
        ours = builder(num_classes=11, separable=True).eval()
        peer = smp.DeepLabV3Plus(
            encoder_name=f"resnet{depth}",
            encoder_weights=None,
            encoder_output_stride=16,
            decoder_atrous_rates=(6, 12, 18),
            classes=11,
        ).eval()
        x = torch.zeros(1, 3, 64, 96)  # smp needs multiples of 16
    assert _n_params(ours) == _n_params(peer)

    def shapes(tensors) -> list[tuple[int, ...]]:
        return sorted(tuple(t.shape) for t in tensors)

    assert shapes(ours.parameters()) == shapes(peer.parameters())
    assert shapes(ours.buffers()) == shapes(peer.buffers())
    with torch.no_grad():
        assert flops_of(lambda: ours(x)) == flops_of(lambda: peer(x))


def test_deeplabv3plus_separable_shapes_and_backward() -> None:
    torch.manual_seed(0)
    model = deeplabv3plus_resnet50(num_classes=5, separable=True)
    assert isinstance(model, DeepLabV3Plus)
    seen = {}
    model.decoder.fuse.register_forward_pre_hook(lambda m, args: seen.update(fuse=args[0].shape))
    x = torch.randn(2, 3, 63, 95)  # not a multiple of 16: the decoder upsamples to the stride-4 size
    out = model.train()(x)
    assert out.shape == (2, 5, 63, 95)
    assert seen["fuse"] == (2, 256 + 48, 16, 24)
    out.square().mean().backward()
    for m in model.decoder.modules():
        if isinstance(m, SeparableConv2d):
            assert m.depthwise.weight.grad.abs().sum() > 0 and m.pointwise.weight.grad.abs().sum() > 0
    with torch.no_grad():
        y = model.eval()(x[:1])
    assert y.shape == (1, 5, 63, 95) and torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------- v2
def test_deeplab_v2_sums_four_atrous_branches() -> None:
    model = deeplab_v2(num_classes=3).eval()
    branches = model.head.branches
    assert [b[0].dilation[0] for b in branches] == [6, 12, 18, 24]
    assert [block.conv2.dilation[0] for block in model.encoder.layer4] == [2, 4, 4]  # output stride 8
    # ResNet-101 without fc + four 3x3 convs 2048 -> 3 with bias
    assert _n_params(model) == 42_500_160 + 4 * (2048 * 9 * 3 + 3)
    x = torch.randn(1, 3, 41, 57)
    with torch.no_grad():
        feats = model.encoder(x)[-1]  # (1, 2048, 6, 8)
        scores = sum(
            torch.nn.functional.conv2d(feats, b[0].weight, b[0].bias, padding=r, dilation=r)
            for b, r in zip(branches, (6, 12, 18, 24), strict=True)
        )
        expected = torch.nn.functional.interpolate(scores, size=(41, 57), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    y = model.train()(torch.randn(2, 3, 33, 47))
    assert y.shape == (2, 3, 33, 47)


# ---------------------------------------------------------------------------------------------- v1
def test_deeplab_v1_params_and_shapes() -> None:
    model = deeplab_v1(num_classes=21)
    # VGG-16 convs 14,714,688 + fc6 512*1024*9+1024 + fc7 1024*1024+1024 + fc8 1024*21+21: the paper's 20.5 M
    assert _n_params(model) == 14_714_688 + 4_719_616 + 1_049_600 + 21_525 == 20_505_429
    fc6 = model.decoder[0]
    assert (fc6.kernel_size, fc6.dilation, fc6.out_channels) == ((3, 3), (12, 12), 1024)
    seen = []
    model.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    y = model.train()(torch.randn(2, 3, 63, 95))
    assert y.shape == (2, 21, 63, 95)
    # output stride 8, Caffe's 3x3 pad-1 pools rounding up (ceil((H - 1) / 2) + 1): 63 -> 32 -> 17 -> 9
    assert seen == [(2, 512, 9, 13)]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 321, 321)).shape == (1, 21, 321, 321)
    assert seen[-1] == (1, 512, 41, 41)  # the prototxt's 321 -> 41


def _vgg_fc_standin(row_index: bool) -> torch.nn.Sequential:
    """VGG-16's fc6/fc7 shapes with every weight equal to its row (or column) index, memory-free."""
    layers = []
    for n_in, n_out in ((512 * 7 * 7, 4096), (4096, 4096)):
        linear = torch.nn.utils.skip_init(torch.nn.Linear, n_in, n_out)
        index = (
            torch.arange(n_out, dtype=torch.float32)[:, None]
            if row_index
            else torch.arange(n_in, dtype=torch.float32)[None, :]
        )
        linear.weight = torch.nn.Parameter(index.expand(n_out, n_in), requires_grad=False)  # a view, no copy
        linear.bias = torch.nn.Parameter(torch.arange(n_out, dtype=torch.float32), requires_grad=False)
        layers += [linear, torch.nn.ReLU(), torch.nn.Dropout()]
    return torch.nn.Sequential(*layers)


def test_deeplab_v1_fc_decimation() -> None:
    head = deeplab_v1(num_classes=2).decoder  # fc6, fc7
    fc6, fc7 = head[0], head[3]
    head.init_from_vgg16_fc(_vgg_fc_standin(row_index=True))
    assert fc6.weight[5, 7, 1, 2] == 20 and fc7.weight[3, 10, 0, 0] == 12  # every 4th filter
    assert fc6.bias[1023] == 4092 and fc7.bias[1] == 4
    head.init_from_vgg16_fc(_vgg_fc_standin(row_index=False))
    # fc6 weight (out, c, y, x) comes from Linear column c*49 + y*7 + x (C-H-W flattening), taps y, x in {0, 3, 6}
    assert fc6.weight[5, 7, 1, 2] == 7 * 49 + 3 * 7 + 6
    assert fc7.weight[3, 10, 0, 0] == 40
    with pytest.raises(UserError, match="no such weights file"):
        deeplab_v1(num_classes=2, weights_backbone="/nonexistent/vgg16.pth")


# --------------------------------------------------------------------------------- backbone weights
def test_weights_backbone_loads_into_resnet50_models(tmp_path) -> None:
    state = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    for model in (
        deeplabv3_resnet50(num_classes=2, weights_backbone=path),
        deeplabv3plus_resnet50(num_classes=2, weights_backbone=path),
    ):
        for key in ("conv1.weight", "layer2.3.bn2.running_mean", "layer4.2.conv3.weight"):
            torch.testing.assert_close(model.encoder.state_dict()[key], state[key])
    with pytest.raises(UserError, match="resnet101"):
        deeplab_v2(num_classes=2, weights_backbone=path)  # a ResNet-50 file for ResNet-101
