"""Data and metric throughput: decoded + augmented CamVid images/s per loader worker count, and the
confusion-matrix update against torchmetrics' MulticlassJaccardIndex on the same logits.

    python benchmarks/data_speed.py                      # defaults: workers 0 1 2, 8x19x512x1024 logits
    python benchmarks/data_speed.py --workers 0 4 --images 128

Writes benchmarks/results/data_speed.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from pixelwise.fileio import atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def loader_speed(root: Path, workers: int, images: int, batch_size: int, crop: tuple[int, int]) -> dict:
    """Images/s through DataLoader(CamVid train, SegNet-style augmentation) for one worker count."""
    from torch.utils.data import DataLoader, Subset

    from pixelwise.data import CamVid, train_transforms

    tf = train_transforms(crop_size=crop, scale_range=(0.5, 2.0), flip=True, color_jitter=0.2)
    ds = Subset(CamVid(root, "train", transforms=tf), range(min(images, 367)))
    torch.manual_seed(0)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, persistent_workers=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker; several threads per small op only contend for the cores
    try:
        start = time.perf_counter()
        n = 0
        for x, _ in loader:  # includes worker start-up, as a training epoch does
            n += x.shape[0]
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {
        "workers": workers,
        "images": n,
        "seconds": round(seconds, 3),
        "images_per_s": round(n / seconds, 2),
        "images_per_s_per_worker": round(n / seconds / max(workers, 1), 2),
    }


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def metric_speed(shape: tuple[int, int, int, int], repeats: int) -> dict:
    """Median seconds of one update with (B, K, H, W) float32 logits, ours vs torchmetrics, same inputs."""
    from pixelwise.metrics import ConfusionMatrix

    b, k, h, w = shape
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, k, h, w, generator=g)
    target = torch.randint(0, k, (b, h, w), generator=g)
    target[:, : h // 10] = 255  # some ignored pixels, as real labels have
    ours = ConfusionMatrix(k, ignore_index=255)
    t_ours = _median_time(lambda: ours.update(logits, target), repeats)
    result = {
        "shape": list(shape),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "pixelwise_s": round(t_ours, 4),
    }
    try:
        from torchmetrics.classification import MulticlassJaccardIndex
    except ImportError:
        result["torchmetrics_s"] = None
        result["speedup"] = None
        return result
    ref = MulticlassJaccardIndex(num_classes=k, ignore_index=255, average="macro")
    t_ref = _median_time(lambda: ref.update(logits, target), repeats)
    ours.reset()
    ref.reset()
    ours.update(logits, target)
    ref.update(logits, target)
    result.update(
        {
            "torchmetrics_s": round(t_ref, 4),
            "speedup": round(t_ref / t_ours, 2),
            "same_miou": abs(ours.compute()["miou"] - float(ref.compute())) < 1e-6,
        }
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "camvid"), help="CamVid root")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to time")
    p.add_argument("--images", type=int, default=64, help="CamVid train images per timing (default 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, nargs=2, default=[360, 480], metavar=("H", "W"))
    p.add_argument(
        "--shape",
        type=int,
        nargs=4,
        default=[8, 19, 512, 1024],
        metavar=("B", "K", "H", "W"),
        help="logits shape for the metric timing (default 8 19 512 1024)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of the metric update (median)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_speed.json"))
    args = p.parse_args(argv)

    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    root = Path(args.root)
    if root.is_dir():
        results["loader"] = [
            loader_speed(root, w, args.images, args.batch_size, tuple(args.crop)) for w in args.workers
        ]
    else:
        results["loader"] = f"skipped: no CamVid at {root}"
    results["confusion_matrix_update"] = metric_speed(tuple(args.shape), args.repeats)
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")

    print(f"CamVid train, decode + scale/crop {args.crop[0]}x{args.crop[1]}/flip/jitter, batch {args.batch_size}")
    if isinstance(results["loader"], list):
        print(f"{'workers':>8} {'images/s':>10} {'per worker':>11}")
        for r in results["loader"]:
            print(f"{r['workers']:>8} {r['images_per_s']:>10.1f} {r['images_per_s_per_worker']:>11.1f}")
    else:
        print(results["loader"])
    m = results["confusion_matrix_update"]
    print(f"\nconfusion-matrix update, logits {'x'.join(map(str, m['shape']))} on CPU ({m['threads']} threads)")
    print(f"  pixelwise    {m['pixelwise_s'] * 1000:8.1f} ms")
    if m.get("torchmetrics_s") is not None:
        print(
            f"  torchmetrics {m['torchmetrics_s'] * 1000:8.1f} ms   -> {m['speedup']:.2f}x faster, "
            f"same mIoU: {m['same_miou']}"
        )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
