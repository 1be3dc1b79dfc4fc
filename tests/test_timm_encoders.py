"""timm encoders behind pixelwise's encoder contract, offline with random initialisation, on three families
(ResNet, ConvNeXt, EfficientNet): logits at any input size, a training step, ONNX export that matches
PyTorch, a local weights_backbone file, the strides the models read, and one-line errors."""

from __future__ import annotations

import pytest
import torch

from pixelwise.encoders import TimmEncoder
from pixelwise.errors import UserError
from pixelwise.models import get_model

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FAMILIES = ["resnet18", "convnext_atto", "efficientnet_b0"]
TINY_UNET = {"decoder_channels": (16, 8, 8, 8, 8)}
BUILDERS = {
    "unet_timm": TINY_UNET,
    "fcn_timm": {"aux": True},
    "deeplabv3_timm": {"output_stride": 16},
    "deeplabv3plus_timm": {"output_stride": 8},
}


@pytest.mark.parametrize("encoder", FAMILIES)
def test_every_timm_model_gives_logits_at_an_odd_input_size_and_trains(encoder):
    torch.manual_seed(0)
    for name, kwargs in BUILDERS.items():
        model = get_model(name, num_classes=4, encoder=encoder, **kwargs)
        assert type(model.encoder) is TimmEncoder
        x = torch.randn(2, 3, 37, 51)  # not a multiple of any stride: padded to 64x64 inside, cropped back
        model.train()
        out = model(x)
        main = out[0] if isinstance(out, tuple) else out  # fcn_timm with aux: (out, aux) in training
        assert main.shape == (2, 4, 37, 51) and torch.isfinite(main).all(), name
        if name == "fcn_timm":
            assert out[1].shape == (2, 4, 37, 51)
        # a training step: gradients reach the encoder, and the optimiser changes it
        target = torch.randint(0, 4, (2, 37, 51))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.0)
        loss = torch.nn.functional.cross_entropy(main, target)
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters()), name
        before = [p.detach().clone() for p in model.encoder.parameters()]
        optimizer.step()
        assert any(not torch.equal(b, p) for b, p in zip(before, model.encoder.parameters(), strict=True)), name
        model.eval()
        with torch.no_grad():
            y = model(x)
        assert y.shape == (2, 4, 37, 51) and torch.isfinite(y).all(), name


def test_padding_makes_the_maps_exact_and_the_crop_keeps_the_input_region():
    torch.manual_seed(0)
    model = get_model("unet_timm", num_classes=3, encoder="convnext_atto", **TINY_UNET).eval()
    x = torch.randn(1, 3, 64, 96)  # already a multiple of 32: no padding at all
    with torch.no_grad():
        whole = model(x)
        feats = model.encoder(x)
        # an odd crop of the same image is padded with zeros: the logits are those of the padded image
        padded = torch.nn.functional.pad(x[..., :45, :70], (0, 96 - 70, 0, 64 - 45))
        assert torch.equal(model(x[..., :45, :70]), model(padded)[..., :45, :70])
    assert [f.shape[-2:] for f in feats] == [(64 // s, 96 // s) for s in model.encoder.strides]
    assert model.encoder.strides == [4, 8, 16, 32] and whole.shape == (1, 3, 64, 96)


@pytest.mark.parametrize(
    ("encoder", "name"),
    [("resnet18", "unet_timm"), ("convnext_atto", "deeplabv3plus_timm"), ("efficientnet_b0", "fcn_timm")],
)
def test_timm_models_export_to_onnx_matching_pytorch(tmp_path, encoder, name):
    pytest.importorskip("onnxruntime")
    from pixelwise.export import export_onnx

    torch.manual_seed(0)
    model = get_model(name, num_classes=3, encoder=encoder, **BUILDERS[name]).eval()
    result = export_onnx(model, tmp_path / "m.onnx", size=(64, 64))  # checked by onnxruntime at a second size
    print(encoder, name, result)  # the exporter and dynamic dimensions, for -s runs
    assert result.max_rel_error is not None and result.max_rel_error < 1e-3
    assert set(result.dynamic_dims) == {"batch", "height", "width"}  # any input size: the padding exports too


def test_weights_backbone_loads_a_local_timm_state_dict(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("convnext_atto")
    torch.save(reference.state_dict(), tmp_path / "convnext_atto.pth")
    model = get_model(
        "deeplabv3plus_timm",
        num_classes=2,
        encoder="convnext_atto",
        weights_backbone=str(tmp_path / "convnext_atto.pth"),
    )
    stem = reference.state_dict()["stem.0.weight"]
    assert any(torch.equal(p, stem) for p in model.encoder.parameters())
    last = reference.state_dict()["stages.3.blocks.1.conv_dw.weight"]
    assert any(torch.equal(p, last) for p in model.encoder.parameters())
    assert model.builder == ("deeplabv3plus_timm", {"num_classes": 2, "encoder": "convnext_atto"})  # no file recorded


def test_the_encoder_contract_and_output_stride():
    encoder = TimmEncoder("efficientnet_b0", output_stride=8)
    feats = encoder(torch.randn(1, 3, 64, 64))
    assert encoder.strides == [2, 4, 8, 8, 8] and encoder.out_channels == [16, 24, 40, 112, 320]
    assert [f.shape[1] for f in feats] == encoder.out_channels
    assert [f.shape[-1] for f in feats] == [64 // s for s in encoder.strides]


@pytest.mark.parametrize(
    ("build", "needles"),
    [
        (lambda: TimmEncoder("resnet_18"), ["encoder='resnet_18' is not a timm model; did you mean 'resnet18'?"]),
        (
            lambda: TimmEncoder("densenet121", output_stride=8),
            ["encoder='densenet121' (output_stride=8): timm cannot build it", "choose output_stride=32"],
        ),
        (lambda: TimmEncoder("resnet18", output_stride=4), ["output_stride=4 is not supported; choose 8, 16 or 32"]),
        (lambda: TimmEncoder("resnet18", weights="/nonexistent.pth"), ["weights_backbone=/nonexistent.pth: no such"]),
        (
            lambda: get_model("unet_timm", num_classes=2, encoder="resnet18", decoder_channels=(8, 8)),
            ["decoder_channels=(8, 8): give one width per x2 step from the encoder's deepest stride 32 to 1 (5"],
        ),
        (
            lambda: get_model("unet_timm", num_classes=2, upsample="max_unpool"),
            ["unet_timm upsample='max_unpool' is not supported"],
        ),
        (
            lambda: get_model("deeplabv3plus_timm", num_classes=2, encoder="test_vit", output_stride=16),
            ["encoder='test_vit' (output_stride=16): timm cannot build it"],
        ),
    ],
)
def test_errors_name_the_argument_and_the_way_out(build, needles):
    with pytest.raises(UserError) as e:
        build()
    assert "\n" not in str(e.value)
    for needle in needles:
        assert needle in str(e.value)


def test_a_weights_file_of_another_model_names_weights_backbone(tmp_path):
    torch.save(timm.create_model("efficientnet_b0").state_dict(), tmp_path / "other.pth")
    with pytest.raises(UserError, match=r"weights_backbone=.*other.pth: does not load into timm's 'convnext_atto'"):
        TimmEncoder("convnext_atto", weights=tmp_path / "other.pth")


def test_a_timm_model_round_trips_through_save_pretrained(tmp_path):
    pytest.importorskip("huggingface_hub")
    from pixelwise.models import from_pretrained

    torch.manual_seed(0)
    model = get_model("deeplabv3plus_timm", num_classes=2, encoder="efficientnet_b0").eval()
    model.save_pretrained(tmp_path / "m")
    x = torch.randn(1, 3, 41, 29)
    with torch.no_grad():
        assert torch.equal(model(x), from_pretrained(tmp_path / "m")(x))


def test_models_encoders_lists_what_builds(capsys, monkeypatch):
    from pixelwise.cli import main

    assert main(["models", "--encoders"]) == 0
    out = capsys.readouterr().out
    assert "resnet50, resnet101" in out
    for name in FAMILIES:
        assert f"\n  {name} " in out
    assert "\n  convnext_atto               40,80,160,320               4,8,16,32           32, 16, 8\n" in out
    assert main(["models", "--encoders", "densenet12*"]) == 0
    out = capsys.readouterr().out
    assert "densenet121" in out and "\n  densenet121 " in out and "32\n" in out  # no atrous output stride

    import sys

    monkeypatch.setitem(sys.modules, "timm", None)
    assert main(["models", "--encoders"]) == 0
    assert "(timm is not installed: pip install 'pixelwise[timm]')" in capsys.readouterr().out
    assert main(["models", "--no-flops"]) == 0
    assert (
        "unet_timm                   needs the package 'timm': pip install 'pixelwise[timm]'" in capsys.readouterr().out
    )
