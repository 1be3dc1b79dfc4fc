"""VGG-16 encoders: torchvision key compatibility, pooling indices, DeepLab and FCN geometries."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torchvision.models.vgg import cfgs, make_layers

from pixelwise.encoders import VGGEncoder, vgg16_classifier
from pixelwise.errors import UserError


def _torchvision_features(batch_norm: bool, width_div: int = 1) -> nn.Sequential:
    """torchvision's own VGG-16 ``features`` with random weights (and random BN statistics)."""
    torch.manual_seed(0)
    cfg = [v if v == "M" else v // width_div for v in cfgs["D"]]
    features = make_layers(cfg, batch_norm=batch_norm)
    for m in features.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias)
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return features.eval()


@pytest.mark.parametrize(("batch_norm", "width_div"), [(False, 1), (True, 4)])
def test_torchvision_file_loads_by_key_and_pool5_matches(tmp_path, batch_norm, width_div):
    features = _torchvision_features(batch_norm, width_div)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.6.weight"] = torch.zeros(10, 4096)  # a classifier key the encoder ignores
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)

    encoder = VGGEncoder(batch_norm=batch_norm, width_div=width_div, weights=path).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = encoder(x)
        expected = features(x)
    assert [f.shape[1] * width_div for f in feats] == [64, 128, 256, 512, 512]
    assert [f.shape[1] for f in feats] == encoder.out_channels
    assert [x.shape[-1] // f.shape[-1] for f in feats] == encoder.strides == [2, 4, 8, 16, 32]
    torch.testing.assert_close(feats[-1], expected, rtol=1e-5, atol=1e-5)


def test_older_file_without_num_batches_tracked_loads(tmp_path):
    features = _torchvision_features(True, width_div=16)
    state = {f"features.{k}": v for k, v in features.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "old.pth")
    encoder = VGGEncoder(batch_norm=True, width_div=16, weights=tmp_path / "old.pth").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x)[-1], features(x))


def test_weights_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(UserError, match="no such weights file"):
        VGGEncoder(weights=tmp_path / "absent.pth")
    bn = {f"features.{k}": v for k, v in _torchvision_features(True, width_div=16).state_dict().items()}
    torch.save(bn, tmp_path / "bn.pth")
    with pytest.raises(UserError, match=r"bn\.pth: does not fit.*batch_norm=False"):
        VGGEncoder(width_div=16, weights=tmp_path / "bn.pth")  # a VGG-16-BN file into plain VGG-16
    with pytest.raises(UserError, match="shape mismatch"):
        VGGEncoder(batch_norm=True, width_div=8, weights=tmp_path / "bn.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        VGGEncoder(weights=tmp_path / "junk.pth")


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="output_stride=16"):
        VGGEncoder(output_stride=16)
    with pytest.raises(UserError, match="width_div=3"):
        VGGEncoder(width_div=3)


def test_indices_point_at_the_maxima_and_sizes_are_pre_pool_sizes():
    torch.manual_seed(0)
    encoder = VGGEncoder(batch_norm=True, return_indices=True, ceil_mode=True, width_div=16).eval()
    pool_inputs = []
    for i in encoder._pools:
        encoder.features[i].register_forward_pre_hook(lambda m, args: pool_inputs.append(args[0]))
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        feats = encoder(x)
    indices, sizes = feats.indices, feats.sizes
    assert sizes == [(45, 61), (23, 31), (12, 16), (6, 8), (3, 4)]
    assert [tuple(f.shape[-2:]) for f in feats] == [(23, 31), (12, 16), (6, 8), (3, 4), (2, 2)]
    for before, f, idx, size in zip(pool_inputs, feats, indices, sizes, strict=True):
        assert tuple(before.shape[-2:]) == size
        assert idx.shape == f.shape
        picked = before.flatten(2).gather(2, idx.flatten(2)).view_as(f)  # the pre-pool value at each index
        torch.testing.assert_close(picked, f, rtol=0, atol=0)


def test_output_stride_8_deeplab_geometry():
    encoder = VGGEncoder(output_stride=8, pool_kernel=3, ceil_mode=True, width_div=16)
    feats = encoder(torch.randn(1, 3, 321, 321))
    # DeepLab-LargeFOV's prototxt comment: 321 -> 161, 81, 41, 41, 41 (pool4/pool5 have stride 1).
    assert [f.shape[-1] for f in feats] == [161, 81, 41, 41, 41]
    assert encoder.strides == [2, 4, 8, 8, 8]
    pools = [encoder.features[i] for i in encoder._pools]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [(3, 2, 1)] * 3 + [(3, 1, 1)] * 2
    conv5 = [m for m in encoder.features[encoder._pools[3] :] if isinstance(m, nn.Conv2d)]
    assert len(conv5) == 3 and all(c.dilation == (2, 2) and c.padding == (2, 2) for c in conv5)
    # With VGG's 2x2 pools for pool1-3 the stride is 8 as well.
    plain = VGGEncoder(output_stride=8, width_div=16)
    assert [f.shape[-1] for f in plain(torch.randn(1, 3, 64, 64))] == [32, 16, 8, 8, 8]


def test_fcn_padding_100_geometry():
    encoder = VGGEncoder(conv1_padding=100, ceil_mode=True, width_div=16)
    feats = encoder(torch.randn(1, 3, 1, 1))
    # conv1_1 gives 199, pools round up: 100, 50, 25, 13, 7 -- room for fc6's 7x7 on a 1-pixel image.
    assert [f.shape[-1] for f in feats] == [100, 50, 25, 13, 7]


def test_classifier_loads_fc6_fc7_from_torchvision_keys(tmp_path):
    torch.manual_seed(0)
    reference = vgg16_classifier(width_div=16, fc_channels=512)
    state = {f"classifier.{k}": v for k, v in reference.state_dict().items()}
    state["classifier.6.weight"] = torch.zeros(1000, 32)  # fc8 is not part of it
    torch.save(state, tmp_path / "vgg.pth")
    loaded = vgg16_classifier(width_div=16, fc_channels=512, weights=tmp_path / "vgg.pth").eval()
    x = torch.randn(2, 32 * 7 * 7)
    torch.testing.assert_close(loaded(x), reference.eval()(x))
    assert loaded[0].weight.shape == (32, 32 * 7 * 7) and loaded[3].weight.shape == (32, 32)
