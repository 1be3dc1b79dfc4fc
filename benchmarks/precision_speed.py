"""fp32 against bf16 autocast, per model: inference and a training step, side by side in one process.

Every model runs channels_last (the layout oneDNN's bf16 kernels want; fp32 gets it too, so the ratio
is the precision's alone), 360x480 input, random init, 11 classes, alternating fp32 / bf16 rounds after
a warm-up. The ratio is the median over rounds of fp32 time / bf16 time. Also reported: FLOPs per call
(FlopCounterMode: convs and matmuls) and the achieved GFLOP/s, against the measured GEMM peak of each
precision on this CPU (a 4096^3 matmul, `--threads` threads). bf16 needs native hardware support.

    python benchmarks/precision_speed.py                          # the default model list
    python benchmarks/precision_speed.py --models segnet_basic unet --reps 3

Writes benchmarks/results/precision_speed.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads stall a busy machine

import torch
import torch.nn.functional as F
from common import (
    add_common_args,
    count_flops,
    format_table,
    machine_info,
    set_threads,
    time_alternating,
    write_results,
)

from pixelwise.models import get_model
from pixelwise.precision import native_bf16

MODELS = {  # name -> builder keywords
    "segnet_basic": {},
    "unet": {"padding": "same"},
    "fcn8s": {},
    "fcn_resnet50": {},
    "deeplabv3plus_resnet50": {},
}


def gemm_peak(dtype: torch.dtype, n: int = 4096, reps: int = 3) -> float:
    """Measured GFLOP/s of an n x n x n matmul in `dtype`: the practical peak of this CPU for it."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def candidates(name: str, kwargs: dict, batch: int, train: bool) -> tuple[dict, float]:
    """{fp32: fn, bf16: fn} doing one inference or one training step, and the FLOPs of one call."""
    torch.manual_seed(0)
    model = get_model(name, num_classes=11, **kwargs).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 360, 480).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 11, (batch, 360, 480))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train(train)

    def run(dtype: torch.dtype | None) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            if not train:
                with torch.no_grad():
                    model(x)
                return
            out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        F.cross_entropy(out.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = count_flops(lambda: run(None))
    return {"fp32": lambda: run(None), "bf16": lambda: run(torch.bfloat16)}, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--reps", type=int, default=3)
    add_common_args(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    if not native_bf16(torch.device("cpu")):
        raise SystemExit(
            "this CPU has no native bf16 (AVX512-BF16/AMX-BF16): bf16 would be emulated, nothing to compare"
        )
    peaks = {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)}
    rows, results = [], {}
    for name in args.models:
        for task, batch, train in (("infer b=1", 1, False), ("train step b=2", 2, True)):
            fns, flops = candidates(name, MODELS[name], batch, train)
            times = time_alternating(fns, reps=args.reps, warmup=1)
            med = {k: statistics.median(v) for k, v in times.items()}
            speedup = statistics.median(a / b for a, b in zip(times["fp32"], times["bf16"], strict=True))
            gflops = {k: flops / med[k] / 1e9 for k in med}
            results[f"{name} {task}"] = {
                "seconds": times,
                "median_s": med,
                "speedup": speedup,
                "gflop": flops / 1e9,
                "gflops": gflops,
                "load": os.getloadavg()[0],
            }
            rows.append(
                [
                    name,
                    task,
                    f"{flops / 1e9:.0f}",
                    f"{med['fp32']:.3f}",
                    f"{med['bf16']:.3f}",
                    f"**{speedup:.2f}x**",
                    f"{gflops['fp32']:.0f} ({100 * gflops['fp32'] / peaks['fp32']:.0f}%)",
                    f"{gflops['bf16']:.0f} ({100 * gflops['bf16'] / peaks['bf16']:.0f}%)",
                ]
            )
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print(
        f"\nGEMM peak measured here: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s "
        f"({args.threads} threads, load {os.getloadavg()[0]:.2f})"
    )
    print(
        format_table(
            [
                "model",
                "task",
                "GFLOP",
                "fp32 s",
                "bf16 s",
                "fp32/bf16",
                "fp32 GFLOP/s (% peak)",
                "bf16 GFLOP/s (% peak)",
            ],
            rows,
        )
    )
    write_results("precision_speed", {"gemm_peak_gflops": peaks, "results": results, "machine": machine_info("cpu")})


if __name__ == "__main__":
    main()
