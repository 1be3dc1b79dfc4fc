"""Figure 1: the six upsampling kinds of `pixelwise.layers` on the same input, side by side.

A CamVid crop and one feature map of the trained SegNet-Basic are max-pooled 4x4 (keeping the argmax
positions, as SegNet's encoder does) and brought back x4 by every kind of `UPSAMPLE_KINDS`, so the
pooled input is the same for all six and max-unpooling has the indices it needs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.gallery.common import Drawn, pyplot, save_png, show
from pixelwise.layers import UPSAMPLE_KINDS, make_upsample

SCALE = 4
TITLES = {
    "nearest": "nearest",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "fixed_unpool": "fixed unpooling\n(value at each block's top-left)",
    "max_unpool": "max-unpooling\n(the pooling indices)",
    "transposed": "transposed conv, FCN's\nbilinear init (8x8, stride 4)",
}


@torch.no_grad()
def upsample_all(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The 4x4 max-pooled `x` and its x4 upsampling by every kind, parameter-free parts only.

    `fixed_unpool` is shown without the learned 5x5 conv that follows it (its `unpool`); the transposed
    conv is FCN's bilinear initialisation. Shape: (B, C, H, W) -> (B, C, H/4, W/4), {kind: (B, C, H, W)}.
    """
    c = x.shape[1]
    pooled, indices = F.max_pool2d(x, SCALE, SCALE, return_indices=True)  # (B, C, H/4, W/4)
    out = {}
    for kind in UPSAMPLE_KINDS:
        options = {"init": "bilinear"} if kind == "transposed" else {}
        up = make_upsample(kind, c, c, SCALE, **options)
        if kind == "fixed_unpool":
            out[kind] = up.unpool(pooled)  # (B, C, H, W)
        else:
            out[kind] = up(pooled, indices=indices if kind == "max_unpool" else None)  # (B, C, H, W)
    return pooled, out


@torch.no_grad()
def feature_map(model: nn.Module, image: np.ndarray, box: tuple[slice, slice], mean: tuple, std: tuple) -> np.ndarray:
    """SegNet-Basic's first encoder layer (7x7 conv + BN + ReLU, before pooling) on the whole `image`, cut to
    `box`: its channel that varies most there. Shape: (H, W, 3) uint8 -> (h, w) float32 of the box."""
    from pixelwise.inference import normalize

    x = normalize(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None], mean, std)  # (1, 3, H, W)
    encoder = model.encoder
    y = encoder.convs[0](encoder.norm(x))[0][:, box[0], box[1]]  # (64, h, w)
    return y[y.flatten(1).std(1).argmax()].numpy()


def draw_upsampling(image: np.ndarray, feature: np.ndarray, path: Path, source: str) -> Drawn:
    """Figure 1 from an RGB crop (H, W, 3) uint8 and a feature map (H, W) of the same crop (H, W multiples of 4)."""
    plt = pyplot()
    h, w = feature.shape
    rows = [
        (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, "CamVid crop (RGB)"),
        (torch.from_numpy(feature)[None, None].float(), "feature map"),
    ]
    cols = 4  # each input takes two rows of four panels: original, pooled input, then the six kinds
    fig, axes = plt.subplots(4, cols, figsize=(2.7 * cols + 0.8, 4 * (2.7 * h / w + 0.45)), squeeze=False)
    vmin, vmax = float(feature.min()), float(feature.max())
    for n, (x, label) in enumerate(rows):
        pooled, ups = upsample_all(x)
        panels = [
            (x, f"{label}\n{h}x{w}, the original"),
            (pooled, f"4x4 max-pooled: the input\n{h // SCALE}x{w // SCALE}"),
        ]
        panels += [(ups[k], TITLES[k]) for k in UPSAMPLE_KINDS]
        for i, (t, title) in enumerate(panels):
            ax = axes[2 * n + i // cols, i % cols]
            if t.shape[1] == 3:
                show(ax, t[0].permute(1, 2, 0).clamp(0, 1).numpy(), title)  # bicubic overshoots [0, 1]: clipped
            else:
                artist = show(ax, t[0, 0].numpy(), title, cmap="viridis", vmin=vmin, vmax=vmax)
    fig.colorbar(artist, ax=axes.ravel().tolist(), fraction=0.025, pad=0.02, label="feature activation (one scale)")
    fig.suptitle(f"The same {h // SCALE}x{w // SCALE} input upsampled x4 to {h}x{w} by each kind", fontsize=12)
    save_png(fig, path)
    caption = (
        f"{source}, and one feature map of that crop (the most varied of the 64 channels of the built-in "
        f"SegNet-Basic's first encoder layer, 7x7 conv + BN + ReLU), are max-pooled 4x4 to "
        f"{h // SCALE}x{w // SCALE} (the argmax positions kept, as SegNet's encoder keeps them; per channel, so "
        "in the RGB row each colour has its own maxima and max-unpooling leaves coloured dots) and brought back "
        f"x4 by each `make_upsample` kind of `pixelwise.layers`: the same input and one colour scale per row "
        "(the feature row's colour bar; RGB values above 1 from bicubic's overshoot are clipped). The two "
        "unpooling kinds are drawn without the learned convolution that follows them in a decoder (fixed "
        "unpooling's 5x5 conv; SegNet's decoder convs): they leave sparse maps that the convolutions densify. "
        "The transposed convolution starts as exact bilinear interpolation inside the image; at the border it "
        "sees zeros beyond the image and fades (see `TransposedUpsample`)."
    )
    return Drawn("Upsampling, side by side", path.name, caption)
