"""What the gallery's figures share: matplotlib set-up, PNG writing, class legends, reading samples."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pixelwise.fileio import atomic_write_bytes
from pixelwise.palette import colorize

DPI = 100  # figure sizes are given in inches: 100 px an inch


@dataclass(frozen=True)
class Drawn:
    """One figure of the gallery: its PNG under the output folder (None when it could not be drawn) and the
    Markdown text that goes under it in gallery.md (what it shows, or what it needs to be drawn)."""

    title: str
    file: str | None
    caption: str


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> Path:
    """Write `fig` as a compressed PNG (atomically) and close it."""
    from PIL import Image

    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")  # no alpha: a third smaller
    out = io.BytesIO()
    image.save(out, format="png", optimize=True)
    atomic_write_bytes(path, out.getvalue())
    return path


def rgb(colour: Sequence[int]) -> tuple[float, float, float]:
    """An 8-bit RGB triple as matplotlib's 0..1 floats."""
    return (colour[0] / 255, colour[1] / 255, colour[2] / 255)


def class_legend(fig: Any, classes: Sequence[str], palette: Sequence[Sequence[int]], *, y: float = 0.0) -> None:
    """A one-row legend of the class colours under the figure (unlabelled pixels are drawn pale)."""
    from matplotlib.patches import Patch

    from pixelwise.palette import IGNORE_COLOR

    handles = [
        Patch(facecolor=rgb(c), edgecolor="black", lw=0.4, label=n) for n, c in zip(classes, palette, strict=True)
    ]
    handles.append(Patch(facecolor=rgb(IGNORE_COLOR), edgecolor="black", lw=0.4, label="unlabelled (ignored)"))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, y), ncol=min(len(handles), 6), fontsize=9)


def below(axes: Any, gap: float = 0.02) -> float:
    """A figure height (0..1) just under the lowest of `axes`, for a legend anchored there."""
    return min(ax.get_position().y0 for ax in np.ravel(axes)) - gap


def show(ax: Any, picture: np.ndarray, title: str, **kwargs: Any) -> Any:
    """imshow without ticks, pixels drawn as squares; returns the image artist."""
    artist = ax.imshow(picture, interpolation="nearest", **kwargs)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return artist


def show_labels(ax: Any, labels: np.ndarray, palette: Sequence[Sequence[int]], title: str) -> None:
    """A class-index map in the class colours (the ignore index 255 pale)."""
    show(ax, colorize(labels.astype(np.int64), [tuple(c) for c in palette]), title)


def grey(image: np.ndarray) -> np.ndarray:
    """An RGB image as a faint grey background for drawing on. Shape: (H, W, 3) uint8 -> (H, W, 3) float."""
    g = image.astype(np.float32).mean(-1, keepdims=True) / 255
    return np.repeat(0.35 + 0.4 * g, 3, axis=-1)


@dataclass(frozen=True)
class Sample:
    """A data-set image with its labels: (H, W, 3) uint8 and (H, W) class indices (255 = ignored)."""

    name: str
    image: np.ndarray
    mask: np.ndarray


def camvid_samples(root: Path, names: Sequence[str], scale: float = 1.0) -> list[Sample]:
    """CamVid val images by file name, resized by `scale` (labels by nearest neighbour)."""
    from pixelwise.data.datasets import CamVid

    dataset = CamVid(root, "val")
    index = {p.name: i for i, (p, _) in enumerate(dataset.samples)}
    samples = []
    for name in names:
        image, mask = dataset.load(index[name])
        samples.append(Sample(name, *resized(image, mask.astype(np.uint8), scale)))
    return samples


def resized(image: np.ndarray, mask: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Image (bilinear) and labels (nearest) scaled by `scale`; unchanged at 1."""
    from PIL import Image

    if scale == 1.0:
        return image, mask
    h, w = mask.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.array(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    labels = np.array(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    return small, labels


def scores(model: nn.Module, image: np.ndarray, meta: Any) -> torch.Tensor:
    """Float32 class scores of one uint8 image (whole image, fp32) by `pixelwise.engine.segment`.

    Shape: (H, W, 3) uint8 -> (1, K, H, W)."""
    from pixelwise.engine import InferenceSpec, segment

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    return segment(model, x, InferenceSpec(), mean=meta.mean, std=meta.std, num_classes=meta.num_classes)
