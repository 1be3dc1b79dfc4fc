"""Joint image + mask augmentation built on `torchvision.transforms.v2`.

Every transform is called as `transform(image, mask)` with a `tv_tensors.Image` (uint8 or float,
(C, H, W)) and a `tv_tensors.Mask` (int64, (H, W)) and returns the pair. v2 dispatches on the
tensor type, so geometric transforms resample the mask with NEAREST (labels are never blended)
and fill it with the ignore index, while colour transforms leave it alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pixelwise.config import ELASTIC_KINDS
from pixelwise.errors import ArgumentError
from pixelwise.inference import IMAGENET_MEAN, IMAGENET_STD

Pair = tuple[torch.Tensor, torch.Tensor]


class Compose:
    """Apply joint transforms in order: `(image, mask) -> (image, mask)`."""

    def __init__(self, transforms: Sequence[Callable[..., Pair]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Pair:
        for t in self.transforms:
            image, mask = t(image, mask)
        return image, mask

    def __repr__(self) -> str:
        body = "".join(f"\n    {t}," for t in self.transforms)
        return f"{type(self).__name__}({body}\n)"


class RandomScale:
    """Rescale image and mask by one factor drawn uniformly from `scale_range` (DeepLab's 0.5..2).

    The image is resized bilinearly (antialiased), the mask with NEAREST.

    Shape:
        (C, H, W), (H, W) -> (C, round(s*H), round(s*W)), (round(s*H), round(s*W)).
    """

    def __init__(self, scale_range: tuple[float, float]) -> None:
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range={scale_range} must be (low, high) with 0 < low <= high")
        self.scale_range = (float(lo), float(hi))

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Pair:
        lo, hi = self.scale_range
        s = lo + (hi - lo) * torch.rand(()).item()
        h, w = image.shape[-2:]
        size = [max(1, round(h * s)), max(1, round(w * s))]
        image = F.resize(image, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)  # (C, sH, sW)
        mask = F.resize(mask, size, interpolation=v2.InterpolationMode.NEAREST)  # (sH, sW)
        return image, mask

    def __repr__(self) -> str:
        return f"RandomScale(scale_range={self.scale_range})"


class GridElastic:
    """The U-Net paper's elastic deformation (Ronneberger et al. 2015, Sec. 3.1): "random displacement
    vectors on a coarse 3 by 3 grid [...] sampled from a Gaussian distribution with 10 pixels standard
    deviation. Per-pixel displacements are then computed using bicubic interpolation."

    The grid's points sit on the image's corners, edge midpoints and centre; the image is resampled
    bilinearly, the mask with NEAREST, and pixels pulled from outside the image get `fill`.

    Shape:
        (C, H, W), (H, W) -> same shapes.
    """

    def __init__(self, fill: dict[type, int | list[int]], grid: int = 3, std: float = 10.0) -> None:
        self.fill, self.grid, self.std = fill, grid, float(std)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Pair:
        h, w = image.shape[-2:]
        coarse = torch.randn(1, 2, self.grid, self.grid) * self.std  # (1, 2, g, g): x and y, in pixels
        field = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
        # to grid_sample's units: the image spans [-1, 1], so a pixel is 2 / size
        displacement = torch.stack([field[0, 0] * (2.0 / w), field[0, 1] * (2.0 / h)], -1)[None]  # (1, H, W, 2)
        image = F.elastic(image, displacement, interpolation=v2.InterpolationMode.BILINEAR, fill=self._fill(image))
        mask = F.elastic(mask, displacement, fill=self._fill(mask))
        return image, mask

    def _fill(self, x: torch.Tensor) -> list[float]:
        value = self.fill[tv_tensors.Mask if isinstance(x, tv_tensors.Mask) else tv_tensors.Image]
        return [float(v) for v in value] if isinstance(value, list) else [float(value)]

    def __repr__(self) -> str:
        return f"GridElastic(grid={self.grid}, std={self.std})"


class ToFloatNormalize:
    """uint8 image -> float32 in [0, 1] -> `(x - mean) / std`; the mask becomes int64.

    Shape:
        (C, H, W) uint8, (H, W) -> (C, H, W) float32, (H, W) int64.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"mean={tuple(mean)} and std={tuple(std)} need one value per channel and std > 0")
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Pair:
        image = F.to_dtype(image, torch.float32, scale=True)
        image = F.normalize(image, mean=self.mean, std=self.std)
        return image, mask.to(torch.int64)

    def __repr__(self) -> str:
        return f"ToFloatNormalize(mean={self.mean}, std={self.std})"


def _fill(mean: Sequence[float], ignore_index: int) -> dict[type, int | list[int]]:
    """Padding values: the mean colour for the image (0 after normalising), the ignore index for the mask."""
    return {tv_tensors.Image: [round(255 * m) for m in mean], tv_tensors.Mask: ignore_index}


def train_transforms(
    *,
    crop_size: tuple[int, int],
    scale_range: tuple[float, float] | None = (0.5, 2.0),
    flip: bool = True,
    color_jitter: float = 0.0,
    rotation: float = 0.0,
    elastic: bool | str = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = 255,
) -> Compose:
    """Training augmentation: scale, rotate, crop (with ignore padding), flip, jitter, elastic, normalise.

    Args:
        crop_size: (H, W) of every output; smaller images are padded, the mask with `ignore_index`.
        scale_range: random rescale factors (DeepLab uses 0.5..2); None keeps the size.
        flip: random horizontal flip with probability 0.5.
        color_jitter: brightness/contrast/saturation strength (0 = off); hue moves by a quarter of it.
        rotation: random rotation in [-rotation, rotation] degrees (0 = off).
        elastic: U-Net's elastic deformation (Ronneberger et al. 2015, §3.1): "grid" (or True) the paper's
            3x3 grid of displacements (`GridElastic`), "smooth" torchvision's smoothed random field
            (`v2.ElasticTransform`, alpha 50, sigma 5); False for none.
        mean, std: normalisation, per channel, on the [0, 1] scale.
        ignore_index: label written where padding or a warp leaves no pixel.

    Shape:
        (3, H, W) uint8 image, (H, W) mask -> (3, *crop_size) float32, (*crop_size) int64.
    """
    fill = _fill(mean, ignore_index)
    steps: list[Callable[..., Pair]] = []
    if scale_range is not None:
        steps.append(RandomScale(scale_range))
    if rotation > 0:
        steps.append(v2.RandomRotation(rotation, interpolation=v2.InterpolationMode.BILINEAR, fill=fill))
    steps.append(v2.RandomCrop(tuple(crop_size), pad_if_needed=True, fill=fill))
    if flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if color_jitter > 0:
        steps.append(
            v2.ColorJitter(
                brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=min(0.5, color_jitter / 4)
            )
        )
    if elastic is True or elastic == "grid":
        steps.append(GridElastic(fill))
    elif elastic == "smooth":  # torchvision's smoothed random field (Simard et al. 2003)
        steps.append(v2.ElasticTransform(alpha=50.0, sigma=5.0, fill=fill))
    elif elastic is not False:
        raise ArgumentError("elastic", elastic, f"must be true, false or one of {ELASTIC_KINDS}")
    steps.append(ToFloatNormalize(mean, std))
    return Compose(steps)


def eval_transforms(*, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Compose:
    """Evaluation: no geometry, only uint8 -> normalised float32.

    Shape:
        (3, H, W) uint8, (H, W) -> (3, H, W) float32, (H, W) int64.
    """
    return Compose([ToFloatNormalize(mean, std)])


def to_tv_tensors(image, mask) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """numpy (H, W, 3) uint8 image and (H, W) integer mask -> v2 tensors (3, H, W) and (H, W) int64."""
    img = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous())  # (3, H, W)
    msk = tv_tensors.Mask(torch.from_numpy(mask).to(torch.int64))  # (H, W)
    return img, msk
