"""`pixelwise gallery`: every figure is drawn (at --quick size, with tiny random models where trained ones
would go) and is a real picture; missing inputs are said in gallery.md; bad flags are one line naming them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise.cli import main
from pixelwise.data.datasets import CAMVID_CLASSES
from pixelwise.gallery import write_gallery
from pixelwise.gallery.build import _decoders, _overlap_tile
from pixelwise.gallery.common import Sample
from pixelwise.gallery.decoders import Decoder, draw_decoders
from pixelwise.gallery.overlap_tile import mirrored, tile_grid
from pixelwise.inference import predict_logits
from pixelwise.metrics import boundary_f1_per_image, boundary_matches
from pixelwise.models import get_model
from pixelwise.weights import load_weights, save_weights

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
FIGURES = ("upsampling.png", "atrous.png", "decoders.png", "crf.png", "overlap_tile.png", "training.png")


def _save_tiny(path: Path, name: str, classes: list[str], **kwargs) -> Path:
    torch.manual_seed(0)
    model = get_model(name, num_classes=len(classes), **kwargs)
    save_weights(path, model, model_name=name, model_kwargs=kwargs, classes=classes, mean=(0.5,) * 3, std=(0.25,) * 3)
    return path


def _tiny_segnet(tmp: Path, upsample: str) -> Path:
    return _save_tiny(
        tmp / f"segnet_{upsample}.safetensors",
        "segnet_basic",
        CAMVID_CLASSES,
        upsample=upsample,
        encoder_channels=4,
        decoder_channels=4,
    )


def _tiny_unet(tmp: Path) -> Path:
    kwargs = {"padding": "valid", "depth": 2, "base_channels": 2}
    return _save_tiny(tmp / "unet.safetensors", "unet", ["membrane", "cell"], **kwargs)


def _is_picture(path: Path) -> None:
    """A figure file that holds a drawing: a real size and more than one flat colour."""
    image = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    assert image.shape[0] >= 250 and image.shape[1] >= 500, (path.name, image.shape)
    assert image.std() > 20, path.name
    colours = (image[..., 0] << 16) | (image[..., 1] << 8) | image[..., 2]
    assert len(np.unique(colours)) > 100, path.name


@pytest.mark.skipif(not (DATA / "camvid").is_dir(), reason="needs ../shared/data/camvid")
def test_gallery_draws_every_figure(tmp_path, one_thread):
    bilinear, unet = _tiny_segnet(tmp_path, "bilinear"), _tiny_unet(tmp_path)
    out = tmp_path / "gallery"
    drawn = write_gallery(
        out,
        data=DATA,
        results=RESULTS,
        bilinear_weights=str(bilinear),
        unet_weights=str(unet),
        quick=True,
        command="pixelwise gallery --out X --quick",
        log=lambda line: None,
    )
    expected = FIGURES if (DATA / "isbi2012").is_dir() else tuple(f for f in FIGURES if f != "overlap_tile.png")
    assert [d.file for d in drawn if d.file] == list(expected)
    markdown = (out / "gallery.md").read_text(encoding="utf-8")
    assert "pixelwise gallery --out X --quick" in markdown
    for name in expected:
        _is_picture(out / name)
        assert f"]({name})" in markdown
    assert "stitched prediction is `unet(" in markdown  # the U-Net given was used
    assert "Not drawn" not in markdown


def test_decoder_figure_compares_two_tiny_models(tmp_path, one_thread):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), np.uint8)
    mask[20:, :] = 3
    mask[10:30, 10:30] = 8
    mask[:4, :4] = 255
    decoders = []
    for upsample in ("max_unpool", "bilinear"):
        model, meta = load_weights(_tiny_segnet(tmp_path, upsample))
        decoders.append(Decoder(upsample, model, meta))
    drawn = draw_decoders(decoders, [Sample("random", image, mask)], tmp_path / "decoders.png")
    assert "upsample=bilinear" in drawn.caption and "upsample=max_unpool" in drawn.caption
    _is_picture(tmp_path / "decoders.png")


def test_missing_weights_leave_a_figure_out_and_say_how_to_make_them(tmp_path):
    drawn = _decoders(tmp_path, DATA / "camvid", (None, None), None, True)
    assert drawn.file is None
    assert "--set model.kwargs.upsample=bilinear" in drawn.caption
    assert "configs/reproduce/camvid_bilinear.yaml" in drawn.caption
    if (DATA / "isbi2012").is_dir():
        drawn = _overlap_tile(tmp_path, DATA / "isbi2012", None, None, True)
        assert drawn.file == "overlap_tile.png" and "not drawn: no U-Net weights" in drawn.caption
        assert "unet_isbi2012" in drawn.caption


def test_tile_grid_is_the_layout_of_predict_logits(one_thread):
    """Stitching forward_valid over the tiles the figure draws gives predict_logits' overlap-tile output."""
    torch.manual_seed(0)
    model = get_model("unet", num_classes=2, padding="valid", depth=2, base_channels=2).eval()
    image = torch.rand(1, 3, 50, 70)
    grid = tile_grid(model, (50, 70), tile_out=24)
    padded = torch.stack([torch.from_numpy(mirrored(c.numpy(), grid)) for c in image[0]])[None]  # (1, 3, H', W')
    ny, nx = grid.tiles
    stitched = torch.zeros(1, 2, ny * grid.tile_out, nx * grid.tile_out)
    with torch.no_grad():
        for y, x in grid.boxes():
            tile = padded[..., y : y + grid.tile_in, x : x + grid.tile_in]
            stitched[..., y : y + grid.tile_out, x : x + grid.tile_out] = model.forward_valid(tile)
        expected = predict_logits(model, image, mode="slide", window=(grid.tile_in, grid.tile_in))
    assert grid.tiles == (3, 3)
    torch.testing.assert_close(stitched[..., :50, :70], expected)


def test_boundary_matches_are_what_boundary_f1_counts():
    rng = np.random.default_rng(1)
    target = np.repeat(np.repeat(rng.integers(0, 3, (6, 8)), 8, 0), 8, 1)  # (48, 64) blocks of 3 classes
    pred = np.where(rng.random(target.shape) < 0.05, (target + 1) % 3, target)
    pred[:, 30:34] = 2
    target[:3, :3] = 255
    predicted, true = boundary_matches(pred, target, 3)
    f1 = boundary_f1_per_image(pred, target, 3)
    for c in range(3):
        ours_p, ours_t = predicted[pred == c], true[target == c]
        precision = (ours_p == 1).sum() / (ours_p > 0).sum()
        recall = (ours_t == 1).sum() / (ours_t > 0).sum()
        assert f1[c] == pytest.approx(2 * precision * recall / (precision + recall))
    assert (boundary_matches(target, target, 3)[1] != 2).all()  # a perfect prediction misses nothing


def test_gallery_flags_errors_name_the_flag(tmp_path, capsys):
    assert main(["gallery", "--out", str(tmp_path / "g"), "--data", str(tmp_path / "none")]) == 2
    assert f"--data {tmp_path / 'none'}: no such folder" in capsys.readouterr().err
    args = ["gallery", "--out", str(tmp_path / "g"), "--data", str(tmp_path)]
    assert main([*args, "--bilinear-weights", "nope.safetensors"]) == 2
    assert "pixelwise gallery: error: --bilinear-weights nope.safetensors: no such file" in capsys.readouterr().err
    assert main([*args, "--unet-weights", str(_tiny_segnet(tmp_path, "bilinear"))]) == 2
    err = capsys.readouterr().err
    assert "--unet-weights" in err and "valid-padding U-Net" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--results", str(tmp_path / "none")]) == 2
    assert "--results" in capsys.readouterr().err
