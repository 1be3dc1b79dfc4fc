"""How much of a SegNet-Basic CamVid training step is not forward, backward or the optimiser?

Runs the real loop (`pixelwise.train` with the built-in config camvid/segnet_basic_fast: 240x320 crops, batch 4,
bf16 where native) for a few steps per variant and times the span of steps `--warmup`+1 .. end from the
loop's own log (mean a step), then times the bare compute (forward, loss, backward, AdamW step on one
fixed batch, same model, layout and precision) the same number of times. Overhead = 1 - bare / loop.
Variants: the default (decoded images cached in memory, channels_last), no cache (PNG decode every step) with 0 and 2
loader workers, and NCHW layout. Achieved GFLOP/s is set against the measured GEMM peak of the
precision used (see precision_speed.py).

    python benchmarks/train_loop.py --steps 12

Writes benchmarks/results/train_loop.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads stall a busy machine

import torch
from common import ROOT, add_common_args, count_flops, format_table, machine_info, set_threads, write_results
from precision_speed import gemm_peak

from pixelwise.config import load_config
from pixelwise.engine.parts import build_optimizer
from pixelwise.losses import build_loss
from pixelwise.models import get_model
from pixelwise.precision import precision_name, resolve_precision
from pixelwise.train import train

CONFIG = "camvid/segnet_basic_fast"  # a built-in config (pixelwise/configs/)
VARIANTS = {
    "cached, channels_last (default)": [],
    "no cache, 0 workers": ["data.cache_mb=0"],
    "no cache, 2 workers": ["data.cache_mb=0", "data.workers=2"],
    "cached, NCHW": ["train.channels_last=false"],
}


def loop_seconds(overrides: list[str], data: str, steps: int, warmup: int) -> float:
    """Mean seconds a step over the `steps` steps after `warmup` steps of the real loop, from its log."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            CONFIG,
            [
                f"data.root={data}",
                f"output.dir={tmp}",
                "output.log_every_steps=1",
                "output.progress=false",
                "output.report=false",
                "eval.every_epochs=0",
                "data.max_val_images=1",
                *overrides,
            ],
        )
        train(cfg, stop_at_step=warmup + steps)
        log = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    t = [r["elapsed_s"] for r in log if r["kind"] == "train"]  # logged to 0.1 s: time the span, not each step
    return (t[-1] - t[warmup - 1]) / steps


def bare_seconds(steps: int, channels_last: bool) -> tuple[list[float], float]:
    """Seconds of `steps` bare compute steps on one fixed batch, and the FLOPs of one step."""
    cfg = load_config(CONFIG, [])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = get_model("segnet_basic", num_classes=11).to(memory_format=fmt).train()
    loss_fn = build_loss(cfg.loss, class_weights=torch.tensor(cfg.loss.class_weights), ignore_index=255)
    opt = build_optimizer(cfg, model)
    dtype = resolve_precision(cfg.train.amp, torch.device("cpu"))
    x = torch.randn(cfg.data.batch_size, 3, *cfg.data.crop_size).contiguous(memory_format=fmt)
    y = torch.randint(0, 11, (cfg.data.batch_size, *cfg.data.crop_size))

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
        loss_fn(out.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = count_flops(step)
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    return seconds, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "camvid"), help="CamVid root")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (default 12)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    add_common_args(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    dtype = resolve_precision(load_config(CONFIG, []).train.amp, torch.device("cpu"))
    peak = gemm_peak(dtype or torch.float32)
    batch = load_config(CONFIG, []).data.batch_size
    rows, results = [], {}
    for name, overrides in VARIANTS.items():
        loop = loop_seconds(overrides, args.data, args.steps, args.warmup)
        bare_all, flops = bare_seconds(args.steps, channels_last="train.channels_last=false" not in overrides)
        bare = statistics.mean(bare_all)
        results[name] = {
            "loop_s": loop,
            "bare_s": bare,
            "overhead": 1 - bare / loop,
            "gflop": flops / 1e9,
            "load": os.getloadavg()[0],
        }
        rows.append(
            [
                name,
                f"{loop:.3f}",
                f"{bare:.3f}",
                f"{100 * (1 - bare / loop):.1f}%",
                f"{batch / loop:.2f}",
                f"{flops / loop / 1e9:.0f} ({100 * flops / loop / 1e9 / peak:.0f}%)",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    print(f"\n{precision_name(dtype)}; GEMM peak measured here {peak:.0f} GFLOP/s; load {os.getloadavg()[0]:.2f}")
    print(
        format_table(
            ["variant", "loop s/step", "bare s/step", "outside fwd/bwd/opt", "images/s", "GFLOP/s (% GEMM peak)"], rows
        )
    )
    write_results(
        "train_loop",
        {
            "precision": precision_name(dtype),
            "gemm_peak_gflops": peak,
            "results": results,
            "machine": machine_info("cpu"),
        },
    )


if __name__ == "__main__":
    main()
