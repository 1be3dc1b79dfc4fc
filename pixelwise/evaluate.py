"""`pixelwise evaluate`: score a weights file on a data set split and write metrics.json.

Images are loaded as uint8 and normalised on the device with the weights' own mean/std. The scores
are dataset-level (one confusion matrix over all pixels, see docs/metrics.md) plus SegNet's boundary
F1. A bad sample (unreadable image, size mismatch, bad label value) stops the run with one line
naming the file; with `--skip-bad` it is listed in `bad_files.txt` / `bad_files.json` and skipped.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from pixelwise.errors import UserError
from pixelwise.fileio import atomic_write_text
from pixelwise.precision import autocast, precision_name


class _Guarded(Dataset):
    """Wrap a data set so a UserError becomes a value, not an exception raised inside a worker."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[str, Any, Any]:
        try:
            image, mask = self.dataset[i]
        except UserError as e:
            samples = getattr(self.dataset, "samples", None)
            name = str(samples[i][0]) if samples else f"sample {i}"
            return "bad", name, str(e)
        return "ok", image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def _collate(items: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
    return items


def _same_size_groups(items: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stack consecutive samples of one size: (B, 3, H, W) uint8 images and (B, H, W) masks per group."""
    groups: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for image, mask in items:
        if groups and groups[-1][0][0].shape == image.shape:
            groups[-1].append((image, mask))
        else:
            groups.append([(image, mask)])
    return [(torch.stack([g[0] for g in grp]), torch.stack([g[1] for g in grp])) for grp in groups]


def write_bad_files(out: Path, bad: list[tuple[str, str]]) -> None:
    """`bad_files.txt` (file<TAB>reason per line) and `bad_files.json` in `out`, atomically."""
    atomic_write_text(out / "bad_files.txt", "".join(f"{f}\t{msg}\n" for f, msg in bad))
    atomic_write_text(out / "bad_files.json", json.dumps([{"file": f, "error": m} for f, m in bad], indent=2))


def _jsonable(x: Any) -> Any:
    """NaN -> None (JSON has no NaN), recursively."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def format_table(classes: list[str], metrics: dict[str, Any]) -> str:
    """Per-class IoU / accuracy / Dice / boundary F1 table (percent) with the means underneath."""

    def pct(v: float) -> str:
        return "     -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"

    width = max(12, *(len(c) for c in classes))
    lines = [f"{'class':<{width}}    IoU    Acc   Dice     BF"]
    bf = metrics.get("per_class_boundary_f1", [math.nan] * len(classes))
    for i, name in enumerate(classes):
        lines.append(f"{name:<{width}} {pct(metrics['per_class_iou'][i])} {pct(metrics['per_class_acc'][i])} "
                     f"{pct(metrics['dice'][i])} {pct(bf[i])}")
    lines.append("-" * len(lines[0]))
    lines.append(f"{'mean':<{width}} {pct(metrics['miou'])} {pct(metrics['mean_acc'])} "
                 f"{pct(metrics['mean_dice'])} {pct(metrics.get('boundary_f1', math.nan))}")
    lines.append(f"pixel accuracy {pct(metrics['pixel_acc'])}   frequency-weighted IoU {pct(metrics['fwiou'])}")
    return "\n".join(lines)


def inference_window(args: argparse.Namespace, extra: dict[str, Any]) -> tuple[int, int] | None:
    """--window, else the training crop recorded in the weights (`extra["crop_size"]`), else 512x512."""
    if args.mode == "whole":
        return None
    if args.window:
        return (int(args.window[0]), int(args.window[1]))
    crop = extra.get("crop_size")
    if isinstance(crop, list | tuple) and len(crop) == 2:
        return (int(crop[0]), int(crop[1]))
    return (512, 512) if args.mode == "slide" else None


def _default_out(weights: str) -> Path:
    """Beside a weights file; for built-in weights (inside the installed package) `./eval_<name>`."""
    path = Path(weights)
    return path.resolve().parent if path.is_file() else Path(f"eval_{weights}")


def evaluate_command(args: argparse.Namespace) -> int:
    """`pixelwise evaluate --weights W --data ROOT --dataset NAME --split SPLIT`."""
    from tqdm import tqdm

    from pixelwise.data import build_dataset, raw_transforms
    from pixelwise.inference import normalize, predict_logits, resolve_device, resolve_dtype
    from pixelwise.metrics import BoundaryF1, ConfusionMatrix
    from pixelwise.weights import load_weights

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: give 1 or more")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: give 0 or more")
    if args.crf:
        from pixelwise.crf import crf_kwargs

        crf_args = crf_kwargs(args.crf_preset)  # an unknown preset fails before any work
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    model, meta = load_weights(args.weights, device)
    kw: dict[str, Any] = {}
    if args.dataset == "folder":
        kw = {"classes": meta.classes, "palette": meta.palette}
    elif args.dataset == "synthetic":
        kw = {"num_classes": meta.num_classes}
        if "synthetic_size" in meta.extra:
            kw["size"] = tuple(meta.extra["synthetic_size"])
    dataset = build_dataset(args.dataset, args.data, args.split, transforms=raw_transforms(), **kw)
    if dataset.num_classes != meta.num_classes:
        raise UserError(f"{args.weights} predicts {meta.num_classes} classes but data set {args.dataset!r} has "
                        f"{dataset.num_classes}; evaluate on the data the weights were trained for")
    out = Path(args.out) if args.out else _default_out(args.weights)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for metrics.json")
    window = inference_window(args, meta.extra)
    stride = tuple(args.stride) if args.stride else None
    k = meta.num_classes
    cm = ConfusionMatrix(k, ignore_index=dataset.ignore_index, device=device)
    bf = BoundaryF1(k, ignore_index=dataset.ignore_index)
    loader = DataLoader(_Guarded(dataset), batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        collate_fn=_collate)
    bad: list[tuple[str, str]] = []
    num_images = 0
    # the bar is shown on terminals only and cleared on exit, so an error stays a single clean line
    with tqdm(loader, desc=f"evaluate {args.dataset}/{args.split}", unit="batch", leave=False,
              disable=None) as bar:
        for batch in bar:
            good = []
            for status, a, b in batch:
                if status == "bad":
                    if not args.skip_bad:
                        raise UserError(b)
                    bad.append((a, b))
                else:
                    good.append((a, b))
            for images, masks in _same_size_groups(good):
                images, masks = images.to(device), masks.to(device)  # (B, 3, H, W) uint8, (B, H, W)
                x = normalize(images, meta.mean, meta.std)  # (B, 3, H, W) float32
                with autocast(device, dtype):
                    logits = predict_logits(model, x, mode=args.mode, window=window, stride=stride,
                                            scales=args.scales, flip=args.flip, num_classes=k)
                logits = logits.float()  # (B, K, H, W)
                if args.crf:
                    from pixelwise.crf import dense_crf

                    logits = dense_crf(logits.softmax(1), images, **crf_args)  # refined probabilities
                cm.update(logits, masks)
                bf.update(logits, masks)
                num_images += len(images)
    if num_images == 0:
        raise UserError(f"no sample of {args.dataset}/{args.split} could be read ({len(bad)} bad); "
                        "fix the files listed above")
    cm.all_reduce()
    metrics = {**cm.compute(), **bf.compute()}
    result = {
        **metrics,
        "classes": list(meta.classes),
        "num_images": num_images,
        "skipped": [f for f, _ in bad],
        "weights": str(args.weights),
        "dataset": args.dataset,
        "split": args.split,
        "mode": args.mode,
        "window": list(window) if window else None,
        "flip": bool(args.flip),
        "crf": args.crf_preset if args.crf else None,
        "precision": precision_name(dtype),
    }
    atomic_write_text(out / "metrics.json", json.dumps(_jsonable(result), indent=2) + "\n")
    if bad:
        write_bad_files(out, bad)
    print(format_table(list(meta.classes), metrics))
    print(f"{num_images} images; wrote {out / 'metrics.json'}"
          + (f"; skipped {len(bad)} bad files, listed in {out / 'bad_files.txt'}" if bad else ""))
    return 0
