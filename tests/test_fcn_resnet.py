"""FCN-ResNet: state-dict and output equality with torchvision, aux-output convention, odd sizes."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models import segmentation as tv_seg

from pixelwise.models.fcn_resnet import FCNResNet, fcn_resnet50, fcn_resnet101

BUILDERS = {
    "fcn_resnet50": (fcn_resnet50, tv_seg.fcn_resnet50),
    "fcn_resnet101": (fcn_resnet101, tv_seg.fcn_resnet101),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_equal_to_torchvision(name: str) -> None:
    ours_fn, tv_fn = BUILDERS[name]
    torch.manual_seed(0)
    tv = tv_fn(weights=None, weights_backbone=None, num_classes=5, aux_loss=True)
    model = ours_fn(num_classes=5, aux=True)
    model.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(1, 3, 65, 65)

    tv.eval(), model.eval()
    with torch.no_grad():
        ref, out = tv(x), model(x)
    assert isinstance(out, torch.Tensor)  # eval: one tensor, aux head unused
    torch.testing.assert_close(out, ref["out"], atol=1e-5, rtol=1e-5)

    # Training mode: (out, aux); same dropout draws in the same order as torchvision (classifier, then aux).
    tv.train(), model.train()
    xb = torch.randn(2, 3, 33, 41)
    torch.manual_seed(1)
    ref = tv(xb)
    torch.manual_seed(1)
    out, aux = model(xb)
    torch.testing.assert_close(out, ref["out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux, ref["aux"], atol=1e-5, rtol=1e-5)


def test_no_aux_keys_match_torchvision_and_param_count() -> None:
    tv = tv_seg.fcn_resnet50(weights=None, weights_backbone=None, num_classes=21)
    model = fcn_resnet50(num_classes=21)
    assert isinstance(model, FCNResNet) and model.aux_classifier is None
    assert set(model.state_dict()) == set(tv.state_dict())
    assert sum(p.numel() for p in model.parameters()) == 32_957_013  # torchvision fcn_resnet50, 21 classes, no aux


@pytest.mark.parametrize("size", [(63, 95), (17, 30)])
def test_odd_sizes_train_and_eval(size: tuple[int, int]) -> None:
    model = fcn_resnet50(num_classes=3, aux=True)
    x = torch.randn(2, 3, *size)
    out, aux = model.train()(x)
    assert out.shape == aux.shape == (2, 3, *size)
    (out.mean() + aux.mean()).backward()
    assert model.aux_classifier[0].weight.grad is not None
    with torch.no_grad():
        y = model.eval()(x)
    assert y.shape == (2, 3, *size) and torch.isfinite(y).all()


def test_weights_backbone_loads_by_key(tmp_path) -> None:
    state = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(state, tmp_path / "resnet50.pth")
    model = fcn_resnet50(num_classes=2, weights_backbone=tmp_path / "resnet50.pth")
    for key in ("conv1.weight", "layer3.5.bn3.running_var", "layer4.0.downsample.0.weight"):
        torch.testing.assert_close(model.state_dict()[f"backbone.{key}"], state[key])
