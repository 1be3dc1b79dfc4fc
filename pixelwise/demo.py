"""`pixelwise demo`: the whole job on built-in synthetic shapes, in about two minutes on two CPU cores.

It trains a small U-Net (Ronneberger et al. 2015, 'same' padding) on `SyntheticShapes`, keeps the
best weights by validation mIoU, scores them (`metrics.json`), writes `best.safetensors`, predictions
for a few validation images (class-index PNGs and colour overlays) and `report.html`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from pixelwise.config import Config, load_config

# 64x64 shapes are large enough for the textures that tell the classes apart (periods of 5-9 px) and
# small enough that 320 images x 6 epochs train in about a minute on two cores.
DEMO_SETTINGS = [
    "data.dataset=synthetic",
    "data.kwargs={size: [64, 64], num_classes: 5, num_images: 320, seed: 0}",  # val split: drawn with seed 1
    "data.max_val_images=64",  # ~300 shapes: a stable mIoU, cheap to score every 2 epochs
    "data.crop_size=[64, 64]",
    "data.scale_range=[1.0, 1.0]",  # train and val are drawn alike: no rescaling needed
    "data.flip=true",
    "data.batch_size=8",
    "data.workers=0",  # drawing a 64x64 sample takes ~2 ms: worker processes would cost more than they save
    "model.name=unet",
    "model.kwargs={padding: same, base_channels: 16, depth: 3}",  # 0.5 M parameters
    "train.epochs=6",
    "train.optimizer=adamw",  # converges from scratch without tuning, unlike plain SGD
    "train.lr=0.003",
    "train.weight_decay=0.0001",
    "train.warmup_steps=20",
    "train.schedule=poly",
    # fp32 even where bf16 is native: at 64x64 and 16 channels the casts cost more than bf16 saves (3 seeds,
    # same mIoU, 56 s fp32 against 93 s bf16 a run; benchmarks/bf16_accuracy.py, loaded machine)
    "train.amp=none",
    "eval.every_epochs=2",
    "output.report_images=4",
]


# `pixelwise demo --quick`: every step of the job on 16 images of 32x32 for one epoch, a few seconds: it checks
# that an install works (the wheel test runs it); its mIoU says nothing about the model.
QUICK_SETTINGS = [
    "data.kwargs={size: [32, 32], num_classes: 5, num_images: 16, seed: 0}",
    "data.crop_size=[32, 32]",
    "data.max_val_images=4",
    "train.epochs=1",
    "train.warmup_steps=0",  # 2 steps in all
]


def demo_config(out: str | Path, *, device: str = "auto", quick: bool = False) -> Config:
    """The demo's training configuration, writing into `out`; `quick` shrinks it to a seconds-long check."""
    quick_settings = QUICK_SETTINGS if quick else []
    return load_config(None, [*DEMO_SETTINGS, *quick_settings, f"output.dir={out}", f"train.device={device}"])


def run_demo(cfg: Config, *, num_predictions: int = 4) -> dict[str, Any]:
    """Train and evaluate as `cfg` says, then write predictions for the first validation images.

    Returns:
        {"miou": best validation mIoU, "seconds": wall time, "out": output folder}
    """
    from pixelwise.data import build_dataset
    from pixelwise.engine import InferenceSpec, read_metrics, segment
    from pixelwise.palette import overlay, save_index_png, save_rgb_png
    from pixelwise.train import train
    from pixelwise.weights import load_weights

    start = time.perf_counter()
    out = Path(cfg.output.dir)
    result = train(cfg, overwrite=True)
    if result["interrupted"]:
        return {"miou": None, "seconds": time.perf_counter() - start, "out": str(out)}

    model, meta = load_weights(out / "best.safetensors")
    val = build_dataset("synthetic", "", cfg.data.val_split, **cfg.data.kwargs)  # raw images come from .load()
    pred_dir = out / "predictions"
    for i in range(min(num_predictions, len(val))):
        image, _ = val.load(i)  # (H, W, 3) uint8
        x = torch.from_numpy(image).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
        pred = segment(model, x, InferenceSpec(), mean=meta.mean, std=meta.std).argmax(1)[0].numpy()  # (H, W)
        save_index_png(pred_dir / f"val_{i:03d}.png", pred, meta.palette)
        save_rgb_png(pred_dir / f"val_{i:03d}_overlay.png", overlay(image, pred, meta.palette))
    seconds = time.perf_counter() - start
    miou = read_metrics(out / "metrics.json")["scores"]["miou"]
    return {"miou": miou, "seconds": seconds, "out": str(out)}


def demo_command(args: argparse.Namespace) -> int:
    """`pixelwise demo [--out DIR] [--device D] [--quick]`."""
    cfg = demo_config(args.out, device=args.device, quick=args.quick)
    summary = run_demo(cfg)
    if summary["miou"] is None:
        print(f"demo interrupted after {summary['seconds']:.0f} s; run it again to start over")
        return 130
    out = Path(summary["out"])
    print(
        f"demo done in {summary['seconds']:.0f} s: validation mIoU {summary['miou']:.4f}\n"
        f"  weights     {out / 'best.safetensors'}\n"
        f"  metrics     {out / 'metrics.json'}\n"
        f"  report      {out / 'report.html'}\n"
        f"  predictions {out / 'predictions'}/"
    )
    return 0
