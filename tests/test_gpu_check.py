"""benchmarks/gpu_check.sh, the GPU check: its --dry-run plan (every step's arguments checked by the scripts'
own parsers, the CUDA test files, the 8-minute budget), its reading of pytest's JUnit XML, its one-line
errors, and (slow) every CPU-runnable step at tiny size."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import gpu_check
import pytest
import torch

from pixelwise.precision import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]
HAVE_SMP = importlib.util.find_spec("segmentation_models_pytorch") is not None
HAVE_PYDENSECRF = importlib.util.find_spec("pydensecrf") is not None


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_dry_run_checks_every_step_within_the_budget(tmp_path):
    r = _run("--dry-run", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_summary.json").read_text())
    assert summary["dry_run"] and summary["problems"] == []
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["tests", "speed", "speed_compile", "mfu", "crf"]
    crf_status = "checked" if HAVE_PYDENSECRF else "skipped: pydensecrf is not installed"
    assert [s["status"].split(" (")[0] for s in steps.values()] == ["checked"] * 4 + [crf_status]
    assert gpu_check.INSTALL_BUDGET_S + sum(s["budget_s"] for s in steps.values()) <= 8 * 60
    for name in ("speed", "speed_compile", "mfu", "crf"):
        argv = steps[name]["argv"]
        assert argv[argv.index("--device") + 1] == "cuda"
        assert argv[argv.index("--out") + 1] == str(tmp_path / f"gpu_{name}.json")
    assert "--compile" in steps["speed_compile"]["argv"] and "--fast" in steps["speed"]["argv"]
    assert ("deeplabv3plus_resnet50_separable" in steps["speed"]["argv"]) == HAVE_SMP
    # the device tool brings back at most 8 files: the step outputs, gpu_tests.json, the summary and the log
    assert len({s["argv"][s["argv"].index("--out") + 1] for s in steps.values() if "--out" in s["argv"]}) + 3 <= 8
    assert steps["tests"]["argv"][:4] == ["-m", "pytest", "-m", "cuda"]
    assert (
        sorted(steps["tests"]["argv"][4:6])
        == gpu_check.cuda_test_files()
        == ["tests/test_crf.py", "tests/test_cuda.py"]
    )


def test_the_check_rejects_a_bad_argument_and_an_overlong_plan(tmp_path):
    steps = gpu_check.plan(tmp_path, {"smp": False, "pydensecrf": True}, tmp_path / "junit.xml")
    assert gpu_check.check_arguments(steps) == []
    typo = gpu_check.Step("speed", 10, ("benchmarks/speed.py", "--device", "cuda", "--fastest"), None)
    assert gpu_check.check_arguments([typo]) == [
        "speed: benchmarks/speed.py --device cuda --fastest: rejected by benchmarks/speed.py's parser"
    ]
    long = gpu_check.Step("crf", 900, ("benchmarks/crf_speed.py",), None)
    assert "over 460 s" in gpu_check.check_arguments([long])[0]


def test_junit_xml_becomes_the_tests_report(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">'
        '<testcase classname="tests.test_cuda" name="test_a[bf16]" time="1.5" />'
        '<testcase classname="tests.test_cuda" name="test_b" time="0.2">'
        '<failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="tests.test_crf" name="test_c" time="0.0">'
        '<skipped type="pytest.skip" message="needs CUDA" /></testcase>'
        "</testsuite></testsuites>"
    )
    report = gpu_check.tests_report(junit)
    assert (report["passed"], report["failed"], report["skipped"]) == (1, 1, 1)
    assert report["tests"][0] == {
        "id": "tests.test_cuda::test_a[bf16]",
        "outcome": "passed",
        "seconds": 1.5,
        "message": "",
    }
    assert report["tests"][1]["message"] == "assert 1 == 2"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_the_real_run_is_one_clear_line(tmp_path):
    r = _run("--out", str(tmp_path))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "gpu_check: error: no CUDA device here; use the GPU machine, or --dry-run on a CPU"
    ]
    r = _run("--tiny")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith("error: --tiny goes with --dry-run")


@pytest.mark.slow
def test_tiny_dry_run_runs_every_cpu_step(tmp_path):
    r = _run("--dry-run", "--tiny", "--out", str(tmp_path), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == {
        "tests": "ok",
        "speed": "ok",
        "speed_compile": "skipped: not run on a CPU",
        "mfu": "ok",
        "crf": "ok" if HAVE_PYDENSECRF else status["crf"],
    }
    collected = json.loads((tmp_path / "gpu_tests.json").read_text())["collected"]
    assert "tests/test_cuda.py::test_sync_batchnorm_ddp_under_torchrun_equals_one_process" in collected
    assert "tests/test_crf.py::test_cuda_matches_cpu" in collected
    speed = json.loads((tmp_path / "gpu_speed.json").read_text())
    assert [p["pair"] for p in speed["pairs"]] == ["fcn_resnet50"] and "fast_max_abs_diff" in speed["pairs"][0]
    mfu = json.loads((tmp_path / "gpu_mfu.json").read_text())["mfu"]  # fp32, and bf16 where the CPU runs it
    assert [m["dtype"] for m in mfu] == ["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"]
    assert all(m["model"] == "deeplabv3_resnet101" and m["train"]["tflop_per_call"] > 0 for m in mfu)
