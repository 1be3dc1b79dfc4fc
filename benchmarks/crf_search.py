"""Choose the dense CRF's parameters for a trained CamVid model as DeepLab did: a small grid search on
held-aside training images, then one evaluation on val with and without the chosen CRF.

DeepLab (ICLR 2015, Sec. 4.1) fixed w2 = 3 and theta_gamma = 3 and searched w1, theta_alpha and
theta_beta by mean IoU on a small held-out set; here the held-aside set is every `--every`-th image of
CamVid train (the model has seen them, so the search favours what the CRF adds over confident scores;
val stays untouched until the last step). The network's scores come from the engine (`engine.segment`)
once per image and are kept; only the CRF reruns, so the scoring loop here is its own.

    python benchmarks/crf_search.py --weights segnet_basic_camvid --data ../shared/data/camvid

Writes benchmarks/results/crf_search.json and prints the grid and the val table (G, C, mIoU, BF).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads stall a busy machine

import torch
from common import ROOT, add_common_args, format_table, machine_info, set_threads, write_results

from pixelwise.crf import dense_crf
from pixelwise.data import build_dataset, raw_transforms
from pixelwise.engine import InferenceSpec, segment
from pixelwise.metrics import BoundaryF1, ConfusionMatrix
from pixelwise.precision import resolve_precision
from pixelwise.weights import load_weights

GRID = {"bilateral_weight": [3.0, 5.0], "bilateral_sxy": [30.0, 60.0, 100.0], "bilateral_srgb": [3.0, 6.0]}
IGNORE = 255  # CamVid's Unlabelled (stored as 11) after pixelwise's label mapping
FIXED = {"gaussian_weight": 3.0, "gaussian_sxy": 3.0}  # DeepLab's w2 and theta_gamma, not searched


def scores(weights: str, data: str, split: str, indices: list[int] | None) -> list[tuple]:
    """(probabilities (1, K, H, W), uint8 image (1, 3, H, W), labels (1, H, W)) for each chosen image: the
    engine's scores (`engine.segment`, whole image, precision auto), as `pixelwise evaluate` computes them."""
    model, meta = load_weights(weights)
    spec = InferenceSpec(dtype=resolve_precision("auto", torch.device("cpu")))
    ds = build_dataset("camvid", data, split, transforms=raw_transforms())
    out = []
    for i in indices if indices is not None else range(len(ds)):
        image, mask = ds[i]  # (3, H, W) uint8, (H, W)
        logits = segment(model, image[None], spec, mean=meta.mean, std=meta.std)  # (1, K, H, W) float32
        out.append((logits.softmax(1), image[None], mask[None]))
    return out


def score(samples: list[tuple], params: dict | None, iterations: int) -> dict:
    """G, C, mIoU and BF of the argmax, refined with the CRF `params` when given."""
    cm, bf = ConfusionMatrix(11, ignore_index=IGNORE), BoundaryF1(11, ignore_index=IGNORE)
    for probs, image, mask in samples:
        if params is not None:
            probs = dense_crf(probs, image, iterations=iterations, **params)
        cm.update(probs, mask)
        bf.update(probs, mask)
    m = {**cm.compute(), **bf.compute()}
    return {
        "G": 100 * float(m["pixel_acc"]),
        "C": 100 * float(m["mean_acc"]),
        "mIoU": 100 * float(m["miou"]),
        "BF": 100 * float(m["boundary_f1"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="segnet_basic_camvid", help="weights file or built-in name")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "camvid"), help="CamVid root")
    parser.add_argument("--every", type=int, default=12, help="search on every N-th train image (default 12)")
    parser.add_argument("--iterations", type=int, default=5, help="mean-field iterations (default 5)")
    add_common_args(parser)
    args = parser.parse_args()
    set_threads(args.threads)

    start = time.perf_counter()
    held = scores(args.weights, args.data, "train", list(range(0, 367, args.every)))
    grid = []
    for values in itertools.product(*GRID.values()):
        params = {**dict(zip(GRID, values, strict=True)), **FIXED}
        grid.append({**params, **score(held, params, args.iterations)})
        print(" ".join(f"{k}={v:g}" for k, v in grid[-1].items()), flush=True)
    base = score(held, None, args.iterations)
    best = max(grid, key=lambda r: r["mIoU"])
    chosen = {k: best[k] for k in (*GRID, *FIXED)}

    val = scores(args.weights, args.data, "val", None)
    without, with_crf = score(val, None, args.iterations), score(val, chosen, args.iterations)
    rows = [
        ["without CRF", *without.values()],
        ["with CRF", *with_crf.values()],
        ["gain", *(with_crf[k] - without[k] for k in without)],
    ]
    print(
        f"\nsearch on {len(held)} train images: no CRF mIoU {base['mIoU']:.2f}; best {best['mIoU']:.2f} with {chosen}"
    )
    print(format_table([f"CamVid val ({len(val)} images), {args.iterations} iterations", "G", "C", "mIoU", "BF"], rows))
    write_results(
        "crf_search",
        {
            "weights": args.weights,
            "iterations": args.iterations,
            "held_out_every": args.every,
            "grid": grid,
            "search_without_crf": base,
            "chosen": chosen,
            "val_without": without,
            "val_with": with_crf,
            "seconds": time.perf_counter() - start,
            "machine": machine_info("cpu"),
        },
    )


if __name__ == "__main__":
    main()
