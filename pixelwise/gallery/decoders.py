"""Figure 3: two decoders on the same encoder and image (SegNet paper, Table 1): SegNet-Basic's max-unpooling
with the encoder's indices against fixed bilinear upsampling, with the boundary-F1 matches of each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pixelwise.gallery.common import (
    Drawn,
    Sample,
    below,
    class_legend,
    grey,
    pyplot,
    save_png,
    scores,
    show,
    show_labels,
)
from pixelwise.metrics import ConfusionMatrix, boundary_f1, boundary_matches

# boundary-match colours: matched predicted / true boundary, false predicted boundary, missed true boundary
MATCH_COLOURS = {"matched": (0.1, 0.8, 0.1), "false": (0.95, 0.1, 0.1), "missed": (0.2, 0.5, 1.0)}
GAP = 0.01  # between the last row and the legends


@dataclass(frozen=True)
class Decoder:
    """A model to compare: its name in the figure, the module (eval mode) and its weights' metadata."""

    label: str
    model: nn.Module
    meta: Any


def describe(meta: Any) -> str:
    """A model's name with the builder arguments that set it apart, e.g. "segnet_basic(upsample=bilinear)"."""
    kwargs = ", ".join(f"{k}={v}" for k, v in meta.model_kwargs.items())
    return f"{meta.model_name}({kwargs})"


def match_picture(image: np.ndarray, pred: np.ndarray, mask: np.ndarray, num_classes: int) -> np.ndarray:
    """The image in faint grey with the boundary-F1 matches drawn on it. Shape: (H, W, 3) float."""
    predicted, true = boundary_matches(pred, mask, num_classes)
    picture = grey(image)
    picture[true == 1] = MATCH_COLOURS["matched"]
    picture[true == 2] = MATCH_COLOURS["missed"]
    picture[predicted == 1] = MATCH_COLOURS["matched"]
    picture[predicted == 2] = MATCH_COLOURS["false"]
    return picture


def image_scores(pred: np.ndarray, mask: np.ndarray, num_classes: int) -> tuple[float, float]:
    """This image's mIoU (classes in its truth or prediction) and boundary F1."""
    cm = ConfusionMatrix(num_classes)
    cm.update(_tensor(pred), _tensor(mask))
    return cm.compute()["miou"], boundary_f1(pred, mask, num_classes)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.int64))[None]  # (1, H, W)


def draw_decoders(decoders: Sequence[Decoder], samples: Sequence[Sample], path: Path) -> Drawn:
    """Figure 3: per sample, the image, its truth, and each decoder's prediction and boundary matches."""
    from matplotlib.patches import Patch

    plt = pyplot()
    meta = decoders[0].meta
    k = meta.num_classes
    h, w = samples[0].mask.shape
    cols = 2 + 2 * len(decoders)
    fig, axes = plt.subplots(
        len(samples), cols, figsize=(2.9 * cols, len(samples) * (2.9 * h / w + 0.6) + 0.4), squeeze=False
    )
    for sample, row in zip(samples, axes, strict=True):
        show(row[0], sample.image, f"{sample.name}\n{w}x{h}")
        show_labels(row[1], sample.mask, meta.palette, "ground truth")
        for i, d in enumerate(decoders):
            pred = scores(d.model, sample.image, d.meta).argmax(1)[0].numpy()  # (H, W)
            miou, bf = image_scores(pred, sample.mask, k)
            show_labels(row[2 + 2 * i], pred, meta.palette, f"{d.label}\nmIoU {100 * miou:.1f}, BF {100 * bf:.1f}")
            show(row[3 + 2 * i], match_picture(sample.image, pred, sample.mask, k), f"{d.label}:\nits boundary matches")
    class_legend(fig, meta.classes, meta.palette, y=below(axes, GAP))
    fig.legend(
        handles=[
            Patch(color=MATCH_COLOURS["matched"], label="boundary matched within the BF tolerance"),
            Patch(color=MATCH_COLOURS["false"], label="predicted boundary, no true one near"),
            Patch(color=MATCH_COLOURS["missed"], label="true boundary missed"),
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, below(axes, GAP) - 0.5 / fig.get_figheight()),  # under the class legend
        ncol=3,
        fontsize=9,
    )
    fig.suptitle("Decoders compared on the same images: max-unpooling vs bilinear upsampling", fontsize=11)
    save_png(fig, path)
    names = "; ".join(f"**{d.label}**: `{describe(d.meta)}`" for d in decoders)
    caption = (
        f"{names}. Each model's prediction (whole {w}x{h} image, fp32) and where SegNet's boundary F1 finds its "
        "matches (`pixelwise.metrics.boundary_matches`: per class of the truth, tolerance 0.75% of the image "
        "diagonal; classes absent from the truth are not scored and not drawn). mIoU and BF are this image's, "
        "in percent (mIoU over the classes in its truth or prediction)."
    )
    return Drawn("Decoders compared on the same image", path.name, caption)
