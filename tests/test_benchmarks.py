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
