"""Turn a finished run's best weights into built-in package weights: fp16 tensors, the recipe in the metadata.

    python benchmarks/ship_weights.py RUN_DIR --name segnet_basic_camvid --recipe "config camvid/..."

Writes pixelwise/trained/<name>.safetensors (floating tensors as fp16: half the size; with `--int8` the
conv weights as int8 with a scale per output channel: a quarter; the predictions agree with the fp32
weights on all but a few pixels: the script measures how many on `--check-images` validation images) and
prints the sha256 to put in `pixelwise.pretrained.PRETRAINED`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path

import torch
from common import ROOT

from pixelwise.data import build_dataset
from pixelwise.engine import read_metrics
from pixelwise.inference import predict_logits
from pixelwise.weights import dequantize_int8, load_weights, quantize_int8, save_weights


def agreement(a: torch.nn.Module, b: torch.nn.Module, dataset, n: int) -> float:
    """Share of pixels where the two models' argmax agree on the first `n` images (fp32 inference)."""
    same = total = 0
    with torch.no_grad():
        for i in range(min(n, len(dataset))):
            x, _ = dataset[i]
            pa = predict_logits(a, x[None]).argmax(1)
            pb = predict_logits(b, x[None]).argmax(1)
            same += int((pa == pb).sum())
            total += pa.numel()
    return same / total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder with best.safetensors and metrics.json")
    parser.add_argument("--name", required=True, help="built-in name, MODEL_TAG (e.g. segnet_basic_camvid)")
    parser.add_argument("--recipe", required=True, help="how it was trained: config and command")
    parser.add_argument(
        "--data", default=str(ROOT.parent / "shared" / "data" / "camvid"), help="data set root for the agreement check"
    )
    parser.add_argument("--dataset", default="camvid")
    parser.add_argument("--check-images", type=int, default=20)
    parser.add_argument("--int8", action="store_true", help="conv weights as int8 + per-channel scale")
    args = parser.parse_args()
    model, meta = load_weights(args.run / "best.safetensors")
    metrics = read_metrics(args.run / "metrics.json")
    half = copy.deepcopy(model).half()  # floating tensors rounded to fp16
    stored = copy.deepcopy(half).float()  # what a load of the written file gives back
    if args.int8:
        quantized, keys = quantize_int8(half.state_dict())
        stored.load_state_dict(dequantize_int8(quantized, json.loads(keys), args.run))
    val = build_dataset(args.dataset, args.data, "val")
    agree = agreement(model, stored, val, args.check_images)
    out = ROOT / "pixelwise" / "trained" / f"{args.name}.safetensors"
    out.parent.mkdir(exist_ok=True)
    val_scores = {k: metrics["scores"][k] for k in ("miou", "pixel_acc", "mean_acc")}
    if "isbi_challenge" in metrics["scores"]:  # the challenge's own scores (ISBI 2012)
        challenge = metrics["scores"]["isbi_challenge"]
        val_scores.update({k: challenge[k] for k in ("v_rand", "v_info", "pixel_error")})
    storage = "int8 conv weights (per-channel scale), fp16 rest" if args.int8 else "fp16"
    extra = {**meta.extra, "recipe": args.recipe, "val": val_scores, "stored_as": storage}
    save_weights(
        out,
        half,
        model_name=meta.model_name,
        model_kwargs=meta.model_kwargs,
        classes=meta.classes,
        palette=meta.palette,
        mean=meta.mean,
        std=meta.std,
        ignore_index=meta.ignore_index,
        extra=extra,
        int8=args.int8,
    )
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB), sha256 {digest}")
    print(f"{storage} vs fp32 weights: argmax agreement {100 * agree:.3f}% of pixels on {args.check_images} val images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
