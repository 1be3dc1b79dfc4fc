"""Benchmark helpers: the timing/table helpers of common.py and the verdict of bf16_accuracy.py."""

from __future__ import annotations

import common  # benchmarks/ is on the import path under pytest (pyproject: pythonpath), as for the scripts
import pytest


def test_time_alternating_interleaves_and_summarizes():
    calls = []
    times = common.time_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1)
    assert calls == ["a", "b"] * 4  # warm-up round, then A B A B A B
    assert set(times) == {"a", "b"} and all(len(v) == 3 for v in times.values())
    s = common.summarize([1.0, 3.0, 2.0], items=4)
    assert s["median_s"] == 2.0 and s["items_per_s"] == 2.0 and s["min_s"] == 1.0 and s["reps"] == 3


def test_format_table_aligns_and_formats():
    text = common.format_table(["name", "x"], [["a", 1.23456], ["bb", None]])
    lines = text.splitlines()
    assert lines[0] == "| name | x    |"
    assert lines[2] == "| a    | 1.23 |" and lines[3] == "| bb   | -    |"


def test_bf16_accuracy_verdict_compares_the_gap_with_the_seed_spread():
    import bf16_accuracy

    runs = [{"amp": "none", "miou": m} for m in (0.80, 0.82, 0.84)] + [{"amp": "bf16", "miou": m} for m in (0.81, 0.83)]
    s = bf16_accuracy.summarise(runs)
    assert s["none"]["mean"] == pytest.approx(0.82) and s["none"]["std"] == pytest.approx(0.02)
    assert s["gap"] == pytest.approx(0.0) and s["within_noise"] is True
    far = bf16_accuracy.summarise(runs[:3] + [{"amp": "bf16", "miou": m} for m in (0.60, 0.61)])
    assert far["gap"] == pytest.approx(-0.215) and far["within_noise"] is False


@pytest.mark.skipif(not (common.ROOT.parent / "shared" / "data" / "isbi2012").is_dir(), reason="needs ../shared/data")
def test_reproduce_scores_isbi_with_the_engine_as_evaluate_does():
    """benchmarks/reproduce.py's ISBI scores come from pixelwise.engine.evaluate + the challenge metric:
    the same numbers `pixelwise evaluate --dataset isbi2012` prints, with V_Rand per held-out slice."""
    import reproduce
    import torch

    from pixelwise.models import get_model

    torch.manual_seed(0)
    cfg = reproduce.load_experiment("isbi2012_unet", [], quick=False)
    model = get_model("unet", num_classes=2, padding="valid", depth=1, base_channels=2).eval()
    scores = reproduce.evaluate_isbi(model, cfg)
    assert len(scores["v_rand_per_slice"]) == 5 and 0 <= scores["v_rand"] <= 1 and 0 <= scores["v_info"] <= 1
    assert scores["v_rand"] == pytest.approx(sum(scores["v_rand_per_slice"]) / 5)
    assert 0 <= scores["pixel_error"] <= 1 and scores["rand_error"] == pytest.approx(1 - scores["v_rand"])


def test_reproduce_scores_camvid_with_the_engine_at_the_training_scale(tmp_path):
    """benchmarks/reproduce.py's CamVid scores come from the engine and equal the loop it replaced: the
    input shrunk to the training scale with antialiased bilinear, the logits grown back bilinearly, scored
    at full size against the labels (by hand here, on a three-image CamVid folder)."""
    import numpy as np
    import reproduce
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from pixelwise.data.datasets import CAMVID_CLASSES
    from pixelwise.inference import normalize
    from pixelwise.metrics import BoundaryF1, ConfusionMatrix

    rng = np.random.default_rng(0)
    (tmp_path / "val").mkdir()
    (tmp_path / "valannot").mkdir()
    pairs = []
    for i in range(3):
        image = rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)
        label = rng.integers(0, 12, (6, 8)).repeat(6, 0).repeat(6, 1).astype(np.uint8)  # 6x6 blocks; 11 = Unlabelled
        Image.fromarray(image).save(tmp_path / "val" / f"{i}.png")
        Image.fromarray(label).save(tmp_path / "valannot" / f"{i}.png")
        pairs.append((torch.from_numpy(image).permute(2, 0, 1)[None], torch.from_numpy(label).long()[None]))
    cfg = reproduce.load_experiment("camvid_segnet_basic", [f"data.root={tmp_path}"], quick=False)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 11, 3, padding=1).eval()

    @torch.no_grad()
    def by_hand(antialias: bool) -> list[float]:
        cm, bf = ConfusionMatrix(11, ignore_index=255), BoundaryF1(11, ignore_index=255)
        for image, label in pairs:
            label = label.masked_fill(label == 11, 255)  # (1, 36, 48)
            x = normalize(image, cfg.data.mean, cfg.data.std)  # (1, 3, 36, 48)
            x = F.interpolate(x, size=(18, 24), mode="bilinear", align_corners=False, antialias=antialias)
            pred = F.interpolate(model(x), size=(36, 48), mode="bilinear", align_corners=False).argmax(1)
            cm.update(pred, label)
            bf.update(pred, label)
        s = cm.compute()
        return [100 * s["pixel_acc"], 100 * s["mean_acc"], 100 * s["miou"], 100 * bf.compute()["boundary_f1"]]

    scores = reproduce.evaluate_camvid(model, cfg, 0.5)
    assert [scores[k] for k in ("G", "C", "mIoU", "BF")] == pytest.approx(by_hand(antialias=True), abs=1e-9)
    assert scores["G"] != pytest.approx(by_hand(antialias=False)[0], abs=1e-3)  # the plain resize scores otherwise
    assert list(scores["per_class_iou"]) == CAMVID_CLASSES
