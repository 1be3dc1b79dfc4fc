"""Built-in trained weights: by name in Python and on the command line, sha256 checked on every load."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pixelwise.pretrained as pretrained
from pixelwise.cli import main
from pixelwise.data import CamVid
from pixelwise.errors import UserError
from pixelwise.models import get_model
from pixelwise.pretrained import PRETRAINED, Pretrained
from pixelwise.weights import save_weights

KW = {"encoder_channels": 4, "decoder_channels": 4}


@pytest.fixture
def builtin(tmp_path, monkeypatch):
    """A tiny SegNet-Basic installed as built-in weights `segnet_basic_tiny` in a package folder of its own."""
    torch.manual_seed(0)
    package = tmp_path / "pkg"
    (package / "trained").mkdir(parents=True)
    model = get_model("segnet_basic", num_classes=11, **KW)
    path = package / "trained" / "tiny.safetensors"
    save_weights(
        path, model, model_name="segnet_basic", model_kwargs=KW, classes=CamVid.classes, palette=CamVid.palette
    )
    entry = Pretrained(
        model="segnet_basic",
        tag="tiny",
        file="tiny.safetensors",
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        recipe="test",
        metrics={"miou": 1.0},
    )
    monkeypatch.setitem(PRETRAINED, entry.name, entry)
    monkeypatch.setattr(pretrained, "trained_dir", lambda: package / "trained")
    return entry, model


def test_get_model_with_weights_returns_the_trained_model(builtin):
    entry, reference = builtin
    model = get_model("segnet_basic", weights="tiny")
    assert not model.training
    x = torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference.eval()(x))
    assert entry.meta.classes == CamVid.classes and entry.meta.palette == [tuple(c) for c in CamVid.palette]
    assert get_model("segnet_basic", weights="tiny", num_classes=11) is not None  # repeating is fine
    with pytest.raises(UserError, match="drop \\['num_classes'\\]"):
        get_model("segnet_basic", weights="tiny", num_classes=5)
    with pytest.raises(UserError, match="no built-in weights 'voc'; choose .*'tiny'"):
        get_model("segnet_basic", weights="voc")


def test_preprocessing_is_the_files_normalisation(builtin):
    entry, _ = builtin
    image = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    x, _ = entry.transforms()(image, torch.zeros(2, 2, dtype=torch.int64))
    mean, std = np.array(entry.meta.mean), np.array(entry.meta.std)
    assert np.allclose(x[:, 0, 0].numpy(), (1 - mean) / std, atol=1e-6)


def test_a_damaged_file_is_refused(builtin, tmp_path):
    entry, _ = builtin
    path = tmp_path / "pkg" / "trained" / entry.file
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256 .* expected .* damaged or was replaced"):
        get_model("segnet_basic", weights="tiny")
    rc = main(["predict", "--weights", "segnet_basic_tiny", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2


def test_cli_accepts_the_name_for_predict_and_evaluate(builtin, tmp_path, capsys):
    root = tmp_path / "camvid"
    rng = np.random.default_rng(0)
    for folder in ("val", "valannot"):
        (root / folder).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(root / "val" / f"f{i}.png")
        Image.fromarray(rng.integers(0, 12, (20, 28), dtype=np.uint8)).save(root / "valannot" / f"f{i}.png")
    out = tmp_path / "pred"
    assert (
        main(["predict", "--weights", "segnet_basic_tiny", str(root / "val"), "--out", str(out), "--precision", "fp32"])
        == 0
    )
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["f0.png", "f1.png"]
    assert (
        main(
            [
                "evaluate",
                "--weights",
                "segnet_basic_tiny",
                "--data",
                str(root),
                "--dataset",
                "camvid",
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["inference"]["precision"] in ("fp32", "bf16")
    capsys.readouterr()
    assert main(["predict", "--weights", "segnet_basic_nope", str(root / "val"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no such file segnet_basic_nope, nor built-in weights of that name (" in err and "segnet_basic_tiny" in err


def test_a_file_of_that_name_wins_over_the_builtin(builtin, tmp_path, monkeypatch):
    entry, _ = builtin
    monkeypatch.chdir(tmp_path)
    shutil.copy(tmp_path / "pkg" / "trained" / entry.file, tmp_path / "segnet_basic_tiny")
    from pixelwise.pretrained import resolve

    assert resolve("segnet_basic_tiny").resolve() == tmp_path / "segnet_basic_tiny"


def test_the_shipped_camvid_model_loads_by_name_and_is_listed(capsys):
    """The real package file: present, sha256 as registered, and a SegNet-Basic over CamVid's 11 classes."""
    entry = PRETRAINED["segnet_basic_camvid"]
    model = get_model("segnet_basic", weights="camvid")
    assert entry.meta.classes == CamVid.classes and entry.meta.model_name == "segnet_basic"
    assert sum(p.numel() for p in model.parameters()) == 1_416_075  # the paper's SegNet-Basic, 1.42 M
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 36, 48))
    assert out.shape == (1, 11, 36, 48) and torch.isfinite(out).all()
    assert main(["models", "--no-flops"]) == 0
    listing = capsys.readouterr().out
    assert "segnet_basic_camvid" in listing and "val" in listing


def test_the_shipped_camvid_file_keeps_its_keys_and_gives_the_logits_it_gave_before_the_anatomy():
    """The file predates the encoder/decoder/head layout (SegNet's head was `classifier`) and must not
    change: it loads through the old-key renaming, and on a fixed input gives the logits the code before
    the anatomy computed (reference numbers below, printed by that code)."""
    from safetensors import safe_open

    with safe_open(str(PRETRAINED["segnet_basic_camvid"].path()), framework="pt") as f:
        assert {"classifier.weight", "classifier.bias"} <= set(f.keys())  # the old names, on disk
    model = get_model("segnet_basic", weights="camvid")
    x = torch.sin(torch.arange(3 * 45 * 61, dtype=torch.float32) * 0.37).reshape(1, 3, 45, 61) * 2
    with torch.no_grad():
        y = model(x).double()
    per_class_mean = [
        -0.948433,
        1.565056,
        -0.391133,
        -2.721629,
        -4.182644,
        4.307215,
        0.484788,
        0.288134,
        0.983673,
        -1.213864,
        -1.086865,
    ]
    centre = [
        -1.793104,
        1.193845,
        -1.265403,
        -2.750561,
        -5.676802,
        5.58499,
        0.012842,
        0.196078,
        2.159605,
        -1.443505,
        -0.508137,
    ]  # the 11 logits at row 22, column 30
    assert y.mean().item() == pytest.approx(-0.2650636974096022, abs=1e-5)
    assert y.abs().mean().item() == pytest.approx(1.7218382779430486, abs=1e-5)
    assert y.mean(dim=(0, 2, 3)).tolist() == pytest.approx(per_class_mean, abs=1e-5)
    assert y[0, :, 22, 30].tolist() == pytest.approx(centre, abs=1e-5)
    assert torch.bincount(y.argmax(1).flatten(), minlength=11).tolist() == [0, 34, 0, 0, 0, 2706, 0, 0, 5, 0, 0]


def test_the_shipped_isbi_unet_loads_by_name_and_draws_membranes():
    """The second built-in model: the paper's U-Net (valid convs, 64 base channels, 31.0 M parameters)
    trained on ISBI 2012 slices 0..24, stored with int8 conv weights; on a crop of held-out slice 27 its labels match
    the membrane/cell truth on most pixels."""
    entry = PRETRAINED["unet_isbi2012"]
    model = get_model("unet", weights="isbi2012")
    assert entry.meta.classes == ["membrane", "cell"] and entry.meta.model_kwargs["padding"] == "valid"
    assert sum(p.numel() for p in model.parameters()) == 31_031_810  # Ronneberger et al. 2015, two classes
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012"
    if not root.is_dir():
        pytest.skip("needs ../shared/data/isbi2012 for the prediction check")
    image = np.array(Image.open(root / "image" / "27.png"))[:160, :192]  # grey, any size: overlap-tiled
    truth = np.asarray(Image.open(root / "label" / "27.png"))[:160, :192] > 0
    x = torch.from_numpy(image).float().div(255).sub(0.5).div(0.25).expand(1, 3, -1, -1)
    with torch.no_grad():
        cell = model(x).argmax(1)[0].numpy() == 1
    assert (cell == truth).mean() > 0.85
