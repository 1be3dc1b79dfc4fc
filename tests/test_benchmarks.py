"""Benchmark helpers: the Rand errors of benchmarks/reproduce.py and the timing/table helpers of common.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_pixelwise_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


reproduce = _load("reproduce")
common = _load("common")


def test_rand_errors_hand_computed_merge():
    # two 2-pixel cells split by one membrane pixel; the prediction merges them into one segment
    true_fg = np.array([[1, 1, 0, 1, 1]], dtype=bool)
    pred_fg = np.ones((1, 5), dtype=bool)
    r = reproduce.rand_errors(true_fg, pred_fg)
    # inside the true cells: n_ij = (2, 2), a = (2, 2), b = (4,): P = (8-4)/(16-4) = 1/3, R = 1, F = 1/2
    assert r["rand_precision"] == pytest.approx(1 / 3)
    assert r["rand_recall"] == pytest.approx(1.0)
    assert r["rand_error"] == pytest.approx(0.5)
    # all 10 pixel pairs: only (0,1) and (3,4) are "same" in the truth, all 10 in the prediction
    assert r["rand_error_full"] == pytest.approx(8 / 10)


def test_rand_errors_split_and_perfect():
    true_fg = np.array([[1, 1, 1, 1]], dtype=bool)
    pred_fg = np.array([[1, 1, 0, 1]], dtype=bool)  # one cell split in two, one pixel called membrane
    r = reproduce.rand_errors(true_fg, pred_fg)
    # n_ij over the 4 true-cell pixels: pred segments (1: 2 px, 0: 1 px, 2: 1 px) -> sum n^2 - n = 6 - 4 = 2
    # a = (4,): 16 - 4 = 12 -> R = 1/6; b = (2, 1, 1): 6 - 4 = 2 -> P = 1
    assert r["rand_recall"] == pytest.approx(1 / 6)
    assert r["rand_precision"] == pytest.approx(1.0)
    assert r["rand_error"] == pytest.approx(1 - 2 * (1 / 6) / (1 + 1 / 6))
    perfect = reproduce.rand_errors(true_fg, true_fg)
    assert perfect["rand_error"] == pytest.approx(0.0) and perfect["rand_error_full"] == pytest.approx(0.0)


def test_time_alternating_interleaves_and_summarizes():
    calls = []
    times = common.time_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                    reps=3, warmup=1)
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
    bf16_accuracy = _load("bf16_accuracy")
    runs = [{"amp": "none", "miou": m} for m in (0.80, 0.82, 0.84)] + [{"amp": "bf16", "miou": m} for m in (0.81, 0.83)]
    s = bf16_accuracy.summarise(runs)
    assert s["none"]["mean"] == pytest.approx(0.82) and s["none"]["std"] == pytest.approx(0.02)
    assert s["gap"] == pytest.approx(0.0) and s["within_noise"] is True
    far = bf16_accuracy.summarise(runs[:3] + [{"amp": "bf16", "miou": m} for m in (0.60, 0.61)])
    assert far["gap"] == pytest.approx(-0.215) and far["within_noise"] is False
