"""Numeric precision: bf16 autocast where the hardware executes bfloat16, fp32 elsewhere.

CPUs differ: those with AVX512-BF16 or AMX-BF16 (x86) or the BF16 extension (Arm) run bf16 matrix
products natively and train/infer ~1.9x faster under autocast; on the others oneDNN emulates bf16
and it is several times *slower* than fp32. So `auto` asks the hardware, and an explicit `bf16` on a
CPU that would emulate it is refused rather than silently slow. CUDA: bf16 where the GPU supports it.

Names: `auto` (bf16 where native, else fp32), `fp32` (also spelled `none` in train.amp), `bf16`,
and for CUDA only `fp16` (with a gradient scaler in training).
"""

from __future__ import annotations

import contextlib
import functools

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # the CLI's --precision choices are the first three


class PrecisionError(ValueError):
    """A precision the device cannot run (well); the message says why and what to use instead."""


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU executes bfloat16 dot products in hardware (AVX512-BF16, AMX-BF16, Arm BF16)."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, probe, None)
        if check is not None and check():
            return True
    if torch.backends.mkldnn.is_available() and _is_arm():
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # on Arm: the BF16 extension itself
    return False


def _is_arm() -> bool:
    import platform

    return platform.machine().lower() in ("aarch64", "arm64")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 natively (CUDA: compute capability with bf16; CPU: see above)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for precision `name` on `device`; None means plain fp32.

    Raises:
        PrecisionError: bf16 where the device would emulate it, fp16 off CUDA, or an unknown name.
    """
    if name in ("fp32", "none"):
        return None
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if name == "bf16":
        if not native_bf16(device):
            where = "this GPU" if device.type == "cuda" else "this CPU (no AVX512-BF16/AMX-BF16/Arm BF16)"
            raise PrecisionError(
                f"bf16 is not executed natively by {where}: it would be emulated and slow; use fp32 or auto"
            )
        return torch.bfloat16
    if name == "fp16":
        if device.type != "cuda":
            raise PrecisionError(f"fp16 autocast needs a CUDA device, not {device}; use auto, bf16 or fp32")
        return torch.float16
    raise PrecisionError(f"precision {name!r} is unknown; choose one of {', '.join(PRECISIONS)}")


def precision_name(dtype: torch.dtype | None) -> str:
    """'bf16', 'fp16' or 'fp32': the name recorded in logs and weights' metadata."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for `dtype` on `device`, or a no-op context for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
