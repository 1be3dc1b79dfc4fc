"""Confusion-matrix update throughput: pixelwise.metrics.ConfusionMatrix vs torchmetrics.

The workload of a Cityscapes validation step: logits of 8 x 19 x 512 x 1024 (float32) and
targets (8, 512, 1024) with ~5% ignore pixels (255). Timed side by side, alternating:

- ``from logits``: ``ConfusionMatrix.update(logits, target)`` vs
  ``MulticlassJaccardIndex.update(logits, target)`` (both take the argmax themselves);
- ``from labels``: the same with precomputed class labels (the update alone).

Before timing, the results are checked: our confusion matrix must equal torchmetrics'
``MulticlassConfusionMatrix`` entry for entry, and our per-class IoU and mIoU must equal
``MulticlassJaccardIndex`` (average None and "macro") to 1e-6.

Writes ``benchmarks/results/metrics.json`` and prints a table.

    python benchmarks/metrics.py            # ~1-2 min on 2 CPU cores
    python benchmarks/metrics.py --quick    # batch 2, few repetitions
"""

from __future__ import annotations

import argparse

import torch
from common import (
    add_common_args,
    format_table,
    machine_info,
    paired_ratio,
    progress,
    resolve_device,
    set_threads,
    summarize,
    time_alternating,
    write_results,
)

from pixelwise.metrics import ConfusionMatrix


def make_batch(batch: int, classes: int, h: int, w: int, ignore: float, device: torch.device, seed: int = 0):
    """Random logits (B, K, H, W) and targets (B, H, W) with a fraction ``ignore`` of 255 pixels."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, h, w, generator=gen)
    target = torch.randint(0, classes, (batch, h, w), generator=gen)
    target[torch.rand(batch, h, w, generator=gen) < ignore] = 255
    return logits.to(device), target.to(device)


def check_identical(logits: torch.Tensor, target: torch.Tensor, classes: int) -> dict:
    """Our matrix and IoUs against torchmetrics'; raises AssertionError on any difference."""
    from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

    ours = ConfusionMatrix(classes, ignore_index=255)
    ours.update(logits, target)
    tm_cm = MulticlassConfusionMatrix(classes, ignore_index=255).to(logits.device)
    tm_cm.update(logits, target)
    equal_matrix = torch.equal(ours.mat.cpu(), tm_cm.compute().cpu().to(torch.int64))
    scores = ours.compute()
    tm_iou = MulticlassJaccardIndex(classes, ignore_index=255, average="none").to(logits.device)
    tm_iou.update(logits, target)
    tm_miou = MulticlassJaccardIndex(classes, ignore_index=255, average="macro").to(logits.device)
    tm_miou.update(logits, target)
    iou_diff = (torch.tensor(scores["per_class_iou"]) - tm_iou.compute().cpu().double()).abs().max().item()
    miou_diff = abs(scores["miou"] - tm_miou.compute().item())
    if not equal_matrix or iou_diff > 1e-6 or miou_diff > 1e-6:
        raise AssertionError(
            f"results differ from torchmetrics: matrix equal={equal_matrix}, "
            f"max per-class IoU diff {iou_diff:.3g}, mIoU diff {miou_diff:.3g}"
        )
    return {
        "confusion_matrix_equal": equal_matrix,
        "max_per_class_iou_diff": iou_diff,
        "miou_diff": miou_diff,
        "miou": scores["miou"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Ratio = ours/torchmetrics of updates per second, the median of per-round ratios (goal >= 2).",
    )
    add_common_args(p)
    p.add_argument("--batch", type=int, default=None, help="images per update (default 8; 2 with --quick)")
    p.add_argument("--classes", type=int, default=19, help="classes K (default 19, Cityscapes)")
    p.add_argument("--size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    p.add_argument("--ignore", type=float, default=0.05, help="fraction of ignore (255) target pixels")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 10; 3 with --quick)")
    args = p.parse_args(argv)
    batch = args.batch or (2 if args.quick else 8)
    reps = args.reps or (3 if args.quick else 10)
    device = resolve_device(args.device)
    set_threads(args.threads)
    from torchmetrics.classification import MulticlassJaccardIndex

    h, w = args.size
    k = args.classes
    logits, target = make_batch(batch, k, h, w, args.ignore, device)
    labels = logits.argmax(dim=1)  # (B, H, W)
    progress(f"checking against torchmetrics on {batch}x{k}x{h}x{w} logits ...")
    check = check_identical(logits, target, k)
    progress(f"  identical: matrix equal, per-class IoU diff {check['max_per_class_iou_diff']:.2g}")

    ours = ConfusionMatrix(k, ignore_index=255, device=device)
    # validate_args=False: torchmetrics' input checks are a user option; without them it is at its fastest
    peer = MulticlassJaccardIndex(k, ignore_index=255, average="macro", validate_args=False).to(device)
    peer_checked = MulticlassJaccardIndex(k, ignore_index=255, average="macro").to(device)
    results = {}
    for name, pred in (("from_logits", logits), ("from_labels", labels)):
        fns = {
            "ours": lambda pred=pred: ours.update(pred, target),
            "torchmetrics": lambda pred=pred: peer.update(pred, target),
            "torchmetrics_validated": lambda pred=pred: peer_checked.update(pred, target),
        }
        progress(f"timing {name}: {reps} rounds")
        times = time_alternating(fns, reps=reps, warmup=1, device=device, log=progress)
        pixels = batch * h * w
        stats = {n: summarize(t, items=pixels) for n, t in times.items()}
        results[name] = {
            "times": stats,
            "ratio": paired_ratio(times["ours"], times["torchmetrics"]),
            "ratio_vs_validated": paired_ratio(times["ours"], times["torchmetrics_validated"]),
        }

    payload = {
        "benchmark": "metrics",
        "machine": machine_info(device, ["torchmetrics"]),
        "settings": {
            "batch": batch,
            "classes": k,
            "size": [h, w],
            "ignore": args.ignore,
            "reps": reps,
            "threads": args.threads,
            "quick": args.quick,
        },
        "check": check,
        "results": results,
    }
    path = write_results("metrics", payload, args.out)
    rows = []
    for name, r in results.items():
        s = r["times"]
        rows.append(
            [
                name,
                s["ours"]["median_s"] * 1e3,
                s["torchmetrics"]["median_s"] * 1e3,
                s["torchmetrics_validated"]["median_s"] * 1e3,
                s["ours"]["items_per_s"] / 1e6,
                r["ratio"],
                r["ratio_vs_validated"],
            ]
        )
    m = payload["machine"]
    print(
        f"confusion-matrix update, {batch}x{k}x{h}x{w}, {m['device_name']} ({device}, {args.threads} threads), "
        f"torch {m['versions']['torch']}, torchmetrics {m['versions']['torchmetrics']}; results identical"
    )
    print(
        format_table(
            ["input", "ours ms", "torchmetrics ms", "tm validated ms", "ours Mpix/s", "ratio", "ratio vs validated"],
            rows,
        )
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
