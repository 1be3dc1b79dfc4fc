"""Figure 4: the dense CRF (Krähenbühl & Koltun, NIPS 2011; DeepLab's post-processing) before and after, on
the built-in model's scores, with the CRF parameters recorded with its weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pixelwise.crf import CRFParams, dense_crf
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
from pixelwise.gallery.decoders import image_scores

# changed pixels: what the CRF's change did against the truth
CHANGE_COLOURS = {
    "fixed (wrong -> right)": (0.1, 0.8, 0.1),
    "broken (right -> wrong)": (0.95, 0.1, 0.1),
    "wrong -> other wrong": (1.0, 0.65, 0.0),
    "unlabelled pixel": (0.55, 0.55, 0.95),
}
GAP = 0.045  # room for the scores printed under the last row


def refine(model: nn.Module, meta: Any, params: CRFParams, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's softmax and the CRF's refined probabilities, as `engine.segment` computes them.

    Shape: (H, W, 3) uint8 -> (1, K, H, W), (1, K, H, W)."""
    probs = scores(model, image, meta).softmax(1)  # (1, K, H, W)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    return probs, dense_crf(probs, x, **params.kwargs())


def change_picture(image: np.ndarray, before: np.ndarray, after: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """The image in faint grey, the pixels whose label the CRF changed coloured by `CHANGE_COLOURS`."""
    changed = before != after
    labelled = mask < k
    picture = grey(image)
    colours = list(CHANGE_COLOURS.values())
    picture[changed & labelled & (after == mask)] = colours[0]
    picture[changed & labelled & (before == mask)] = colours[1]
    picture[changed & labelled & (before != mask) & (after != mask)] = colours[2]
    picture[changed & ~labelled] = colours[3]
    return picture


def draw_crf(model: nn.Module, meta: Any, params: CRFParams, samples: Sequence[Sample], path: Path) -> Drawn:
    """Figure 4: per sample the image, truth, network labels and confidence, CRF labels and changed pixels."""
    from matplotlib.patches import Patch

    plt = pyplot()
    k = meta.num_classes
    h, w = samples[0].mask.shape
    fig, axes = plt.subplots(len(samples), 6, figsize=(19.2, len(samples) * (3.2 * h / w + 0.5) + 0.6), squeeze=False)
    for sample, row in zip(samples, axes, strict=True):
        probs, refined = refine(model, meta, params, sample.image)
        before, after = probs.argmax(1)[0].numpy(), refined.argmax(1)[0].numpy()  # (H, W)
        (m0, b0), (m1, b1) = image_scores(before, sample.mask, k), image_scores(after, sample.mask, k)
        show(row[0], sample.image, f"{sample.name}\n{w}x{h}")
        show_labels(row[1], sample.mask, meta.palette, "ground truth")
        show_labels(row[2], before, meta.palette, "network (argmax of its scores)")
        artist = show(row[3], probs.max(1).values[0].numpy(), "network: top softmax", cmap="viridis", vmin=0, vmax=1)
        bar = fig.colorbar(artist, cax=row[3].inset_axes([1.03, 0.0, 0.05, 1.0]))
        bar.ax.tick_params(labelsize=7)
        show_labels(row[4], after, meta.palette, f"after the dense CRF ({params.iterations} iterations)")
        show(row[5], change_picture(sample.image, before, after, sample.mask, k), "pixels the CRF changed")
        row[2].text(
            0.0,
            -0.08,
            f"mIoU {100 * m0:.1f} -> {100 * m1:.1f} ({100 * (m1 - m0):+.1f}),   BF {100 * b0:.1f} -> {100 * b1:.1f} "
            f"({100 * (b1 - b0):+.1f}),   {100 * (before != after).mean():.1f}% of the pixels changed",
            transform=row[2].transAxes,
            fontsize=9.5,
            va="top",
        )
    class_legend(fig, meta.classes, meta.palette, y=below(axes, GAP))
    fig.legend(
        handles=[Patch(color=c, label=n) for n, c in CHANGE_COLOURS.items()],
        loc="upper center",
        bbox_to_anchor=(0.5, below(axes, GAP) - 0.5 / fig.get_figheight()),  # under the class legend
        ncol=4,
        fontsize=9,
    )
    fig.suptitle("Dense CRF before / after, on the built-in SegNet-Basic's scores", fontsize=11)
    save_png(fig, path)
    settings = ", ".join(f"{key}={value:g}" for key, value in params.to_dict().items())
    caption = (
        f"The built-in `segnet_basic_camvid` on {len(samples)} CamVid val images ({w}x{h}, whole image, fp32), "
        f"then `pixelwise.crf.dense_crf` with the parameters recorded with those weights ({settings}; chosen by "
        "`benchmarks/crf_search.py` on held-aside train images). Under each row: this image's mIoU (classes in "
        "its truth or prediction) and boundary F1 before -> after the CRF, in percent, and the share of pixels "
        "whose label changed; the last panel colours those pixels by what the change did against the truth."
    )
    return Drawn("Dense CRF before / after", path.name, caption)
