"""`pixelwise demo` and its --quick mode: the same pipeline on fewer, smaller images for one epoch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise.cli import main
from pixelwise.demo import DEMO_SETTINGS, demo_config, run_demo
from pixelwise.weights import load_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_demo_config_is_the_documented_job(tmp_path):
    cfg = demo_config(tmp_path / "d", device="cpu")
    assert cfg.data.dataset == "synthetic" and cfg.model.name == "unet"
    assert cfg.model.kwargs == {"padding": "same", "base_channels": 16, "depth": 3}
    assert cfg.output.dir == str(tmp_path / "d") and cfg.train.device == "cpu"
    assert len(DEMO_SETTINGS) == len({s.split("=")[0] for s in DEMO_SETTINGS})  # no field set twice


def test_quick_demo_writes_weights_metrics_predictions_and_report(tmp_path):
    cfg = demo_config(tmp_path / "d", device="cpu", quick=True)
    full = demo_config(tmp_path / "d", device="cpu")
    assert cfg.data.kwargs == full.data.kwargs | {"num_images": 16, "size": [32, 32]}  # the same job, smaller
    assert (cfg.model, cfg.train.optimizer, cfg.train.epochs, cfg.data.crop_size) == (full.model, "adamw", 1, [32, 32])
    cfg.output.progress = False
    summary = run_demo(cfg, num_predictions=2)
    out = tmp_path / "d"
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["miou"] == metrics["scores"]["miou"] and 0 <= summary["miou"] <= 1
    model, meta = load_weights(out / "best.safetensors")
    assert meta.model_name == "unet" and len(meta.classes) == 5
    for i in range(2):
        mask = np.asarray(Image.open(out / "predictions" / f"val_{i:03d}.png"))
        assert mask.shape == (32, 32) and mask.max() < 5
        assert Image.open(out / "predictions" / f"val_{i:03d}_overlay.png").size == (32, 32)
    # the saved prediction is what the weights predict for that image
    from pixelwise.data import build_dataset

    image, _ = build_dataset("synthetic", "", "val", **cfg.data.kwargs)[0]
    with torch.no_grad():
        expected = model(image[None]).argmax(1)[0].numpy()
    assert np.array_equal(np.asarray(Image.open(out / "predictions" / "val_000.png")), expected)
    assert (out / "report.html").is_file() and (out / "samples.png").is_file()


def test_demo_cli_reports_an_unwritable_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--out", str(blocker / "out")]) == 2
    assert "cannot write there" in capsys.readouterr().err
