"""Figure 5: U-Net's overlap-tile strategy (Ronneberger et al., MICCAI 2015, Fig. 2) on an ISBI 2012 slice.

The image is mirrored at its border by half the valid U-Net's margin, cut into input tiles whose valid
outputs abut, and the outputs are stitched; the prediction is `pixelwise.inference.predict_logits` in
slide mode, which tiles a valid-convolution U-Net this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pixelwise.gallery.common import Drawn, pyplot, save_png, show
from pixelwise.layers import mirror_pad


@dataclass(frozen=True)
class TileGrid:
    """The overlap-tile layout of one image, as `pixelwise.inference` lays it out.

    Attributes:
        tile_in: input tile side (a legal valid-U-Net size).
        tile_out: its output side (tile_in - margin).
        context: mirrored pixels before the image (margin / 2).
        tiles: (rows, columns) of tiles.
    """

    tile_in: int
    tile_out: int
    context: int
    tiles: tuple[int, int]

    def padded(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """Mirror padding (left, right, top, bottom) of an image of `size` (H, W)."""
        (h, w), (ny, nx) = size, self.tiles
        extra = self.tile_in - self.tile_out - self.context  # margin - context: after the last output
        return self.context, nx * self.tile_out - w + extra, self.context, ny * self.tile_out - h + extra

    def boxes(self) -> list[tuple[int, int]]:
        """Each tile's top-left corner (row, col) in the padded image; its output starts `context` further."""
        ny, nx = self.tiles
        return [(i * self.tile_out, j * self.tile_out) for i in range(ny) for j in range(nx)]


def tile_grid(model: nn.Module, size: tuple[int, int], tile_out: int) -> TileGrid:
    """The layout `predict_logits(mode="slide", window=(t, t))` uses for `t = model.valid_input_size(tile_out)`."""
    margin = int(model.margin)
    tile_in = model.valid_input_size(tile_out)
    out = tile_in - margin
    return TileGrid(tile_in, out, margin // 2, (math.ceil(size[0] / out), math.ceil(size[1] / out)))


def mirrored(image: np.ndarray, grid: TileGrid) -> np.ndarray:
    """The image mirror-padded as the tiles see it (`pixelwise.layers.mirror_pad`). (H, W) -> (H', W')."""
    x = torch.from_numpy(image.astype(np.float32))[None, None]  # (1, 1, H, W)
    return mirror_pad(x, *grid.padded(image.shape))[0, 0].numpy()


def cell_probability(model: nn.Module, meta: Any, image: np.ndarray, grid: TileGrid) -> np.ndarray:
    """P(cell) by overlap-tile inference. Shape: (H, W, 3) uint8 -> (H, W) float32."""
    from pixelwise.engine import InferenceSpec, segment

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    spec = InferenceSpec(mode="slide", window=(grid.tile_in, grid.tile_in))
    logits = segment(model, x, spec, mean=meta.mean, std=meta.std, num_classes=meta.num_classes)  # (1, 2, H, W)
    return logits.softmax(1)[0, meta.classes.index("cell")].numpy()


def _draw_tiles(ax: Any, grid: TileGrid, size: tuple[int, int]) -> None:
    """Each tile's input (dashed) and valid output (filled) in its own colour; the image's border in white."""
    from matplotlib.patches import Rectangle

    plt = pyplot()
    colours = plt.get_cmap("tab10").colors
    c = grid.context
    for n, (y, x) in enumerate(grid.boxes()):
        colour = colours[n % len(colours)]
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), grid.tile_in, grid.tile_in, fill=False, ec=colour, ls="--", lw=2))
        ax.add_patch(
            Rectangle((x + c - 0.5, y + c - 0.5), grid.tile_out, grid.tile_out, fc=colour, alpha=0.22, ec=colour)
        )
        ax.text(x + c + 6, y + c + 6, f"tile {n + 1}", color="white", fontsize=8, va="top", weight="bold")
    ax.add_patch(Rectangle((c - 0.5, c - 0.5), size[1], size[0], fill=False, ec="white", lw=1.5))


def draw_overlap_tile(
    image: np.ndarray, mask: np.ndarray, grid: TileGrid, unet: tuple[nn.Module, Any] | None, name: str, path: Path
) -> Drawn:
    """Figure 5: the mirrored slice with the tiles; with `unet` (model, meta) also its stitched prediction."""
    plt = pyplot()
    h, w = mask.shape
    panels = 3 if unet is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 5.0), squeeze=False)
    axes = axes[0]
    padded = mirrored(image[..., 0], grid)
    ph, pw = padded.shape
    show(
        axes[0],
        padded,
        f"mirrored input {pw}x{ph}: the {w}x{h} slice (white)\n+ {grid.context} px context",
        cmap="gray",
    )
    _draw_tiles(axes[0], grid, (h, w))
    ny, nx = grid.tiles
    axes[0].set_xlabel(
        f"{ny * nx} tiles: {grid.tile_in}x{grid.tile_in} in (dashed), {grid.tile_out}x{grid.tile_out} out (filled)",
        fontsize=9,
    )
    if unet is not None:
        prob = cell_probability(*unet, image, grid)
        error = float(((prob > 0.5).astype(np.int64) != mask).mean())
        show(
            axes[1],
            prob,
            f"stitched prediction: P(cell)\npixel error {error:.3f} (argmax)",
            cmap="gray",
            vmin=0,
            vmax=1,
        )
        for i in range(1, ny):
            axes[1].axhline(i * grid.tile_out - 0.5, color="yellow", lw=0.8, ls=":")
        for j in range(1, nx):
            axes[1].axvline(j * grid.tile_out - 0.5, color="yellow", lw=0.8, ls=":")
        axes[1].set_xlabel("tile seams dotted", fontsize=9)
    show(axes[-1], mask, f"label {w}x{h}\nwhite: cell, black: membrane", cmap="gray", vmin=0, vmax=1)
    fig.suptitle(f"U-Net overlap-tile on ISBI 2012 slice {name}", fontsize=11)
    save_png(fig, path)
    return Drawn("U-Net overlap-tile", path.name, _caption(grid, unet, name))


def _caption(grid: TileGrid, unet: tuple[nn.Module, Any] | None, name: str) -> str:
    text = (
        f"ISBI 2012 slice {name}, mirrored at its border by {grid.context} px (half the valid U-Net's margin of "
        f"{2 * grid.context}; more at the bottom and right, up to whole tiles) and cut into input tiles of "
        f"{grid.tile_in}x{grid.tile_in} whose valid {grid.tile_out}x{grid.tile_out} outputs abut: the layout "
        '`predict_logits(mode="slide")` uses for a valid-convolution U-Net (no overlap, no averaging, no seams).'
    )
    if unet is None:
        return text
    model, meta = unet
    kwargs = ", ".join(f"{k}={v}" for k, v in meta.model_kwargs.items())
    return text + (
        f" The stitched prediction is `{meta.model_name}({kwargs})`'s probability of 'cell' (fp32); pixel error is "
        "the share of pixels whose argmax differs from the label."
    )
