"""Precision: `auto` picks bf16 exactly where the CPU runs it natively; bf16 is refused where it is emulated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pixelwise.precision as precision
from pixelwise.precision import PrecisionError, precision_name, resolve_precision

CPU = torch.device("cpu")


def _cpu_flags() -> set[str]:
    """The kernel's view of this CPU's features, read independently of torch."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc/cpuinfo to know the truth")
def test_auto_matches_the_cpu_flags():
    flags = _cpu_flags()
    native = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags; "bf16" is Arm's Features entry
    assert precision.cpu_has_native_bf16() == native
    assert resolve_precision("auto", CPU) == (torch.bfloat16 if native else None)
    if native:
        assert resolve_precision("bf16", CPU) == torch.bfloat16
    else:
        with pytest.raises(PrecisionError, match="emulated"):
            resolve_precision("bf16", CPU)


@pytest.fixture
def emulating_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)


@pytest.fixture
def native_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)


def test_bf16_refused_where_emulated(emulating_cpu):
    assert resolve_precision("auto", CPU) is None
    with pytest.raises(PrecisionError, match="emulated and slow; use fp32 or auto"):
        resolve_precision("bf16", CPU)


def test_auto_is_bf16_where_native(native_cpu):
    assert resolve_precision("auto", CPU) == torch.bfloat16
    assert resolve_precision("bf16", CPU) == torch.bfloat16


@pytest.mark.parametrize("name", ["fp32", "none"])
def test_fp32_names(name):
    assert resolve_precision(name, CPU) is None


def test_fp16_needs_cuda_and_names_are_checked():
    with pytest.raises(PrecisionError, match="CUDA"):
        resolve_precision("fp16", CPU)
    with pytest.raises(PrecisionError, match="choose one of auto, fp32, bf16, fp16"):
        resolve_precision("half", CPU)


def test_precision_names():
    assert [precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]
