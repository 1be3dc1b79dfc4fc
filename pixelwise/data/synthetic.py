"""A built-in data set that needs no files: coloured, textured shapes over a textured background.

Each foreground class has its own hue and its own texture (flat, stripes, checks, dots), varied per
object in hue, brightness, texture phase, scale and orientation; the shapes themselves (circles,
ellipses, rectangles, triangles) are drawn for any class, so the class is told by colour and texture,
not by outline. Shapes overlap and occlude each other, the background is a smooth random field with
a faint tint, and Gaussian noise covers everything. Sample `i` is a pure function of `(seed, i)`,
so any number of loader workers produces the same data.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
from torch.utils.data import Dataset

from pixelwise.data.transforms import eval_transforms, to_tv_tensors

_HUE_NAMES = ["red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet", "magenta", "pink"]
_TEXTURES = ["flat", "striped", "checkered", "dotted"]
_SHAPES = ("circle", "ellipse", "rectangle", "triangle")


class SyntheticShapes(Dataset):
    """Random shapes, one colour and texture per class, over a textured background (class 0).

    Args:
        num_images: length of the data set.
        size: (H, W) of every image.
        num_classes: classes including the background, 2..25.
        seed: sample `i` is drawn from `numpy.random.default_rng((seed, i))`.
        transforms: joint transform; default the ImageNet-normalising evaluation transform.
        shapes_per_image: (min, max) number of shapes drawn on an image.

    Shape:
        `dataset[i]` -> image (3, H, W), mask (H, W) int64 with values 0..num_classes-1.
    """

    ignore_index = 255

    def __init__(
        self,
        *,
        num_images: int,
        size: tuple[int, int] = (128, 128),
        num_classes: int = 5,
        seed: int = 0,
        transforms=None,
        shapes_per_image: tuple[int, int] = (3, 6),
    ) -> None:
        if num_images < 1:
            raise ValueError(f"num_images={num_images} must be at least 1")
        if not 2 <= num_classes <= 25:
            raise ValueError(f"num_classes={num_classes} must be in 2..25 (background + 1..24 shape classes)")
        if len(size) != 2 or min(size) < 16:
            raise ValueError(f"size={tuple(size)} must be (H, W) with both sides >= 16")
        if not 1 <= shapes_per_image[0] <= shapes_per_image[1]:
            raise ValueError(f"shapes_per_image={shapes_per_image} must be (min, max) with 1 <= min <= max")
        self.num_images, self.size, self.seed = int(num_images), (int(size[0]), int(size[1])), int(seed)
        self.shapes_per_image = (int(shapes_per_image[0]), int(shapes_per_image[1]))
        self.transforms = transforms if transforms is not None else eval_transforms()
        n_fg = num_classes - 1
        # hues evenly spaced so neighbouring classes stay >= 15 degrees apart even at 24 classes
        self._hues = [(c / n_fg + 0.02) % 1.0 for c in range(n_fg)]
        self._hue_jitter = 0.12 / n_fg  # per-object hue change: a quarter of the gap to the next class
        self._textures = [c % len(_TEXTURES) for c in range(n_fg)]
        self.classes = ["background"] + self._names()
        self.palette = [(0, 0, 0)] + [
            tuple(round(255 * v) for v in colorsys.hsv_to_rgb(h, 0.8, 0.9)) for h in self._hues
        ]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _names(self) -> list[str]:
        pairs = zip(self._hues, self._textures, strict=True)
        names = [f"{_HUE_NAMES[round(h * 12) % 12]} {_TEXTURES[t]}" for h, t in pairs]
        return [n if names.count(n) == 1 else f"{n} {i + 1}" for i, n in enumerate(names)]

    def __len__(self) -> int:
        return self.num_images

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample `i` as numpy arrays. Shape: (H, W, 3) uint8, (H, W) int64."""
        if not 0 <= i < self.num_images:
            raise IndexError(f"index {i} out of range for {self.num_images} images")
        rng = np.random.default_rng((self.seed, i))
        h, w = self.size
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)  # (H, W) each
        image = self._background(rng, h, w)  # (H, W, 3) float in [0, 1]
        mask = np.zeros((h, w), dtype=np.int64)
        for _ in range(rng.integers(self.shapes_per_image[0], self.shapes_per_image[1] + 1)):
            cls = int(rng.integers(1, self.num_classes))
            inside = self._shape(rng, yy, xx, h, w)
            image[inside] = self._paint(rng, cls - 1, yy, xx)[inside]
            mask[inside] = cls
        image += rng.normal(0.0, 0.04, size=image.shape).astype(np.float32)  # sensor noise
        return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), mask

    def load_mask(self, i: int) -> np.ndarray:
        """Mask of sample `i`. Shape: (H, W) int64."""
        return self.load(i)[1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transforms(*to_tv_tensors(*self.load(i)))

    @staticmethod
    def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
        """Grey-brown smooth random field, faintly tinted. Shape: (H, W, 3) float32."""
        coarse = rng.random((h // 16 + 2, w // 16 + 2)).astype(np.float32)
        field = torch.nn.functional.interpolate(
            torch.from_numpy(coarse)[None, None], size=(h, w), mode="bicubic", align_corners=False
        )[0, 0].numpy()  # (H, W)
        level = rng.uniform(0.35, 0.6)
        tint = rng.uniform(-0.04, 0.04, size=3).astype(np.float32)
        return np.clip(level + 0.25 * (field - 0.5), 0, 1)[..., None] + tint  # (H, W, 3)

    @staticmethod
    def _shape(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, h: int, w: int) -> np.ndarray:
        """Boolean region of one random shape. Shape: (H, W)."""
        side = min(h, w)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.1, 0.25) * side
        theta = rng.uniform(0, math.pi)
        u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)  # rotated coordinates
        v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
        kind = _SHAPES[rng.integers(len(_SHAPES))]
        if kind == "circle":
            return u * u + v * v <= r * r
        if kind == "ellipse":
            b = r * rng.uniform(0.45, 0.8)
            return (u / r) ** 2 + (v / b) ** 2 <= 1
        if kind == "rectangle":
            b = r * rng.uniform(0.5, 1.0)
            return (np.abs(u) <= r) & (np.abs(v) <= b)
        angles = theta + np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.3, 0.3, size=3)
        px, py = cx + 1.2 * r * np.cos(angles), cy + 1.2 * r * np.sin(angles)
        signs = [(xx - px[k]) * (py[(k + 1) % 3] - py[k]) - (yy - py[k]) * (px[(k + 1) % 3] - px[k]) for k in range(3)]
        return ((signs[0] >= 0) & (signs[1] >= 0) & (signs[2] >= 0)) | (
            (signs[0] <= 0) & (signs[1] <= 0) & (signs[2] <= 0)
        )

    def _paint(self, rng: np.random.Generator, fg: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        """Colour and texture of foreground class `fg` (0-based), varied per object. Shape: (H, W, 3)."""
        hue = (self._hues[fg] + rng.uniform(-self._hue_jitter, self._hue_jitter)) % 1.0
        sat, val = rng.uniform(0.65, 0.95), rng.uniform(0.7, 1.0)
        rgb = np.asarray(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32)
        texture = _TEXTURES[self._textures[fg]]
        period = rng.uniform(5.0, 9.0)
        phase = rng.uniform(0, 2 * math.pi)
        angle = rng.uniform(0, math.pi)
        u = xx * math.cos(angle) + yy * math.sin(angle)
        v = -xx * math.sin(angle) + yy * math.cos(angle)
        if texture == "flat":
            shade = np.ones_like(xx)
        elif texture == "striped":
            shade = 1.0 + 0.3 * np.sign(np.sin(2 * math.pi * u / period + phase))
        elif texture == "checkered":
            shade = 1.0 + 0.3 * np.sign(np.sin(2 * math.pi * u / period + phase) * np.sin(2 * math.pi * v / period))
        else:  # dotted: dark dots on a regular rotated grid
            du = (u / period + phase) % 1.0 - 0.5
            dv = (v / period) % 1.0 - 0.5
            shade = np.where(du * du + dv * dv < 0.09, 0.55, 1.05)
        return np.clip(rgb[None, None, :] * shade[..., None], 0, 1).astype(np.float32)  # (H, W, 3)
