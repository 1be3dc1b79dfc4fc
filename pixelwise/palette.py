"""Class colours: palette-mode label PNGs, colour maps and overlays on the input image."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pixelwise.fileio import atomic_write_bytes

__all__ = [
    "IGNORE_COLOR",
    "colorize",
    "default_palette",
    "index_png_bytes",
    "overlay",
    "save_index_png",
    "save_rgb_png",
]

IGNORE_COLOR = (224, 224, 192)  # PASCAL VOC's colour for "void" pixels
_BLEND_PIXELS = 2**20  # pixels blended at once: ~30 MB of temporaries, whatever the image size


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved class index), defined for any number of classes."""
    palette = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    return palette


def _lut(palette: Sequence[tuple[int, int, int]], ignore_index: int) -> np.ndarray:
    """A 256-entry colour table: class colours, IGNORE_COLOR at the ignore index, black elsewhere."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
    if 0 <= ignore_index < 256:
        lut[ignore_index] = IGNORE_COLOR
    return lut


def colorize(mask: np.ndarray, palette: Sequence[tuple[int, int, int]], *, ignore_index: int = 255) -> np.ndarray:
    """Class-index mask -> RGB picture of it.

    Shape:
        (H, W) integer -> (H, W, 3) uint8.
    """
    if len(palette) > 256 or (mask.size and (mask.min() < 0 or mask.max() > 255)):
        raise ValueError(f"colorize handles indices 0..255; got palette of {len(palette)} and max {mask.max()}")
    return _lut(palette, ignore_index)[mask.astype(np.intp)]


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    palette: Sequence[tuple[int, int, int]],
    *,
    alpha: float = 0.5,
    ignore_index: int = 255,
) -> np.ndarray:
    """Blend class colours over the image with opacity `alpha`; ignored pixels show the image only.

    Shape:
        (H, W, 3) uint8, (H, W) -> (H, W, 3) uint8.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    out = np.empty(image.shape[:2] + (3,), np.uint8)
    rows = max(1, _BLEND_PIXELS // max(image.shape[1], 1))  # float32 temporaries for a band of rows, not the image
    for y in range(0, image.shape[0], rows):
        m = mask[y : y + rows]
        colours = colorize(m, palette, ignore_index=ignore_index).astype(np.float32)
        a = np.where(m == ignore_index, 0.0, alpha).astype(np.float32)[..., None]  # (h, W, 1)
        blend = image[y : y + rows].astype(np.float32) * (1 - a) + colours * a
        out[y : y + rows] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return out


def index_png_bytes(mask: np.ndarray, palette: Sequence[tuple[int, int, int]], *, ignore_index: int = 255) -> bytes:
    """Encode a class-index mask as a palette-mode PNG (pixel value = class index, palette = class colours).

    More than 256 classes do not fit a palette PNG; those masks are written as 16-bit grey PNGs.
    """
    if mask.size and mask.max() > 255:
        im = Image.fromarray(mask.astype(np.uint16))
    else:
        im = Image.fromarray(mask.astype(np.uint8))  # 'L'
        im.putpalette(_lut(palette, ignore_index).reshape(-1).tolist(), rawmode="RGB")  # makes it mode 'P'
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def save_index_png(
    path: str | Path, mask: np.ndarray, palette: Sequence[tuple[int, int, int]], *, ignore_index: int = 255
) -> None:
    """Write `index_png_bytes(mask, palette)` to `path` atomically."""
    atomic_write_bytes(path, index_png_bytes(mask, palette, ignore_index=ignore_index))


def save_rgb_png(path: str | Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as an RGB PNG, atomically."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
