"""Does bf16 autocast train as well as fp32? Validation mIoU of the same runs in both precisions, over seeds.

Two suites, each run for every seed in fp32 (train.amp=none) and bf16 (train.amp=bf16), in one process:
    demo    the `pixelwise demo` job (U-Net on synthetic shapes, 6 epochs)
    camvid  SegNet-Basic on CamVid at half scale (180x240), 2 epochs, AdamW, median-frequency weights,
            scored on all 101 val images at that scale (logits upsampled to 360x480)

The verdict compares the gap between the precisions' mean mIoU with the run-to-run spread (standard
deviation over seeds) of each. bf16 needs a CPU that runs it natively (see pixelwise.precision).

    python benchmarks/bf16_accuracy.py --suite demo --seeds 0 1 2
    python benchmarks/bf16_accuracy.py --suite camvid --seeds 0 1 --data ../shared/data/camvid

Writes benchmarks/results/bf16_accuracy_<suite>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads stall a busy machine

from common import RESULTS_DIR, machine_info

from pixelwise.config import load_config
from pixelwise.demo import DEMO_SETTINGS
from pixelwise.engine import read_metrics
from pixelwise.fileio import atomic_write_text
from pixelwise.train import train

CAMVID_SETTINGS = [
    "data.dataset=camvid",
    "model.name=segnet_basic",
    "data.scale_range=[0.5, 0.5]",
    "data.crop_size=[180, 240]",
    "data.flip=true",
    "data.batch_size=4",
    "data.workers=0",
    "train.epochs=2",
    "train.optimizer=adamw",
    "train.lr=0.001",
    "train.weight_decay=0.01",
    "train.warmup_steps=20",
    "train.schedule=poly",
    "eval.every_epochs=0",
    "eval.mode=multiscale",
    "eval.scales=[0.5]",
    "loss.class_weights=[0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418, 0.6823, 6.2478, 7.3614]",
]


def run_once(settings: list[str], seed: int, amp: str, out: Path) -> dict:
    """Train one configuration; return its final validation mIoU and wall time."""
    cfg = load_config(
        None,
        [
            *settings,
            f"train.seed={seed}",
            f"train.amp={amp}",
            f"output.dir={out}",
            "output.report=false",
            "output.progress=false",
        ],
    )
    start = time.perf_counter()
    result = train(cfg, overwrite=True)
    seconds = time.perf_counter() - start
    val = read_metrics(out / "metrics.json")["scores"]
    return {
        "seed": seed,
        "amp": amp,
        "miou": val["miou"],
        "pixel_acc": val["pixel_acc"],
        "mean_acc": val["mean_acc"],
        "steps": result["step"],
        "seconds": round(seconds, 1),
    }


def summarise(runs: list[dict]) -> dict:
    """Mean and spread per precision, and the gap between them against the spread."""
    out: dict = {}
    for amp in ("none", "bf16"):
        v = [r["miou"] for r in runs if r["amp"] == amp]
        out[amp] = {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
    out["gap"] = out["bf16"]["mean"] - out["none"]["mean"]
    out["noise"] = max(out["none"]["std"], out["bf16"]["std"])
    out["within_noise"] = abs(out["gap"]) <= 2 * out["noise"] if out["noise"] > 0 else None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["demo", "camvid"], required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", default="../shared/data/camvid", help="CamVid root (camvid suite)")
    args = parser.parse_args()
    if args.suite == "demo":
        settings = list(DEMO_SETTINGS)
    else:
        if not Path(args.data, "train").is_dir():
            print(f"--data {args.data}: no CamVid train/ folder there", file=sys.stderr)
            return 2
        settings = [*CAMVID_SETTINGS, f"data.root={args.data}"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for amp in ("none", "bf16"):  # alternating, so a slow spell of the machine hits both
                runs.append(run_once(settings, seed, amp, Path(tmp) / f"{amp}_{seed}"))
                print(json.dumps(runs[-1]), flush=True)
    summary = summarise(runs)
    report = {"suite": args.suite, "settings": settings, "runs": runs, "summary": summary, "machine": machine_info()}
    RESULTS_DIR.mkdir(exist_ok=True)
    atomic_write_text(RESULTS_DIR / f"bf16_accuracy_{args.suite}.json", json.dumps(report, indent=2) + "\n")
    print(f"\n{args.suite}: val mIoU over seeds {args.seeds}")
    for amp, label in (("none", "fp32"), ("bf16", "bf16")):
        s = summary[amp]
        secs = statistics.mean(r["seconds"] for r in runs if r["amp"] == amp)
        print(f"  {label}: {100 * s['mean']:.2f} +- {100 * s['std']:.2f}  (n={s['n']}, {secs:.0f} s a run)")
    print(
        f"  gap bf16 - fp32: {100 * summary['gap']:+.2f} mIoU points; run-to-run spread {100 * summary['noise']:.2f}"
        f"; within 2 x spread: {summary['within_noise']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
