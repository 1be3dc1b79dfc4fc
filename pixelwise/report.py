"""The run report: `report.html` beside four PNGs (curves, confusion matrix, per-class IoU, examples).

Everything is drawn with matplotlib's Agg backend (no display needed) and written atomically, so a
report is either the previous one or the new one, never half of each.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pixelwise.fileio import atomic_write_bytes, atomic_write_text
from pixelwise.palette import overlay


def write_report(
    out_dir: str | Path,
    *,
    history: list[dict[str, Any]],
    confusion: np.ndarray,
    classes: Sequence[str],
    palette: Sequence[tuple[int, int, int]],
    samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] = (),
    summary: dict[str, Any] | None = None,
    title: str = "pixelwise run",
    ignore_index: int = 255,
) -> Path:
    """Write `report.html` and its PNGs into `out_dir`; return the HTML path.

    Args:
        history: metrics.jsonl records: {"kind": "train", "step", "loss", ...} and
            {"kind": "val", "epoch", "step", "miou", ...}.
        confusion: (K, K) counts, rows = ground truth, columns = prediction.
        samples: (image (H, W, 3) uint8, ground truth (H, W), prediction (H, W)) triples.
        summary: name -> value pairs shown in a table at the top (final metrics, timing...).
    """
    import matplotlib

    matplotlib.use("Agg")

    out_dir = Path(out_dir)
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    denom = confusion.sum(0) + confusion.sum(1) - tp
    iou = np.divide(tp, denom, out=np.full(len(classes), np.nan), where=denom > 0)
    figures = [
        _save(
            out_dir,
            _curves(history),
            "curves.png",
            "Training loss per logged step and validation mIoU per validated epoch.",
        ),
        _save(
            out_dir,
            _confusion(confusion, classes),
            "confusion.png",
            "Fraction of each ground-truth class predicted as each class.",
        ),
        _save(
            out_dir,
            _iou_bars(iou, classes, palette),
            "iou.png",
            "Intersection over union of each class on the validation split.",
        ),
    ]
    if samples:
        figures.append(
            _save(
                out_dir,
                _samples(samples, palette, ignore_index),
                "samples.png",
                "Validation images with ground truth and prediction overlaid.",
            )
        )
    path = out_dir / "report.html"
    atomic_write_text(path, _page(title, summary or {}, figures, classes, iou))
    return path


def _save(out_dir: Path, fig: Any, name: str, caption: str) -> tuple[str, str]:
    """Write `fig` as `out_dir/name` (atomically) and close it; return (name, caption) for the page."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(out_dir / name, buf.getvalue())
    return name, caption


def _curves(history: list[dict[str, Any]]) -> Any:
    """Training loss per step and validation mIoU per epoch, side by side."""
    import matplotlib.pyplot as plt

    train = [r for r in history if r.get("kind") == "train"]
    val = [r for r in history if r.get("kind") == "val"]
    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    ax_loss.set(xlabel="optimiser step", ylabel="training loss", title="Loss")
    ax_loss.grid(alpha=0.3)
    if val:
        ax_iou.plot([r["epoch"] for r in val], [r["miou"] for r in val], marker="o", lw=1)
    ax_iou.set(xlabel="epoch", ylabel="mIoU", title="Validation mIoU", ylim=(0, 1))
    ax_iou.grid(alpha=0.3)
    return fig


def _confusion(confusion: np.ndarray, classes: Sequence[str]) -> Any:
    """The row-normalised confusion matrix, with values written in the cells for up to 25 classes."""
    import matplotlib.pyplot as plt

    k = len(classes)
    rows = confusion.sum(axis=1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)  # each true class sums to 1
    side = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set(
        xticks=range(k),
        yticks=range(k),
        xlabel="predicted",
        ylabel="ground truth",
        title="Confusion matrix (row-normalised)",
    )
    ax.set_xticklabels(classes, rotation=90, fontsize=8)
    ax.set_yticklabels(classes, fontsize=8)
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if norm[i, j] >= 0.005:
                    ax.text(
                        j,
                        i,
                        f"{norm[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig


def _iou_bars(iou: np.ndarray, classes: Sequence[str], palette: Sequence[tuple[int, int, int]]) -> Any:
    """One bar per class in its palette colour."""
    import matplotlib.pyplot as plt

    k = len(classes)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.4 * k + 2), 3.6))
    colours = [tuple(c / 255 for c in palette[i]) if i < len(palette) else (0.5, 0.5, 0.5) for i in range(k)]
    ax.bar(range(k), np.nan_to_num(iou), color=colours, edgecolor="black", lw=0.5)
    ax.set(
        xticks=range(k),
        ylim=(0, 1),
        ylabel="IoU",
        title=f"Per-class IoU (mean {np.nanmean(iou):.3f})" if np.isfinite(iou).any() else "Per-class IoU",
    )
    ax.set_xticklabels(classes, rotation=90, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _samples(
    samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    palette: Sequence[tuple[int, int, int]],
    ignore_index: int,
) -> Any:
    """Image | ground truth | prediction, one row per sample."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(samples), 3, figsize=(9, 3 * len(samples)), squeeze=False)
    for row, (image, gt, pred) in zip(axes, samples, strict=True):
        row[0].imshow(image)
        row[1].imshow(overlay(image, gt, palette, ignore_index=ignore_index))
        row[2].imshow(overlay(image, pred, palette, ignore_index=ignore_index))
        for ax, name in zip(row, ("image", "ground truth", "prediction"), strict=True):
            ax.set_title(name, fontsize=9)
            ax.axis("off")
    return fig


def _page(
    title: str, summary: dict[str, Any], figures: list[tuple[str, str]], classes: Sequence[str], iou: np.ndarray
) -> str:
    """The HTML page: summary table, figures, per-class IoU table."""
    rows_html = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(_fmt(v))}</td></tr>" for key, v in summary.items()
    )
    iou_rows = "".join(
        f"<tr><th>{html.escape(c)}</th><td>{_fmt(float(v))}</td></tr>" for c, v in zip(classes, iou, strict=True)
    )
    figs_html = "".join(
        f'<figure><img src="{name}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption in figures
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}th,td{{border:1px solid #ccc;padding:3px 10px;text-align:left}}
figure{{margin:1.5em 0}}img{{max-width:100%}}figcaption{{color:#555;font-size:90%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<table>{rows_html}</table>
{figs_html}
<h2>Per-class IoU</h2><table>{iou_rows}</table>
</body></html>
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if np.isnan(v) else f"{v:.4f}"
    return str(v)
