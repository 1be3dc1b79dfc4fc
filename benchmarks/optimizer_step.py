"""The optimiser step alone: torch's default for-loop step against the fused one pixelwise uses.

For each model and optimiser (SGD with momentum, AdamW) the step is timed on fixed random gradients, A B A B
after warm-up (``--rounds`` rounds of ``--steps`` steps each), and the medians and the ratio fused/default
are reported, in process CPU seconds (robust to a shared machine) and in wall seconds. The models: the
demo's U-Net (its config), SegNet-Basic (1.4 M parameters) and the paper's U-Net (31 M).

    python benchmarks/optimizer_step.py            # ~1 min on 2 CPU cores

Writes benchmarks/results/optimizer_step.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads stall a busy machine

import torch
from common import add_common_args, format_table, machine_info, set_threads, write_results

from pixelwise.demo import demo_config
from pixelwise.models import get_model

MODELS = {
    "demo unet": lambda: _demo_model(),
    "segnet_basic": lambda: get_model("segnet_basic", num_classes=11),
    "unet (paper, 64)": lambda: get_model("unet", num_classes=2, padding="valid", base_channels=64),
}
OPTIMIZERS = {
    "sgd": lambda params, **kw: torch.optim.SGD(params, lr=0.01, momentum=0.9, **kw),
    "adamw": lambda params, **kw: torch.optim.AdamW(params, lr=1e-3, **kw),
}


def _demo_model() -> torch.nn.Module:
    cfg = demo_config("unused")
    return get_model(cfg.model.name, num_classes=cfg.data.kwargs.get("num_classes", 5), **cfg.model.kwargs)


def time_steps(optimizer: torch.optim.Optimizer, steps: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one step, the mean over `steps` steps."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.process_time() - cpu) / steps, (time.perf_counter() - wall) / steps


def compare(model: torch.nn.Module, make, steps: int, rounds: int) -> dict[str, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    candidates = {"default": make(params), "fused": make(params, fused=True)}
    for opt in candidates.values():
        time_steps(opt, 3)  # warm-up: state allocation
    times = {name: [] for name in candidates}
    for _ in range(rounds):  # A B A B: load changes hit both
        for name, opt in candidates.items():
            times[name].append(time_steps(opt, steps))
    out = {}
    for name, values in times.items():
        out[f"{name}_cpu_ms"] = 1000 * statistics.median(v[0] for v in values)
        out[f"{name}_wall_ms"] = 1000 * statistics.median(v[1] for v in values)
    out["ratio_cpu"] = out["fused_cpu_ms"] / out["default_cpu_ms"]
    out["ratio_wall"] = out["fused_wall_ms"] / out["default_wall_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="A B rounds (medians are reported)")
    add_common_args(p)
    args = p.parse_args(argv)
    set_threads(args.threads)
    rows, results = [], []
    for model_name, build in MODELS.items():
        model = build()
        n = sum(p.numel() for p in model.parameters())
        for opt_name, make in OPTIMIZERS.items():
            r = {
                "model": model_name,
                "parameters": n,
                "optimizer": opt_name,
                **compare(model, make, args.steps, args.rounds),
            }
            results.append(r)
            rows.append(
                [
                    model_name,
                    f"{n / 1e6:.2f} M",
                    opt_name,
                    r["default_cpu_ms"],
                    r["fused_cpu_ms"],
                    r["ratio_cpu"],
                    r["ratio_wall"],
                ]
            )
    print(
        format_table(
            [
                "model",
                "params",
                "optimiser",
                "default CPU ms",
                "fused CPU ms",
                "fused/default CPU",
                "fused/default wall",
            ],
            rows,
        )
    )
    payload = {"benchmark": "optimizer_step", "results": results, "machine": machine_info("cpu")}
    write_results("optimizer_step", payload, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
