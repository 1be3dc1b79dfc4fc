"""`pixelwise evaluate` / `pixelwise predict` through the CLI: outputs, and one-line errors for bad input."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import write_camvid
from PIL import Image

from pixelwise.cli import main
from pixelwise.crf import CRF_PRESETS
from pixelwise.data import CamVid, raw_transforms
from pixelwise.inference import normalize, predict_logits
from pixelwise.metrics import ConfusionMatrix

KW = {"base_channels": 2, "depth": 1, "padding": "same"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from pixelwise.models import get_model
    from pixelwise.weights import save_weights

    torch.manual_seed(0)
    model = get_model("unet", num_classes=11, **KW)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_weights(path, model, model_name="unet", model_kwargs=KW, classes=CamVid.classes, palette=CamVid.palette)
    return path


def _camvid(root, n=3, h=20, w=28):
    return write_camvid(root, splits={"val": n}, size=(h, w))


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_evaluate_writes_metrics_matching_a_direct_computation(tmp_path, weights, capsys):
    data = _camvid(tmp_path / "camvid")
    rc, out, _ = _run(
        capsys,
        "evaluate",
        "--weights",
        weights,
        "--data",
        data,
        "--dataset",
        "camvid",
        "--out",
        tmp_path / "ev",
        "--batch-size",
        "2",
        "--precision",
        "fp32",
    )
    assert rc == 0
    record = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert record["inference"]["precision"] == "fp32"
    m = record["scores"]
    for key in (
        "pixel_acc",
        "mean_acc",
        "miou",
        "fwiou",
        "per_class_iou",
        "per_class_dice",
        "mean_dice",
        "boundary_f1",
    ):
        assert key in m
    assert record["num_images"] == 3 and record["classes"] == CamVid.classes and len(m["per_class_iou"]) == 11
    assert "Bicyclist" in out and "mean" in out
    from pixelwise.weights import load_weights

    model, meta = load_weights(weights)
    cm = ConfusionMatrix(11)
    for image, mask in CamVid(data, "val", transforms=raw_transforms()):
        cm.update(predict_logits(model, normalize(image[None], meta.mean, meta.std)), mask[None])
    ref = cm.compute()
    assert math.isclose(m["miou"], ref["miou"], rel_tol=1e-9) and math.isclose(m["pixel_acc"], ref["pixel_acc"])


def test_evaluate_slide_flip_crf_runs(tmp_path, weights, capsys):
    data = _camvid(tmp_path / "camvid", n=1, h=12, w=16)
    rc, _, err = _run(
        capsys,
        "evaluate",
        "--weights",
        weights,
        "--data",
        data,
        "--dataset",
        "camvid",
        "--out",
        tmp_path,
        "--mode",
        "slide",
        "--window",
        "8",
        "8",
        "--flip",
        "--crf",
        "--crf-preset",
        "deeplab_resnet",
    )
    assert rc == 0, err
    m = json.loads((tmp_path / "metrics.json").read_text())["inference"]
    assert m["mode"] == "slide" and m["window"] == [8, 8] and m["flip"]
    assert m["crf"] == CRF_PRESETS["deeplab_resnet"].to_dict()


def test_evaluate_bad_samples_stop_or_are_skipped(tmp_path, weights, capsys):
    data = _camvid(tmp_path / "camvid")
    (data / "val" / "f1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rc, _, err = _run(
        capsys, "evaluate", "--weights", weights, "--data", data, "--dataset", "camvid", "--out", tmp_path / "ev"
    )
    _one_line_error(rc, err, "f1.png", "cannot read")
    assert not (tmp_path / "ev" / "metrics.json").exists()
    rc, out, _ = _run(
        capsys,
        "evaluate",
        "--weights",
        weights,
        "--data",
        data,
        "--dataset",
        "camvid",
        "--out",
        tmp_path / "ev",
        "--skip-bad",
        "--workers",
        "1",
    )
    assert rc == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["num_images"] == 2 and m["skipped"][0].endswith("f1.png")
    report = json.loads((tmp_path / "ev" / "bad_files.json").read_text())
    assert report[0]["file"].endswith("f1.png") and "cannot read" in report[0]["error"]
    assert "f1.png\t" in (tmp_path / "ev" / "bad_files.txt").read_text()


@pytest.mark.parametrize(
    "damage, needles",
    [
        ("size", ["f0.png is 28x20 but its label map", "is 27x20"]),
        ("label", ["label value 40 is outside 0..10"]),
        ("rgb_mask", ["colour RGB image with 3 channels"]),
    ],
)
def test_evaluate_bad_pairs_are_one_line_errors(tmp_path, weights, capsys, damage, needles):
    data = _camvid(tmp_path / "camvid", n=1)
    label = data / "valannot" / "f0.png"
    if damage == "size":
        Image.fromarray(np.zeros((20, 27), dtype=np.uint8)).save(label)
    elif damage == "label":
        Image.fromarray(np.full((20, 28), 40, dtype=np.uint8)).save(label)
    else:
        rgb = np.zeros((20, 28, 3), dtype=np.uint8)
        rgb[0, 0] = (1, 2, 3)
        Image.fromarray(rgb).save(label)
    rc, _, err = _run(
        capsys, "evaluate", "--weights", weights, "--data", data, "--dataset", "camvid", "--out", tmp_path / "ev"
    )
    _one_line_error(rc, err, *needles)
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--dataset", "camvd"], ["did you mean 'camvid'"]),
        (["--dataset", "camvid", "--split", "test"], ["CamVid split 'test'"]),
        (["--dataset", "camvid", "--weights", "nope.safetensors"], ["nope.safetensors", "no such file"]),
    ],
)
def test_evaluate_bad_arguments(tmp_path, weights, capsys, argv, needles):
    data = _camvid(tmp_path / "camvid", n=1)
    base = ["evaluate", "--weights", weights, "--data", data]
    rc, _, err = _run(capsys, *base, *argv)
    _one_line_error(rc, err, *needles)


def test_predict_writes_palette_masks_and_overlays(tmp_path, weights, capsys):
    data = _camvid(tmp_path / "camvid", n=2)
    single = tmp_path / "single.jpg"
    Image.fromarray(np.full((10, 14, 3), 90, dtype=np.uint8)).save(single)
    out = tmp_path / "pred"
    rc, stdout, _ = _run(capsys, "predict", "--weights", weights, data / "val", single, "--out", out, "--alpha", "1")
    assert rc == 0 and "wrote 3 masks" in stdout
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["f0.png", "f1.png", "single.png"]
    mask = Image.open(out / "masks" / "single.png")
    assert mask.mode == "P" and mask.size == (14, 10)
    labels = np.asarray(mask)
    assert labels.max() <= 10
    palette = np.asarray(mask.getpalette()[:33]).reshape(11, 3)
    assert (palette == np.asarray(CamVid.palette)).all()
    overlay = np.asarray(Image.open(out / "overlays" / "single.png"))
    assert overlay.shape == (10, 14, 3) and (overlay == palette[labels]).all()  # alpha 1: pure class colours
    from pixelwise.weights import load_weights

    model, meta = load_weights(weights)
    x = torch.from_numpy(np.asarray(Image.open(single).convert("RGB")).copy()).permute(2, 0, 1)[None]
    assert (predict_logits(model, normalize(x, meta.mean, meta.std)).argmax(1)[0].numpy() == labels).all()

    rc, _, _ = _run(capsys, "predict", "--weights", weights, single, "--out", out, "--alpha", "1", "--side-by-side")
    pair = np.asarray(Image.open(out / "overlays" / "single.png"))
    assert rc == 0 and pair.shape == (10, 14 + 8 + 14, 3)
    assert (pair[:, :14] == 90).all() and (pair[:, 14:22] == 255).all() and (pair[:, 22:] == overlay).all()


def test_predict_bad_inputs(tmp_path, weights, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:40])
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "predict", "--weights", weights, tmp_path / "missing.png", "--out", out)
    _one_line_error(rc, err, "missing.png", "no such file")
    rc, _, err = _run(capsys, "predict", "--weights", weights, tmp_path / "empty", "--out", out)
    _one_line_error(rc, err, "empty", "holds no images")
    rc, _, err = _run(capsys, "predict", "--weights", weights, bad, good, "--out", out)
    _one_line_error(rc, err, "bad.png", "cannot read")
    assert not out.exists()  # the bad file came first: nothing written
    rc, stdout, _ = _run(capsys, "predict", "--weights", weights, bad, good, "--out", out, "--skip-bad")
    assert rc == 0 and "skipped 1 bad files" in stdout
    assert (out / "masks" / "good.png").is_file() and not (out / "masks" / "bad.png").exists()
    assert (out / "bad_files.txt").read_text().startswith(str(bad))
    other = tmp_path / "sub"
    other.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(other / "good.jpg")
    rc, _, err = _run(capsys, "predict", "--weights", weights, good, other / "good.jpg", "--out", out)
    _one_line_error(rc, err, "would both be written as good.png")
    rc, _, err = _run(capsys, "predict", "--weights", weights, good, "--out", out, "--device", "tpu")
    _one_line_error(rc, err, "--device 'tpu'")


@pytest.mark.slow
def test_predict_slides_an_image_above_the_whole_image_limit(tmp_path, weights, capsys):
    """A 9400x9400 PNG was inferred whole and ended the run with an allocation traceback: above
    MAX_WHOLE_PIXELS, predict slides the default window and says so."""
    from pixelwise.segment import MAX_WHOLE_PIXELS
    from pixelwise.weights import load_weights

    h, w = 1024, 2049  # one column over 2048 x 1024
    assert h * w > MAX_WHOLE_PIXELS
    block = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = np.tile(block, (h // 64 + 1, w // 64 + 1, 1))[:h, :w]
    Image.fromarray(image).save(tmp_path / "wide.png")
    rc, stdout, err = _run(
        capsys,
        "predict",
        "--weights",
        weights,
        tmp_path / "wide.png",
        "--out",
        tmp_path / "o",
        "--precision",
        "fp32",
        "--device",
        "cpu",
    )
    assert rc == 0, err
    assert f"1 images above {MAX_WHOLE_PIXELS} pixels were inferred by sliding window" in stdout
    model, meta = load_weights(weights)
    x = normalize(torch.from_numpy(image).permute(2, 0, 1)[None], meta.mean, meta.std)
    expected = predict_logits(model, x, mode="slide", window=(512, 512), batch_size=1).argmax(1)[0].numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / "masks" / "wide.png")), expected)


@pytest.mark.parametrize(("flags", "what"), [(["--crf"], "the dense CRF"), (["--mode", "multiscale"], "multi-scale")])
def test_predict_large_downscale_runs_what_sliding_refuses_above_the_limit(
    tmp_path, weights, capsys, monkeypatch, flags, what
):
    """Multi-scale and the CRF above the whole-image limit were a dead end (`downscale the image`): with
    --large downscale they run on the image downscaled to the limit; sliding still refuses, naming the flag."""
    import pixelwise.segment as seg
    from pixelwise.crf import CRFParams
    from pixelwise.engine import InferenceSpec
    from pixelwise.weights import load_weights

    monkeypatch.setattr(seg, "MAX_WHOLE_PIXELS", 600)  # a 30x40 image is "large"; read by predict at run time
    image = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "big.png")
    base = ["predict", "--weights", weights, tmp_path / "big.png", "--device", "cpu", "--precision", "fp32", *flags]
    rc, _, err = _run(capsys, *base, "--out", tmp_path / "slid")
    _one_line_error(rc, err, "big.png: 40x30 = 1200 pixels", what, "infer it downscaled (--large downscale)")
    assert 'large="downscale"' not in err  # the library's words stay in the library
    rc, stdout, err = _run(capsys, *base, "--out", tmp_path / "o", "--large", "downscale")
    assert rc == 0, err
    assert "1 images above 600 pixels were inferred downscaled to that size" in stdout
    model, meta = load_weights(weights)
    crf = CRFParams.preset("deeplab_vgg") if "--crf" in flags else None
    spec = InferenceSpec(mode="multiscale" if "--mode" in flags else "whole", crf=crf)
    expected = seg.segment_image(
        model, image, spec, mean=meta.mean, std=meta.std, num_classes=11, max_whole_pixels=600, large="downscale"
    )
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / "masks" / "big.png")), expected)
