"""ONNX and torch.export: every model in MODELS exports, and onnxruntime equals PyTorch at two input sizes;
max-unpooling (SegNet) and the U-Net crop included; the CLI; atomic writes; one clear error."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from pixelwise.errors import UserError
from pixelwise.export import _compare, _float32_rounding, export_onnx, export_torch
from pixelwise.models import MODELS, get_model
from pixelwise.weights import load_weights

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

# One entry per model: the smallest widths the builders offer. The ResNet-based models and DeepLab v1
# have no width option, so they export at full size (the slow part of this file).
TINY_KWARGS: dict[str, dict] = {
    "fcn32s": {"width_div": 16, "fc_channels": 32},
    "fcn16s": {"width_div": 16, "fc_channels": 32},
    "fcn8s": {"width_div": 16, "fc_channels": 32},
    "fcn_resnet50": {},
    "fcn_resnet101": {},
    "segnet": {"width_div": 16},
    "segnet_basic": {"encoder_channels": 8, "decoder_channels": 8},
    "fcn_basic": {"encoder_channels": 8},
    "unet": {"base_channels": 4, "depth": 3},  # the paper's valid convolutions: mirror padding and skip crops
    "deeplab_v1": {},
    "deeplab_v2": {},
    "deeplabv3_resnet50": {},
    "deeplabv3_resnet101": {},
    "deeplabv3plus_resnet50": {},
    "deeplabv3plus_resnet101": {},
    "unet_timm": {"encoder": "resnet18", "decoder_channels": (16, 8, 8, 8, 8)},  # tests/test_timm_encoders.py
    "fcn_timm": {"encoder": "efficientnet_b0"},
    "deeplabv3_timm": {"encoder": "convnext_atto"},
    "deeplabv3plus_timm": {"encoder": "efficientnet_b0"},
}
FULL_SIZE = {name for name, kw in TINY_KWARGS.items() if not kw}
EXPORT_SIZE = (64, 64)
TEST_SIZES = [(1, 57, 71), (3, 40, 97)]  # (batch, H, W): neither is the export example; odd sizes pad and crop


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, 2))
    yield
    torch.set_num_threads(before)


def tiny_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = get_model(name, num_classes=3, **TINY_KWARGS[name]).eval()
    with torch.no_grad():  # FCN zero-initialises its scoring layers: random values make the check meaningful
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model


def ort_vs_torch(model: nn.Module, path, shapes: list[tuple[int, int, int]]) -> list[tuple[float, float]]:
    """(max |onnxruntime - PyTorch|, max |PyTorch|) for a random input of each (batch, H, W)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    results = []
    for b, h, w in shapes:
        x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            ref = model(x).numpy()
        out = session.run(None, {"image": x.numpy()})[0]
        assert out.shape == ref.shape == (b, 3, h, w)
        results.append((float(np.abs(out - ref).max()), float(np.abs(ref).max())))
    return results


def test_every_model_has_tiny_kwargs():
    assert set(TINY_KWARGS) == set(MODELS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in FULL_SIZE else n for n in MODELS])
def test_onnx_matches_pytorch_at_two_sizes(name, tmp_path):
    model = tiny_model(name)
    path = tmp_path / f"{name}.onnx"
    # the full-size models skip export_onnx's own onnxruntime check (seconds each): the loop below is the check
    result = export_onnx(model, path, size=EXPORT_SIZE, check=name not in FULL_SIZE)
    if name == "unet":
        # the valid U-Net's overlap-tile padding fixes the spatial size: dynamic batch, one file per size
        assert result.dynamic_dims == ("batch",)
        other = tmp_path / "unet_other.onnx"
        assert export_onnx(model, other, size=TEST_SIZES[1][1:]).dynamic_dims == ("batch",)
        runs = [(path, [(3, *EXPORT_SIZE)]), (other, [TEST_SIZES[1]])]
    else:
        assert result.dynamic_dims == ("batch", "height", "width")
        runs = [(path, TEST_SIZES)]
    for file, shapes in runs:
        for shape, (diff, scale) in zip(shapes, ort_vs_torch(model, file, shapes), strict=True):
            # 1e-4 for logits of order 1; random-init deep ResNets reach |logits| ~ 1e3, so it scales with them
            assert diff <= 1e-4 * max(1.0, scale), (name, shape, diff, scale)


def test_onnx_separable_deeplabv3plus_matches_pytorch(tmp_path):
    # the option's depthwise (grouped, dilated) convs, in a full-size ResNet-50 (about 2 s)
    torch.manual_seed(0)
    model = get_model("deeplabv3plus_resnet50", num_classes=3, separable=True).eval()
    path = tmp_path / "separable.onnx"
    assert export_onnx(model, path, size=EXPORT_SIZE, check=False).dynamic_dims == ("batch", "height", "width")
    for shape, (diff, scale) in zip(TEST_SIZES, ort_vs_torch(model, path, TEST_SIZES), strict=True):
        assert diff <= 1e-4 * max(1.0, scale), (shape, diff, scale)


@pytest.mark.parametrize(
    ("name", "dims"), [("segnet", ("batch", "height", "width")), ("fcn8s", ("batch",)), ("unet", ("batch",))]
)
def test_torch_export_program_loads_and_matches(name, dims, tmp_path):
    model = tiny_model(name)
    path = tmp_path / f"{name}.pt2"
    result = export_torch(model, path, size=EXPORT_SIZE, metadata={"model": name})
    assert result.dynamic_dims == dims
    extra = {"pixelwise.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    assert json.loads(extra["pixelwise.json"]) == {"model": name}
    shapes = TEST_SIZES if "height" in dims else [(1, *EXPORT_SIZE), (3, *EXPORT_SIZE)]
    for b, h, w in shapes:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


class Unexportable(nn.Module):
    """An operator ONNX lacks (Bessel J0) and a branch on tensor values that graph capture cannot take."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.special.bessel_j0(self.conv(x))
        return y if y.sum() > 0 else -y


def test_unexportable_model_is_one_clear_error_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous export")
    with pytest.raises(UserError) as e:
        export_onnx(Unexportable(), out, size=(16, 16))
    message = str(e.value)
    assert "\n" not in message and "cannot export Unexportable to ONNX" in message and "bessel_j0" in message
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary files left
    with pytest.raises(UserError, match="cannot export Unexportable with torch.export"):
        export_torch(Unexportable(), tmp_path / "model.pt2", size=(16, 16))
    assert not (tmp_path / "model.pt2").exists()


def test_cli_exports_weights_with_metadata(tmp_path):
    import onnx

    from pixelwise.weights import save_weights

    model = tiny_model("segnet_basic")
    weights = tmp_path / "w.safetensors"
    save_weights(
        weights,
        model,
        model_name="segnet_basic",
        model_kwargs=TINY_KWARGS["segnet_basic"],
        classes=["sky", "road", "car"],
    )
    for fmt, name in (("onnx", "m.onnx"), ("torch-export", "m.pt2")):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pixelwise",
                "export",
                "--weights",
                str(weights),
                "--format",
                fmt,
                "--out",
                str(tmp_path / name),
                "--size",
                "48",
                "64",
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        assert "dynamic batch, height, width" in r.stdout and "segnet_basic" in r.stdout
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    meta = json.loads(props["pixelwise"])
    assert meta["classes"] == ["sky", "road", "car"] and meta["model_name"] == "segnet_basic"
    extra = {"pixelwise.json": ""}
    torch.export.load(str(tmp_path / "m.pt2"), extra_files=extra)
    assert json.loads(extra["pixelwise.json"]) == meta  # the metadata itself, not JSON inside a JSON string
    [(diff, scale)] = ort_vs_torch(model, tmp_path / "m.onnx", [(2, 40, 56)])
    assert diff <= 1e-4 * max(1.0, scale)

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pixelwise",
            "export",
            "--weights",
            str(tmp_path / "missing.safetensors"),
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "x.onnx"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.safetensors" in r.stderr


def test_trained_segnet_exports_with_dynamic_shapes_and_agreeing_labels(tmp_path):
    """The built-in trained SegNet-Basic: max-pooling ties move its fp32 logits by ~1e-2 in a few pixels
    (PyTorch's own fp32 vs float64), so the check measures against float32 rounding, and labels agree."""
    model, _ = load_weights("segnet_basic_camvid")
    result = export_onnx(model, tmp_path / "sb.onnx", size=(96, 128))
    assert result.dynamic_dims == ("batch", "height", "width") and result.max_rel_error is not None


def test_the_check_refuses_labels_or_values_beyond_float32_rounding():
    model = get_model("segnet_basic", num_classes=3, encoder_channels=4, decoder_channels=4).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x)
    rounding = _float32_rounding(model)
    assert _compare(rounding, x, ref.clone(), ref) == 0.0
    scale = max(1.0, float(ref.abs().max()))
    moved = ref.clone()
    moved[0, :, 0, 0] += 0.01 * scale  # one pixel's logits, labels unchanged
    with pytest.raises(ValueError, match="more than twice float32 rounding"):
        _compare(rounding, x, moved, ref)
    swapped = ref.clone()
    swapped[:, :, :4] = -swapped[:, :, :4]  # an eighth of the rows: other labels
    with pytest.raises(ValueError, match="labels differ from PyTorch's on"):
        _compare(rounding, x, swapped, ref)
