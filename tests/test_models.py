"""Every model in MODELS: logits at input size, backward, no NaN; the builder contract."""

import inspect

import pytest
import torch

from pixelwise.errors import ArgumentError
from pixelwise.models import MODELS, get_model

# Tiny widths where the design allows them; ResNet/VGG-LargeFOV models run at full width on a small input.
TINY = {
    "fcn32s": {"width_div": 16, "fc_channels": 32},
    "fcn16s": {"width_div": 16, "fc_channels": 32},
    "fcn8s": {"width_div": 16, "fc_channels": 32},
    "segnet": {"width_div": 16},
    "segnet_basic": {"encoder_channels": 8, "decoder_channels": 8},
    "fcn_basic": {"encoder_channels": 8},
    "unet": {"base_channels": 4, "padding": "same"},
}


def test_every_builder_is_keyword_only_and_takes_num_classes():
    for name, builder in MODELS.items():
        params = inspect.signature(builder).parameters
        assert "num_classes" in params, name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values()), name


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_backward_shape_no_nan(name):
    torch.manual_seed(0)
    model = get_model(name, num_classes=5, **TINY.get(name, {}))
    head = model.classifier_layers()  # what train.head_lr_mult applies to: layers that output class scores
    submodules = {id(m) for m in model.modules()}
    assert head and all(id(layer) in submodules for layer in head)
    assert all(any(isinstance(m, torch.nn.Conv2d) and m.out_channels == 5 for m in layer.modules()) for layer in head)
    x = torch.randn(2, 3, 35, 47)  # odd sizes on purpose: every model must return logits at input size
    model.train()
    out = model(x)
    assert out.shape == (2, 5, 35, 47)
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()  # a random linear loss: FCN starts with zero scores
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    model.eval()
    with torch.no_grad():
        y = model(x[:1])
    assert y.shape == (1, 5, 35, 47) and torch.isfinite(y).all()


def test_unknown_model_and_bad_kwarg_are_argument_errors():
    with pytest.raises(ArgumentError, match="did you mean 'segnet'") as info:
        get_model("segnett", num_classes=3)
    assert info.value.argument == "name"
    with pytest.raises(ArgumentError, match="unet") as info:
        get_model("unet", num_classes=3, no_such_option=1)
    assert info.value.argument == "kwargs" and "no_such_option" in str(info.value)


def test_a_bug_inside_a_builder_keeps_its_traceback(monkeypatch):
    def broken(*, num_classes: int):
        return len(num_classes)  # TypeError: a bug, not a user's mistake

    monkeypatch.setitem(MODELS, "broken", broken)
    with pytest.raises(TypeError, match="has no len"):
        get_model("broken", num_classes=3)


def test_flop_count_matches_hand_count_for_a_plain_conv_stack():
    from pixelwise.models.summary import count_flops

    # segnet_basic at 64x64: the encoder/decoder convs dominate; check against the hand formula
    # 2 * Cin * Cout * k * k * H * W summed over the conv layers (norm, pool, unpool add no matmul FLOPs).
    k, c, n = 7, 64, 5
    sizes = [64, 32, 16, 8]
    enc = sum(2 * (3 if i == 0 else c) * c * k * k * s * s for i, s in enumerate(sizes))
    dec = sum(2 * c * c * k * k * s * s for s in reversed(sizes))
    classifier = 2 * c * n * 64 * 64
    assert count_flops("segnet_basic", n, 64) == enc + dec + classifier
