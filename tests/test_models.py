"""Every model in MODELS: logits at input size, backward, no NaN; the builder contract; one anatomy
(encoder, decoder, head) with one encoder contract, freezing and per-part learning rates."""

import inspect

import pytest
import torch
import torch.nn as nn

from pixelwise.config import load_config
from pixelwise.encoders import Features
from pixelwise.engine.parts import build_optimizer
from pixelwise.errors import ArgumentError
from pixelwise.models import MODELS, get_model
from pixelwise.models.anatomy import current_key

# Tiny widths where the design allows them; ResNet/VGG-LargeFOV models run at full width on a small input.
TINY = {
    "fcn32s": {"width_div": 16, "fc_channels": 32},
    "fcn16s": {"width_div": 16, "fc_channels": 32},
    "fcn8s": {"width_div": 16, "fc_channels": 32},
    "segnet": {"width_div": 16},
    "segnet_basic": {"encoder_channels": 8, "decoder_channels": 8},
    "fcn_basic": {"encoder_channels": 8},
    "unet": {"base_channels": 4, "padding": "same"},
    # the smallest members of three timm families (the timm extra); defaults are resnet34/resnet50
    "unet_timm": {"encoder": "resnet18", "decoder_channels": (16, 8, 8, 8, 8)},
    "fcn_timm": {"encoder": "efficientnet_b0"},
    "deeplabv3_timm": {"encoder": "convnext_atto"},
    "deeplabv3plus_timm": {"encoder": "efficientnet_b0"},
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
    head = list(model.head.children()) or [model.head]  # train.head_lr_mult's layers: they output class scores
    submodules = {id(m) for m in model.modules()}
    assert head and all(id(layer) in submodules for layer in head)
    assert all(any(isinstance(m, torch.nn.Conv2d) and m.out_channels == 5 for m in layer.modules()) for layer in head)
    x = torch.randn(2, 3, 35, 47)  # odd sizes on purpose: every model must return logits at input size
    model.train()
    out = model(x)
    assert isinstance(out, torch.Tensor)  # built without an auxiliary head: one tensor in training too
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


def _meta_model(name: str, **kwargs) -> nn.Module:
    """`name` at tiny width where it has one, built on the meta device (shapes, no memory, no time)."""
    with torch.device("meta"):
        return get_model(name, num_classes=5, **TINY.get(name, {}), **kwargs)


@pytest.mark.parametrize("name", list(MODELS))
def test_encoder_decoder_head_partition_the_parameters(name):
    model = _meta_model(name)
    parts = [model.encoder, model.decoder, model.head]
    assert all(isinstance(part, nn.Module) for part in parts)
    owner = {}
    for part_name, part in zip(("encoder", "decoder", "head"), parts, strict=True):
        for p in part.parameters():
            assert id(p) not in owner, f"{name}: a parameter in both {owner[id(p)]} and {part_name}"
            owner[id(p)] = part_name
    assert set(owner) == {id(p) for p in model.parameters()}, f"{name}: parameters outside the three parts"
    assert {"encoder", "head"} <= set(owner.values())


# The ResNet-101 models have their ResNet-50 twins' encoder class and wiring: one of each is enough.
@pytest.mark.parametrize("name", [n for n in MODELS if not n.endswith("resnet101")])
def test_every_encoder_returns_features_with_out_channels_and_strides(name):
    encoder = _meta_model(name).encoder
    x = torch.empty(2, 3, 64, 64, device="meta")
    with torch.no_grad():
        feats, again = encoder(x), encoder(x)
    assert isinstance(feats, Features) and isinstance(feats, list)
    assert len(feats) == len(encoder.out_channels) == len(encoder.strides)
    assert [f.shape[1] for f in feats] == list(encoder.out_channels)
    assert list(encoder.strides) == sorted(encoder.strides)  # high to low resolution
    assert (feats.indices is None) == (again.indices is None)  # the same kind of output on every call
    if feats.indices is not None:
        assert len(feats.indices) == len(feats.sizes)


def test_only_the_documented_models_have_an_auxiliary_head():
    """The auxiliary-output convention (pixelwise.models) names the builders that take `aux`."""
    with_aux = {name for name, builder in MODELS.items() if "aux" in inspect.signature(builder).parameters}
    assert with_aux == {
        "fcn_resnet50",
        "fcn_resnet101",
        "deeplabv3_resnet50",
        "deeplabv3_resnet101",
        "fcn_timm",
        "deeplabv3_timm",
    }


@pytest.mark.parametrize("name", list(MODELS))
def test_freeze_encoder_and_per_part_rates_reach_the_optimiser(name):
    model = _meta_model(name)
    cfg = load_config(None, ["train.freeze_encoder=true", "train.head_lr_mult=10", "train.optimizer=sgd"])
    optimizer = build_optimizer(cfg, model)
    in_optimizer = {id(p): g["lr_mult"] for g in optimizer.param_groups for p in g["params"]}
    assert all(not p.requires_grad and id(p) not in in_optimizer for p in model.encoder.parameters())
    assert all(in_optimizer[id(p)] == 10 for p in model.head.parameters())
    assert all(in_optimizer[id(p)] == 1 for p in model.decoder.parameters() if p.requires_grad)

    model = _meta_model(name)
    cfg = load_config(None, ["train.encoder_lr_mult=0.1", "train.head_lr_mult=10", "train.optimizer=sgd"])
    in_optimizer = {id(p): g["lr_mult"] for g in build_optimizer(cfg, model).param_groups for p in g["params"]}
    assert all(in_optimizer[id(p)] == pytest.approx(0.1) for p in model.encoder.parameters())
    assert all(in_optimizer[id(p)] == 10 for p in model.head.parameters())
    assert {id(p) for p in model.parameters() if p.requires_grad} == set(in_optimizer)


# Key names of the module layout before the anatomy (read off that version's state dicts), at least one
# per renamed module: such a state dict must load, strictly, into the same tensors.
OLD_LAYOUT = {
    "fcn8s": [
        "encoder.features.0.weight",
        "fc.0.weight",
        "fc.3.weight",
        "score_fr.bias",
        "score_pool4.weight",
        "upscore2.up.weight",
        "score_pool3.weight",
        "upscore_pool4.up.weight",
        "upscore.up.weight",
    ],
    "segnet": ["encoder.features.0.weight", "decoder.stages.0.0.0.weight", "classifier.weight", "classifier.bias"],
    "segnet_basic": ["encoder.convs.0.0.weight", "decoder.stages.0.0.weight", "classifier.weight"],
    "fcn_basic": [
        "encoder.convs.0.0.weight",
        "decoder.reduce_input.weight",
        "decoder.reduce_skips.2.bias",
        "decoder.ups.0.up.weight",
    ],
    "unet": ["down.0.0.0.weight", "down.4.1.0.bias", "up.0.up.weight", "decode.3.0.0.weight", "head.weight"],
    "deeplab_v1": ["backbone.features.0.weight", "classifier.0.weight", "classifier.3.bias", "classifier.6.weight"],
    "deeplab_v2": ["backbone.conv1.weight", "backbone.layer4.2.bn3.running_var", "classifier.branches.3.0.weight"],
    "deeplabv3plus_resnet50": [
        "backbone.conv1.weight",
        "aspp.convs.0.0.weight",
        "aspp.project.0.weight",
        "decoder.reduce.0.weight",
        "decoder.fuse.1.0.weight",
        "decoder.classifier.weight",
    ],
}


@pytest.mark.parametrize("name", list(OLD_LAYOUT))
def test_state_dicts_of_the_layout_before_the_anatomy_load_into_the_same_tensors(name):
    # full-width models on the meta device: keys and shapes are checked, values cannot be
    device = "cpu" if name in TINY else "meta"
    torch.manual_seed(0)
    with torch.device(device):
        model = get_model(name, num_classes=5, **TINY.get(name, {}))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    to_old = {new: old for old, new in type(model).OLD_KEYS.items()}
    longest_first = sorted(to_old, key=len, reverse=True)

    def old_key(key: str) -> str:
        new = next((n for n in longest_first if key.startswith(n)), "")
        return to_old[new] + key[len(new) :] if new else key

    old_state = {old_key(k): v for k, v in state.items()}
    assert set(OLD_LAYOUT[name]) <= set(old_state)
    assert all(current_key(old, type(model).OLD_KEYS) in state for old in OLD_LAYOUT[name])
    with torch.no_grad():
        for v in model.state_dict().values():
            v.fill_(7)  # forget the values: the load must bring each one back to its own place
    model.load_state_dict(old_state, strict=True)
    if device == "cpu":
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
