"""ResNet encoders: torchvision equality, output stride, Multi-Grid, loading ImageNet files by key."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from pixelwise.encoders.resnet import ResNetEncoder
from pixelwise.errors import UserError


def _tv_features(net: torchvision.models.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """torchvision's ResNet run by hand up to layer4, the reference for our features."""
    stem = net.relu(net.bn1(net.conv1(x)))
    c1 = net.layer1(net.maxpool(stem))
    c2 = net.layer2(c1)
    c3 = net.layer3(c2)
    return [stem, c1, c2, c3, net.layer4(c3)]


@pytest.fixture(scope="module")
def tv_resnet50_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    """A torchvision ResNet-50 state dict (with its fc layer, as in the ImageNet files) saved to disk."""
    torch.manual_seed(0)
    state = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet50-test.pth"
    torch.save(state, path)
    return str(path), state


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_features_match_torchvision_and_strides(
    output_stride: int, tv_resnet50_file: tuple[str, dict[str, torch.Tensor]]
) -> None:
    path, state = tv_resnet50_file
    dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}[output_stride]
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=dilate)
    ref.load_state_dict(state)
    enc = ResNetEncoder(depth=50, output_stride=output_stride, weights=path)
    ref.eval(), enc.eval()
    x = torch.randn(1, 3, 65, 47)
    with torch.no_grad():
        feats, expected = enc(x), _tv_features(ref, x)
    assert enc.out_channels == [64, 256, 512, 1024, 2048]
    assert enc.strides == {8: [2, 4, 8, 8, 8], 16: [2, 4, 8, 16, 16], 32: [2, 4, 8, 16, 32]}[output_stride]
    assert len(feats) == 5
    for f, e, c, s in zip(feats, expected, enc.out_channels, enc.strides, strict=True):
        assert f.shape == (1, c, math.ceil(65 / s), math.ceil(47 / s))
        torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-5)


def test_keys_are_torchvision_backbone_keys() -> None:
    enc = ResNetEncoder(depth=101)
    tv_keys = {k for k in torchvision.models.resnet101(weights=None).state_dict() if not k.startswith("fc.")}
    assert set(enc.state_dict()) == tv_keys
    assert sum(p.numel() for p in enc.parameters()) == 42_500_160  # ResNet-101 without fc: 44,549,160 - 2,049,000


@pytest.mark.parametrize(
    ("output_stride", "multigrid", "expected"),
    [
        (8, None, [2, 4, 4]),  # torchvision: first block at the previous dilation
        (16, None, [1, 2, 2]),
        (32, None, [1, 1, 1]),
        (16, (1, 2, 4), [2, 4, 8]),  # DeepLabv3 Sec. 4.1: rate 2 x (1, 2, 4)
        (8, (1, 2, 4), [4, 8, 16]),
        (32, (1, 2, 4), [1, 2, 4]),
    ],
)
def test_layer4_dilations(output_stride: int, multigrid: tuple[int, ...] | None, expected: list[int]) -> None:
    enc = ResNetEncoder(depth=50, output_stride=output_stride, multigrid=multigrid)
    convs = [block.conv2 for block in enc.layer4]
    assert [c.dilation[0] for c in convs] == expected
    assert [c.padding[0] for c in convs] == expected  # 'same' padding keeps the stride-s map size
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert enc.eval()(x)[-1].shape[-2:] == (math.ceil(40 / output_stride),) * 2


def test_multigrid_changes_only_dilation() -> None:
    a = ResNetEncoder(depth=50, output_stride=16).eval()
    b = ResNetEncoder(depth=50, output_stride=16, multigrid=(1, 2, 4)).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 3, 97, 97)
    with torch.no_grad():
        fa, fb = a(x), b(x)
    torch.testing.assert_close(fa[3], fb[3])  # layer3 untouched
    assert not torch.allclose(fa[4], fb[4])  # layer4 sees a different context


def test_weights_file_errors(tmp_path, tv_resnet50_file) -> None:
    with pytest.raises(UserError, match="no such weights file"):
        ResNetEncoder(depth=50, weights=tmp_path / "nope.pth")

    path = tmp_path / "wrong.pth"
    torch.save({"head.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match=r"missing conv1.weight, bn1.weight, bn1.bias ...; unexpected head.weight"):
        ResNetEncoder(depth=50, weights=path)

    with pytest.raises(UserError, match=r"missing layer3.6.conv1.weight"):  # a ResNet-50 file given to ResNet-101
        ResNetEncoder(depth=101, weights=tv_resnet50_file[0])

    path = tmp_path / "shape.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(UserError, match=r"shape mismatch conv1.weight \(64, 3, 3, 3\) vs \(64, 3, 7, 7\)"):
        ResNetEncoder(depth=50, weights=path)

    path = tmp_path / "list.pth"
    torch.save([1, 2], path)
    with pytest.raises(UserError, match="not a state dict"):
        ResNetEncoder(depth=50, weights=path)

    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read"):
        ResNetEncoder(depth=50, weights=path)


def test_weights_without_fc_load(tmp_path, tv_resnet50_file) -> None:
    _, state = tv_resnet50_file
    path = tmp_path / "backbone-only.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, path)
    enc = ResNetEncoder(depth=50, weights=path)
    torch.testing.assert_close(enc.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 34}, "depth=34"),
        ({"output_stride": 4}, "output_stride=4"),
        ({"multigrid": (1, 2)}, r"multigrid=\(1, 2\)"),
        ({"multigrid": (0, 1, 1)}, r"multigrid=\(0, 1, 1\)"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        ResNetEncoder(**kwargs)
